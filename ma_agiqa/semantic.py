"""The semantic branch: a frozen multimodal LLM asked the MA-AGIQA questions, read out as vectors.

For each image and each prompt, one forward pass of the MLLM's base model (no LM head, so no logits and
no generation), and the last hidden layer pooled into one vector. Where the model accepts pre-computed
encoder outputs (transformers' ``mm_encoder_outputs``), the image is encoded once and reused for every
prompt.
"""
from __future__ import annotations

import inspect

import torch
from PIL import Image
from torch import nn

from .config import SemanticConfig
from .hub import resolve
from .images import resize_for_semantic

# Processor outputs that describe the text; everything else describes the images.
_TEXT_KEYS = {"input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids", "position_ids"}


def load_vlm(model_id: str, revision: str | None = None, device: str | torch.device = "cpu"):
    """An image-text-to-text model and its processor, by hub id or local directory; bf16 on GPU."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(model_id, revision=revision, dtype=dtype)
    processor = AutoProcessor.from_pretrained(model_id, revision=revision)
    return model.to(device).eval(), processor


def pool_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """[B, T, D] -> [B, D] over the real (non-padding) tokens: their mean, or the last one."""
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
    # The last real token, for left or right padding alike.
    positions = torch.arange(hidden.shape[1], device=hidden.device).expand_as(attention_mask)
    last = torch.where(attention_mask.bool(), positions, -1).amax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class SemanticExtractor(nn.Module):
    """Wraps any transformers image-text-to-text model; returns {prompt name: [B, hidden] float32}."""

    def __init__(self, model: nn.Module, processor, cfg: SemanticConfig):
        super().__init__()
        self.cfg = cfg
        # The base model (vision tower + projector + LLM body) is all we run: the LM head stays unused.
        self.model = model.base_model if hasattr(model, "base_model") else model
        self.model.requires_grad_(False)
        self.processor = processor
        tokenizer = getattr(processor, "tokenizer", None)
        if tokenizer is not None:
            # Right padding: with causal attention the real tokens never see the pads, so a padded batch
            # gives the same vectors as images one by one.
            tokenizer.padding_side = "right"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        self.reuse_image_encoding = self._supports_encoder_reuse()

    @classmethod
    def from_config(cls, cfg: SemanticConfig, base_dir: str | None = None, device="cpu") -> "SemanticExtractor":
        model_id = resolve(cfg.model_id, base_dir)
        model, processor = load_vlm(model_id, cfg.revision, device)
        return cls(model, processor, cfg)

    def _supports_encoder_reuse(self) -> bool:
        params = inspect.signature(self.model.forward).parameters
        return "mm_encoder_outputs" in params and hasattr(self.model, "get_image_features")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def chat_text(self, prompt: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True)

    @torch.inference_mode()
    def forward(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        images = [resize_for_semantic(im, self.cfg.max_image_side) for im in images]
        out: dict[str, torch.Tensor] = {}
        encoded = None
        for name, prompt in self.cfg.prompts.items():
            text = self.chat_text(prompt)
            inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True)
            inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            image_inputs = {k: v for k, v in inputs.items() if k not in _TEXT_KEYS}
            for k, v in image_inputs.items():
                if v.is_floating_point():
                    image_inputs[k] = v.to(self.dtype)
            if self.reuse_image_encoding:
                if encoded is None:
                    accepted = inspect.signature(self.model.get_image_features).parameters
                    encoded = self.model.get_image_features(
                        **{k: v for k, v in image_inputs.items() if k in accepted}, return_dict=True
                    )
                kwargs = {k: v for k, v in inputs.items() if k not in ("pixel_values", "pixel_values_videos")}
                hidden = self.model(**kwargs, mm_encoder_outputs={"image": encoded}).last_hidden_state
            else:
                hidden = self.model(**{**inputs, **image_inputs}).last_hidden_state
            out[name] = pool_hidden(hidden.float(), inputs["attention_mask"], self.cfg.pooling)
        return out
