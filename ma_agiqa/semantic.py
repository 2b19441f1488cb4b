"""The semantic branch: a frozen multimodal LLM asked the MA-AGIQA questions, read out as vectors.

For each image and each prompt, one forward pass of the MLLM's base model (no LM head, so no logits and no
generation, and no KV cache), and the last hidden layer pooled into one vector. As the reference
(``getFeature.py`` of the MA-AGIQA repository): the question comes first and the image after it, so the image
tokens attend to the question under causal attention, and the image is padded to a square with the image
processor's mean colour before the processor sees it. Both are config fields (``prompt_order``, ``framing``).

What the model states is read from it, never declared: the vector width from the loaded model's text config,
the padding colour from its image processor, the image side from its image processor's size. The processor's
image work runs once per batch of images, not once per prompt, and where the model accepts pre-computed encoder
outputs (transformers' ``mm_encoder_outputs``) the vision tower runs once too, for every prompt.
"""
from __future__ import annotations

import inspect
import os

import torch
from PIL import Image
from torch import nn

from .config import SemanticConfig
from .framing import Framing, expand_to_square, fill_colour, fixed_side  # noqa: F401 - expand_to_square re-exported
from .hub import resolve

PIXEL_KEYS = ("pixel_values", "pixel_values_videos")


# Set to the config's dtype ("bfloat16") to run the MLLM in it on CPU too: a 7B model's float32 weights (28 GB)
# do not fit a 24 GB machine, its bf16 ones do (benchmarks/real_size.py sets it).
CPU_DTYPE_ENV = "MA_AGIQA_CPU_DTYPE"


def inference_dtype(cfg: SemanticConfig, device: str | torch.device) -> torch.dtype:
    """The MLLM's dtype: the config's (bf16 by default) on a GPU, float32 on CPU (bf16 matmuls are slow on most
    CPUs) unless ``MA_AGIQA_CPU_DTYPE`` names another."""
    if torch.device(device).type != "cuda":
        name = os.environ.get(CPU_DTYPE_ENV, "float32")
        if name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"{CPU_DTYPE_ENV}={name!r}: not float32, bfloat16 or float16")
        return getattr(torch, name)
    return getattr(torch, cfg.dtype)


def load_vlm(model_id: str, revision: str | None = None, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None):
    """An image-text-to-text model's base model (vision tower + projector + language model, without the LM head
    where transformers has a base class for it) and its processor, by hub id or local directory.

    The weights load straight onto ``device`` in ``dtype`` (``device_map``: no CPU copy first on a GPU), with
    PyTorch's SDPA attention."""
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MODEL_MAPPING_NAMES
    from transformers.utils import logging as hf_logging

    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = AutoConfig.from_pretrained(model_id, revision=revision)
    if config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(
            f"{model_id} is a {config.model_type!r} model, not an image-text-to-text model transformers knows "
            "(AutoModelForImageTextToText); the semantic branch needs one"
        )
    kwargs = dict(revision=revision, dtype=dtype, attn_implementation="sdpa", output_loading_info=True)
    if device.type != "cpu":
        kwargs["device_map"] = {"": device}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the LM head's weights, left unread, are reported as unexpected keys
    try:
        model, missing = None, []
        if config.model_type in MODEL_MAPPING_NAMES:
            # The base class (LlavaModel, Qwen2VLModel) loads the checkpoint without its LM head. It maps only the
            # task model's current weight names: a checkpoint in an older layout (llava-hf's language_model.model.*)
            # leaves weights missing, and those would be random, so the task class, which maps both, loads it then.
            model, info = AutoModel.from_pretrained(model_id, **kwargs)
            if info["missing_keys"]:
                del model
                model = None
        if model is None:
            full, info = AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
            missing = [k for k in info["missing_keys"] if not k.startswith("lm_head")]
            prefix = getattr(full, "base_model_prefix", "")
            model = getattr(full, prefix) if prefix and isinstance(getattr(full, prefix, None), torch.nn.Module) else full
            del full
    finally:
        hf_logging.set_verbosity(verbosity)
    if missing:
        raise ValueError(f"{model_id}: the checkpoint lacks weights the model needs (they would be random): {missing[:5]}")
    processor = AutoProcessor.from_pretrained(model_id, revision=revision)
    return model.eval(), processor


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str,
                image_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T, D] -> [B, D] over the real (non-padding) tokens: the mean of all of them ("mean"), of the image
    tokens (``image_mask`` [B, T]: "image") or of the others ("text"), or the last one ("last")."""
    real = attention_mask.bool()
    if pooling == "last":  # the last real token, for left or right padding alike
        positions = torch.arange(hidden.shape[1], device=hidden.device).expand_as(real)
        last = torch.where(real, positions, -1).amax(1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling in ("image", "text"):
        if image_mask is None:
            raise ValueError(f"{pooling!r} pooling needs the image tokens' positions")
        real = real & (image_mask.bool() if pooling == "image" else ~image_mask.bool())
    elif pooling != "mean":
        raise ValueError(f"unknown pooling {pooling!r}")
    mask = real.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def pad_colour(image_processor) -> tuple[int, int, int]:
    """The reference's padding colour: the image processor's mean, as 0-255 integers (truncated, as it does)."""
    return fill_colour(getattr(image_processor, "image_mean", None))


def processor_side(image_processor) -> int | None:
    """The square side a fixed-size image processor brings a square image to; None for a dynamic-resolution one."""
    return fixed_side(getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None),
                      bool(getattr(image_processor, "do_center_crop", False)))


class SemanticExtractor(nn.Module):
    """Wraps any transformers image-text-to-text model; returns {prompt name: [B, hidden] float32}."""

    def __init__(self, model: nn.Module, processor, cfg: SemanticConfig, expected_width: int | None = None):
        super().__init__()
        self.cfg = cfg
        # The base model (vision tower + projector + LLM body) is all we run: a task model's LM head stays unused.
        prefix = getattr(model, "base_model_prefix", "")
        self.model = getattr(model, prefix) if prefix and isinstance(getattr(model, prefix, None), nn.Module) else model
        self.model.requires_grad_(False)
        self.processor = processor
        name = getattr(getattr(model, "config", None), "_name_or_path", "") or cfg.model_id
        self.hidden_size = int(self.model.config.get_text_config().hidden_size)
        if expected_width is not None and expected_width != self.hidden_size:
            raise ValueError(
                f"the MLLM {name} gives {self.hidden_size}-wide vectors, but this model's heads were built for "
                f"{expected_width}-wide ones: the checkpoint was trained with another MLLM"
            )
        self.image_token = getattr(processor, "image_token", None)
        if not self.image_token or not hasattr(processor, "image_processor") or not hasattr(processor, "tokenizer"):
            raise ValueError(f"{name}: its processor ({type(processor).__name__}) has no image token, image processor or tokenizer")
        model_token = getattr(self.model.config, "image_token_id", None)
        if model_token is None:
            model_token = getattr(self.model.config, "image_token_index", None)
        proc_token = getattr(processor, "image_token_id", None)
        if model_token is not None and proc_token is not None and model_token != proc_token:
            raise ValueError(
                f"{name}: the processor writes image token {proc_token} ({self.image_token}), the model reads {model_token}"
            )
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids(self.image_token)
        self.fill = pad_colour(processor.image_processor)
        self.side = processor_side(processor.image_processor)
        self.framing = Framing(pad=cfg.framing == "pad", fill=self.fill, side=self.side, max_side=cfg.max_image_side)
        tokenizer = processor.tokenizer
        # Right padding: with causal attention the real tokens never see the pads, so a padded batch gives the same
        # vectors as images one by one.
        tokenizer.padding_side = "right"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.texts = {key: self.chat_text(prompt) for key, prompt in cfg.prompts.items()}
        self.reuse_image_encoding = self._supports_encoder_reuse()

    @classmethod
    def from_config(cls, cfg: SemanticConfig, base_dir: str | None = None, device="cpu",
                    expected_width: int | None = None) -> "SemanticExtractor":
        model_id = resolve(cfg.model_id, base_dir)
        model, processor = load_vlm(model_id, cfg.revision, device, inference_dtype(cfg, device))
        return cls(model, processor, cfg, expected_width)

    def _supports_encoder_reuse(self) -> bool:
        params = inspect.signature(self.model.forward).parameters
        return "mm_encoder_outputs" in params and hasattr(self.model, "get_image_features")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    # -- the prompt ---------------------------------------------------------------------------------------
    def _render(self, content: list[dict]) -> str:
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def chat_text(self, prompt: str) -> str:
        """The whole prompt in the model's chat template, with one image placeholder: after the question
        (``question-first``, the reference's ``question\\n<image>``) or before it (``image-first``)."""
        if self.cfg.prompt_order == "image-first":
            text = self._render([{"type": "image"}, {"type": "text", "text": prompt}])
        else:
            text = self._render([{"type": "text", "text": prompt + "\n"}, {"type": "image"}])
            if text.find(self.image_token) < text.find(prompt):
                # The template renders images before any text, whatever their order (llava-1.5's does): write the
                # placeholder into the text after the question, as the reference's prompt has it.
                text = self._render([{"type": "text", "text": f"{prompt}\n{self.image_token}"}])
        image_at, prompt_at = text.find(self.image_token), text.find(prompt)
        if text.count(self.image_token) != 1 or prompt_at < 0:
            raise ValueError(f"the chat template gave {text!r}: not one image placeholder and the question")
        if (image_at > prompt_at) != (self.cfg.prompt_order == "question-first"):
            raise ValueError(f"the chat template gave {text!r}, not in the {self.cfg.prompt_order} order")
        return text

    # -- the image ----------------------------------------------------------------------------------------
    def frame(self, img: Image.Image) -> Image.Image:
        """An image as the processor gets it (``framing.Framing``). ``pad`` (the reference): centred on a square
        of the processor's mean colour, then, for a fixed-size processor, resized to its side (so its own resize
        and centre crop change nothing). ``processor``: as it is, for the processor's own resize and crop. An
        image the job's decoding step framed already passes unchanged."""
        return self.framing(img)

    def encode_images(self, images: list[Image.Image]) -> tuple[dict, list[str]]:
        """The image processor's tensors for a batch, once, and each image's placeholder as the text must hold
        it (the image token repeated once per image embedding)."""
        image_inputs = self.processor.image_processor([self.frame(im) for im in images], return_tensors="pt")
        expansions = [self.processor.replace_image_token(image_inputs, i) for i in range(len(images))]
        return dict(image_inputs), expansions

    def encode_text(self, key: str, expansions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids of one prompt for every image of a batch, right-padded, as the processor would give them."""
        text = self.texts[key]
        texts = [text.replace(self.image_token, e, 1) for e in expansions]
        enc = self.processor.tokenizer(texts, padding=True, return_tensors="pt")
        out = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if getattr(self.processor, "return_mm_token_type_ids", False):
            out["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids(out["input_ids"].tolist()))
        return out

    # -- the forward --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def hidden_states(self, images: list[Image.Image], keys: list[str] | None = None):
        """{prompt key: (last hidden layer [B, T, D], the text inputs)} for a batch of images."""
        device, dtype = self.device, self.dtype
        image_inputs, expansions = self.encode_images(images)
        image_inputs = {
            k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
            for k, v in image_inputs.items() if isinstance(v, torch.Tensor)
        }
        extra = {k: v for k, v in image_inputs.items() if k not in PIXEL_KEYS}  # image_grid_thw, image_sizes
        encoded = None
        if self.reuse_image_encoding:
            accepted = inspect.signature(self.model.get_image_features).parameters
            encoded = self.model.get_image_features(
                **{k: v for k, v in image_inputs.items() if k in accepted}, return_dict=True
            )
        out = {}
        for key in keys or list(self.texts):
            text_inputs = {k: v.to(device) for k, v in self.encode_text(key, expansions).items()}
            if encoded is not None:
                result = self.model(**text_inputs, **extra, mm_encoder_outputs={"image": encoded}, use_cache=False)
            else:
                result = self.model(**text_inputs, **image_inputs, use_cache=False)
            out[key] = (result.last_hidden_state, text_inputs)
        return out

    def pool(self, hidden: torch.Tensor, text_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """One prompt's last hidden layer [B, T, D] -> [B, D] float32, pooled as the config says."""
        ids = text_inputs["input_ids"]
        return pool_hidden(hidden.float(), text_inputs["attention_mask"], self.cfg.pooling, ids == self.image_token_id)

    def forward(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        return {key: self.pool(hidden, inputs) for key, (hidden, inputs) in self.hidden_states(images).items()}
