"""The optional prompt expert's encoder: a sentence-transformers model (mean pooling + L2 norm, as
all-MiniLM-L6-v2 is trained to be used), run through plain transformers."""
from __future__ import annotations

import torch
from torch import nn

from .config import PromptConfig
from .hub import resolve


class PromptEncoder(nn.Module):
    def __init__(self, cfg: PromptConfig, base_dir: str | None = None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        path = resolve(cfg.model_id, base_dir)
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        if self.model.config.hidden_size != cfg.dim:
            raise ValueError(f"{cfg.model_id} has width {self.model.config.hidden_size}, the config says {cfg.dim}")

    @torch.inference_mode()
    def forward(self, prompts: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (embeddings [B, dim] float32, present [B] bool); a missing or blank prompt gives zeros."""
        present = torch.tensor([bool(p and p.strip()) for p in prompts], dtype=torch.bool)
        device = next(self.model.parameters()).device
        out = torch.zeros(len(prompts), self.cfg.dim, device=device)
        texts = [p for p in prompts if p and p.strip()]
        if texts:
            tok = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
            ).to(device)
            hidden = self.model(**tok).last_hidden_state.float()
            mask = tok["attention_mask"].unsqueeze(-1).float()
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)
            out[present.to(device)] = torch.nn.functional.normalize(emb, dim=-1)
        return out, present.to(device)
