"""MA-AGIQA: the frozen semantic branch, the MANIQA quality branch and the MoE head, with checkpoints.

A checkpoint directory holds ``config.json`` (the :class:`ModelConfig`), ``model.safetensors`` (the trained
weights: quality branch and MoE; a frozen pretrained backbone is left out and comes from its source) and,
for models that live in local folders (the tiny ones, fine-tuned ones), ``semantic/`` and ``prompt/``
saved with ``save_pretrained``. Loading always goes through ``from_pretrained`` of transformers and timm.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from . import hub
from .checkpoint import (
    CONFIG_FILE,
    INIT_SEED,
    UNTRAINED,
    UNTRAINED_KEY,
    loaded_fingerprints,
    recorded_metadata,
    WEIGHTS_FILE,
    backbone_from_source,
    checkpoint_dir,
    directory_of,
    hash_weights,
    identity,
    load_config,
)
from .config import ModelConfig
from .ensemble import Member, Probe
from .preprocess import quality_views
from .maniqa import MANIQA
from .moe import MoEHead
from .prompt_encoder import PromptEncoder
from .registry import get_config, list_models
from .semantic import SemanticExtractor


class MAAGIQA(nn.Module):
    def __init__(
        self,
        cfg: ModelConfig,
        semantic: SemanticExtractor | None = None,
        prompt_encoder: PromptEncoder | None = None,
        load_pretrained_backbone: bool = True,
        base_dir: str | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.base_dir = base_dir  # where relative model ids of the config point (a checkpoint directory)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(INIT_SEED)
            self.quality = MANIQA(cfg.quality, load_pretrained=load_pretrained_backbone)
            for expert in cfg.moe.experts:
                if expert.source == "stats":  # the backbone's width, derived, checked against a checkpoint's
                    width = 2 * self.quality.backbone.out_channels
                    if expert.dim not in (None, width):
                        raise ValueError(f"expert {expert.name} was built {expert.dim} wide; this backbone gives {width}")
                    expert.dim = width
            self.moe = MoEHead(cfg.moe)
            # an ensemble's other heads and its probe (none for a single head: no new tensors, the same ids)
            self.heads = nn.ModuleList(Member(cfg, self.quality.backbone) for _ in range(cfg.ensemble.heads - 1))
            self.probe = Probe(2 * self.quality.backbone.out_channels) if cfg.ensemble.probe else None
        self.semantic = semantic
        self.prompt_encoder = prompt_encoder
        self.inference_only = False  # set by optimise_for_inference
        self.init_hash = weights_hash(self.trainable_state_dict())  # the heads as initialised
        self.checkpoint_hash = self.init_hash  # the heads as last loaded or saved

    def train(self, mode: bool = True) -> "MAAGIQA":
        """Frozen parts stay in eval mode: no dropout in the MLLM, no BatchNorm statistics drifting in a
        frozen backbone."""
        if mode:
            self._refuse_if_inference_only("train")
        super().train(mode)
        for frozen in (self.semantic, self.prompt_encoder):
            if frozen is not None:
                frozen.eval()
        if self.cfg.quality.freeze_backbone:
            self.quality.backbone.eval()
            for stage in self.quality.backbone.trainable_modules():
                stage.train(mode)
        return self

    # -- pure tensor path ------------------------------------------------------------------------------
    def forward(
        self,
        views: torch.Tensor | None = None,
        semantic: dict[str, torch.Tensor] | None = None,
        prompt_embedding: torch.Tensor | None = None,
        prompt_present: torch.Tensor | None = None,
        backbone_features: torch.Tensor | None = None,
        backbone_cut: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """views [B, V, 3, s, s] (or a frozen backbone's cached maps [B, C, g, g] as ``backbone_features``;
        with ``trainable_stages``, the frozen stages' levels and ``backbone_cut``, the input of the stages that
        train), semantic {prompt name: [B, hidden]}, prompt_embedding [B, dim]
        -> (MOS [B] float32, gates [B, E] in ``cfg.expert_names`` order)."""
        features = dict(semantic or {})
        stats = [e.name for e in self.cfg.moe.experts if e.source == "stats"]
        heads = [(self.quality, self.moe), *((m.quality, m.moe) for m in self.heads)]
        if backbone_cut is not None:
            backbone_features = self.quality.backbone.finish(backbone_features, backbone_cut)
        b = (backbone_features if backbone_features is not None else views).shape[0]
        maps, pool = backbone_features, (lambda x: x)
        if maps is None and (stats or self.probe is not None or len(heads) > 1):  # each view's map once, for all
            views = views.unsqueeze(1) if views.dim() == 4 else views
            v = views.shape[1]
            maps, pool = self.quality.features(views.flatten(0, 1)), (lambda x: x.view(b, v, -1).mean(1))
        pooled = pool(self.quality.pooled_stats(maps)) if stats or self.probe is not None else None
        features.update({name: pooled for name in stats})
        present = None
        if any(e.source == "prompt" for e in self.cfg.moe.experts):
            if prompt_embedding is None:
                prompt_embedding = self.moe.regress.weight.new_zeros(b, self.cfg.prompt.dim)
                prompt_present = torch.zeros(b, dtype=torch.bool, device=prompt_embedding.device)
            features["prompt"] = prompt_embedding
            present = {"prompt": prompt_present}
        scores, gates = [], []
        for quality, moe in heads:  # the mean of the heads' MOS and of their gates
            features["quality"] = pool(quality.head(maps)) if maps is not None else quality(views)
            score, gate = moe(features, present)
            scores.append(score)
            gates.append(gate)
        score = torch.stack(scores).mean(0) * self.cfg.mos_std + self.cfg.mos_mean
        if self.probe is not None:  # no gate of its own: the gates are the heads'
            w = self.cfg.ensemble.probe_weight
            score = (1 - w) * score + w * self.probe(pooled)
        return score, torch.stack(gates).mean(0)

    def optimise_for_inference(self) -> "MAAGIQA":
        """The model as scoring runs it, in place: on CPU a CNN backbone gets its BatchNorms folded into
        its convolutions (fused with their activations) and a channels-last layout: 1.7-2x the images/s
        at the same scores (benchmarks/offline_cpu.py). On a GPU, and for a ViT backbone, nothing changes. The
        rewritten model keeps its model_id but can no longer train or be saved."""
        from .backbones import CNNLevels
        from .cpu_inference import optimise_cnn_backbone

        backbone = self.quality.backbone
        on_cpu = next(self.quality.parameters()).device.type == "cpu"
        if self.inference_only or not on_cpu or not isinstance(backbone, CNNLevels):
            return self
        self.eval()
        optimise_cnn_backbone(backbone, self.cfg.quality.views.size)
        self.inference_only = True
        return self

    def _refuse_if_inference_only(self, what: str) -> None:
        if self.inference_only:
            raise RuntimeError(f"this model was rewritten by optimise_for_inference: it scores, it cannot {what}")

    # -- convenience over images --------------------------------------------------------------------------
    def preprocess(self, img: Image.Image, train: bool = False, generator=None) -> torch.Tensor:
        return quality_views(img, self.cfg.quality.views, train=train, generator=generator)

    @torch.inference_mode()
    def score_images(self, images: list[Image.Image], prompts: list[str | None] | None = None) -> dict:
        """Score decoded RGB images end to end: {"score": [B], "gates": [B, E], "semantic": {...}}."""
        device = next(self.quality.parameters()).device
        views = torch.stack([self.preprocess(im) for im in images]).to(device)
        semantic = self.semantic(images) if self.semantic is not None else {}
        emb = present = None
        if self.prompt_encoder is not None:
            emb, present = self.prompt_encoder(prompts or [None] * len(images))
        score, gates = self(views, semantic, emb, present)
        return {"score": score, "gates": gates, "semantic": semantic}

    # -- checkpoints --------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the quality branch and MoE, without a frozen pretrained backbone (but with
        the stages of it that train, ``trainable_stages``)."""
        self._refuse_if_inference_only("give a checkpoint's weights")
        sd = {f"quality.{k}": v for k, v in self.quality.state_dict().items()}
        sd.update({f"moe.{k}": v for k, v in self.moe.state_dict().items()})
        sd.update({f"heads.{k}": v for k, v in self.heads.state_dict().items()})
        if self.probe is not None:
            sd.update({f"probe.{k}": v for k, v in self.probe.state_dict().items()})
        if backbone_from_source(self.cfg):
            trained = {f"quality.backbone.{k}" for k in self._trained_backbone_keys()}
            sd = {k: v for k, v in sd.items() if not k.startswith("quality.backbone.") or k in trained}
        return sd

    def _trained_backbone_keys(self) -> set[str]:
        backbone = self.quality.backbone
        stages = {id(m) for m in backbone.trainable_modules()}
        keys = set()
        for name, module in backbone.named_modules():
            if id(module) in stages:
                keys |= {f"{name}.{k}" for k in module.state_dict()}
        return keys

    @property
    def trained(self) -> bool:
        """Whether the heads, as last loaded or saved, differ from their seeded initialisation."""
        return self.checkpoint_hash != self.init_hash

    @property
    def model_id(self) -> str:
        """Names a score's origin (``checkpoint.identity``): config name @ digest of the weights (as last loaded or
        saved), the config and the MLLM's identity; ``checkpoint.model_id`` gives the same from the files."""
        return identity(self.cfg, self.checkpoint_hash if self.trained else UNTRAINED, self.base_dir)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        self._refuse_if_inference_only("be saved")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = ModelConfig.from_dict(self.cfg.to_dict())
        named = loaded_fingerprints(self.cfg, self.base_dir)  # before a folder is copied over its source
        for sub, part_cfg in (("semantic", cfg.semantic), ("prompt", cfg.prompt)):
            if part_cfg is not None and hub.is_local(part_cfg.model_id, self.base_dir):
                source = hub.resolve(part_cfg.model_id, self.base_dir)
                if Path(source).resolve() != (directory / sub).resolve():
                    shutil.rmtree(directory / sub, ignore_errors=True)
                    shutil.copytree(source, directory / sub)
                part_cfg.model_id = sub
        sd = {k: v.detach().cpu().contiguous() for k, v in self.trainable_state_dict().items()}
        self.checkpoint_hash = weights_hash(sd)  # the weights may have been trained since __init__
        metadata = {"format": "pt", "ma_agiqa_config": cfg.name}
        if not self.trained:
            metadata[UNTRAINED_KEY] = UNTRAINED
        metadata.update(recorded_metadata(named, cfg, self.checkpoint_hash if self.trained else None, directory))
        save_file(sd, str(directory / WEIGHTS_FILE), metadata=metadata)
        (directory / CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        return directory


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    return hash_weights(
        (k, state_dict[k].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim too (BatchNorm counters)
        for k in sorted(state_dict)
    )


def _build(cfg: ModelConfig, base_dir: str | None, device, with_semantic: bool, with_prompt: bool, load_backbone: bool):
    semantic = None
    if cfg.semantic is not None:
        cfg.semantic._base_dir = base_dir
        recorded = getattr(cfg.semantic, "_width", None)  # the width a checkpoint's heads were built for
        if with_semantic:
            semantic = SemanticExtractor.from_config(cfg.semantic, base_dir, device, expected_width=recorded)
            width = semantic.hidden_size
        else:
            width = cfg.semantic.hidden_size  # recorded, else read from the MLLM's config.json
        for expert in cfg.moe.experts:
            if expert.source == "semantic":
                expert.dim = width
        cfg.semantic._width = width
    prompt = PromptEncoder(cfg.prompt, base_dir).to(device) if cfg.prompt is not None and with_prompt else None
    return MAAGIQA(cfg, semantic, prompt, load_pretrained_backbone=load_backbone, base_dir=base_dir)


def create_model(
    name_or_dir: str | os.PathLike,
    device: str | torch.device = "cpu",
    with_semantic: bool = True,
    with_prompt: bool = True,
    shipped: bool = True,
    **overrides,
) -> MAAGIQA:
    """A registered config by name (with its shipped checkpoint if it has one and ``shipped``; else freshly
    initialised) or a checkpoint directory. ``overrides`` apply to whichever config that is: on a checkpoint
    (a directory, or a shipped one) they change it before its weights load (``from_pretrained``).

    ``with_semantic=False`` skips loading the MLLM (for training against cached features, or a quality-only
    stage); ``overrides`` replace top-level config fields (e.g. ``semantic=...``)."""
    directory = checkpoint_dir(name_or_dir) if shipped else directory_of(name_or_dir)
    if directory is not None:
        return from_pretrained(directory, device, with_semantic, with_prompt, **overrides)
    cfg = get_config(str(name_or_dir))
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return _build(cfg, None, device, with_semantic, with_prompt, load_backbone=True).to(device).eval()


def from_pretrained(
    directory: str | os.PathLike, device: str | torch.device = "cpu", with_semantic: bool = True, with_prompt: bool = True,
    **overrides,
) -> MAAGIQA:
    """Load a checkpoint directory; a registered name builds that config (with its shipped weights, if any).
    ``overrides`` replace top-level config fields before the weights load (to fine-tune it another way: a
    dropout, trainable stages); one that changes a tensor's name or shape is refused (ValueError)."""
    local = directory_of(directory)  # a remote checkpoint (s3://...) is fetched into the node's cache
    if local is None:
        if not Path(str(directory)).exists() and str(directory) in list_models():
            return create_model(str(directory), device, with_semantic, with_prompt, **overrides)
        raise FileNotFoundError(f"{directory} is neither a checkpoint directory (no {CONFIG_FILE}) nor a registered model")
    directory = local
    cfg = load_config(directory)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    sd = load_file(str(directory / WEIGHTS_FILE))
    backbone_in_file = any(k.startswith("quality.backbone.") for k in sd)
    # a frozen backbone comes from its source (the file holds at most the stages of it that trained), a
    # trained one from the file
    load_backbone = backbone_from_source(cfg) or not backbone_in_file
    model = _build(cfg, str(directory), device, with_semantic, with_prompt, load_backbone=load_backbone)
    expected = model.trainable_state_dict()
    # trainable backbone stages an override asks for come from the source where the file lacks them
    missing = sorted(k for k in set(expected) - set(sd) if not (load_backbone and k.startswith("quality.backbone.")))
    unexpected = sorted(set(sd) - set(expected) - {k for k in sd if k.startswith("quality.backbone.")})
    reshaped = sorted(k for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    if missing or unexpected or reshaped:
        what = f"with {', '.join(sorted(overrides))} changed" if overrides else "its config"
        raise ValueError(f"{directory}: checkpoint does not fit {what}: missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}, another shape {reshaped[:5]}")
    model.load_state_dict(sd, strict=False)
    model.checkpoint_hash = weights_hash(model.trainable_state_dict())
    if load_config_untrained(directory):
        model.checkpoint_hash = model.init_hash  # saved as initialised (the same seeded weights)
    return model.to(device).eval()


def load_config_untrained(directory: Path) -> bool:
    from .checkpoint import stored_metadata

    return bool(stored_metadata(directory / WEIGHTS_FILE).get(UNTRAINED_KEY))


def load_semantic(name_or_dir: str | os.PathLike, device: str | torch.device = "cpu") -> SemanticExtractor:
    """Only the semantic branch of a model, for a pipeline stage of its own."""
    cfg = load_config(name_or_dir)
    if cfg.semantic is None:
        raise ValueError(f"{cfg.name} has no semantic branch")
    directory = checkpoint_dir(name_or_dir)
    recorded = getattr(cfg.semantic, "_width", None)
    return SemanticExtractor.from_config(cfg.semantic, str(directory) if directory else None, device, expected_width=recorded)


class EnsembleError(ValueError):
    """Models that cannot be members of one ensemble."""


def check_members(members: list) -> None:
    """Single heads of one config, trained on the same data, on one backbone: anything else would be averaged
    into a score that means nothing, or (an ensemble given as a member) lose its other heads and probe."""
    first = members[0]
    backbone = first.quality.backbone.state_dict()
    for m in members:
        if m.cfg.ensemble.heads > 1 or m.cfg.ensemble.probe:
            raise EnsembleError(f"{m.cfg.name} ({m.model_id}) is an ensemble itself ({m.cfg.ensemble.heads} head(s)"
                                f"{', a probe' if m.cfg.ensemble.probe else ''}): members are single heads, such as "
                                "the head-K runs an ensemble was trained from")
    for m in members[1:]:
        if (m.cfg.quality, m.cfg.moe, m.cfg.mos_mean, m.cfg.mos_std) != (
                first.cfg.quality, first.cfg.moe, first.cfg.mos_mean, first.cfg.mos_std):
            raise EnsembleError("ensemble members must share the config and the MOS normalisation (the same training data)")
        if any(not torch.equal(v, backbone[k]) for k, v in m.quality.backbone.state_dict().items()):
            raise EnsembleError("ensemble members must share the backbone's weights")


def assemble_ensemble(members: list, probe: tuple | None = None, probe_weight: float = 0.5, name: str | None = None):
    """One model from trained single-head models of the same config (seeds apart) and, optionally, a fitted
    probe ((mean, scale, weight, bias) from ``fit_probe``): the first model's config with ``ensemble`` set, its
    weights and the others' heads. Save it with ``save_pretrained``; ``from_pretrained`` loads it."""
    from .config import EnsembleConfig

    check_members(members)
    first = members[0]
    d = first.cfg.to_dict()
    d["name"] = name or first.cfg.name
    cfg = ModelConfig.from_dict(d)
    cfg.ensemble = EnsembleConfig(heads=len(members), probe=probe is not None, probe_weight=probe_weight)
    if first.cfg.semantic is not None:
        cfg.semantic._base_dir = getattr(first.cfg.semantic, "_base_dir", None)
        cfg.semantic._width = first.cfg.semantic._width
    model = MAAGIQA(cfg, first.semantic, first.prompt_encoder, load_pretrained_backbone=False, base_dir=first.base_dir)
    model.quality.load_state_dict(first.quality.state_dict())  # the backbone too: the members' shared one
    model.moe.load_state_dict(first.moe.state_dict())
    for head, m in zip(model.heads, members[1:]):
        head.quality.load_state_dict({k: v for k, v in m.quality.state_dict().items() if not k.startswith("backbone.")})
        head.moe.load_state_dict(m.moe.state_dict())
    if probe is not None:
        model.probe.set(*probe)
    return model.to(next(first.parameters()).device).eval()
