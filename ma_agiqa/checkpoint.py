"""Checkpoint directories (config.json + model.safetensors) read without torch.

A job's driver needs a model's config (its experts, prompts, views) and its id (config name @ weights hash)
to plan the job and to resume it, but never its tensors: reading both from the files keeps torch, timm and
transformers out of the driver, whose seconds of imports would otherwise slow Ray's start on the same cores.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from pathlib import Path
from typing import Iterable

from .config import ModelConfig
from .registry import get_config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def hash_weights(tensors: Iterable[tuple[str, bytes]]) -> str:
    """The weights hash of a model id: sha256 over (name, raw little-endian bytes) pairs given in name order
    (one tensor's bytes at a time, never a copy of all the weights)."""
    h = hashlib.sha256()
    for name, data in tensors:
        h.update(name.encode())
        h.update(data)
    return h.hexdigest()[:12]


def stored_tensors(path: str | os.PathLike) -> Iterable[tuple[str, memoryview]]:
    """(name, raw bytes) of every tensor in a safetensors file in name order, from its header's offsets: the
    file stores each tensor's bytes as torch holds them, so hashing these equals hashing the loaded tensors.
    The file is mapped, not read: the bytes come from the page cache one tensor at a time."""
    with open(path, "rb") as f:
        data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + header_len]))
    base = 8 + header_len
    for name in sorted(k for k in header if k != "__metadata__"):
        start, end = header[name]["data_offsets"]
        yield name, data[base + start : base + end]


def shipped_checkpoint(name: str) -> Path | None:
    """Trained heads shipped inside the package (``ma_agiqa/checkpoints/<name>``), if any."""
    path = Path(__file__).parent / "checkpoints" / name
    return path if (path / CONFIG_FILE).is_file() else None


def directory_of(name_or_dir: str | os.PathLike) -> Path | None:
    path = Path(name_or_dir)
    return path if (path / CONFIG_FILE).is_file() else None


def checkpoint_dir(name_or_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory a model reference points to (a directory, or a name with shipped weights)."""
    return directory_of(name_or_dir) or shipped_checkpoint(str(name_or_dir))


def load_config(name_or_dir: str | os.PathLike) -> ModelConfig:
    """A model's config without building it: what a driver needs to plan a job (experts, prompts)."""
    directory = checkpoint_dir(name_or_dir)
    if directory is not None:
        return ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    return get_config(str(name_or_dir))


def backbone_from_source(cfg: ModelConfig) -> bool:
    """A frozen pretrained backbone is loaded from its source, so a checkpoint's id leaves it out."""
    return cfg.quality.freeze_backbone and cfg.quality.pretrained is not None


def model_id(name_or_dir: str | os.PathLike) -> str:
    """The ``model`` value a scoring run with this model writes (config name @ weights hash): what resume and
    curation compare score rows with. A checkpoint's is read from its files; only a registered config
    without weights (initialised from a seed) is built, with torch, to hash what it initialises."""
    directory = checkpoint_dir(name_or_dir)
    if directory is None:
        from .model import create_model

        return create_model(name_or_dir, with_semantic=False, with_prompt=False).model_id
    cfg = load_config(directory)
    tensors = stored_tensors(directory / WEIGHTS_FILE)
    if backbone_from_source(cfg):
        tensors = ((k, v) for k, v in tensors if not k.startswith("quality.backbone."))
    return f"{cfg.name}@{hash_weights(tensors)}"
