"""Checkpoint directories (config.json + model.safetensors) and model identities, read without torch.

A job's driver needs a model's config (its experts, prompts, views) and its id to plan the job and to resume
it, but never its tensors: reading both from the files keeps torch, timm and transformers out of the driver,
whose seconds of imports would otherwise slow Ray's start on the same cores. Nothing here builds a model
(``model.py`` imports this module, never the other way round).

A model's id (the score table's ``model`` column, the resume key) is ``<config name>@<digest>``, the digest
covering everything that changes a score: the trained weights (heads, and a backbone the checkpoint stores),
the config (backbone and its source, prompts, their order, pooling, framing, dtype, views, MOS scale), and
the MLLM's and prompt encoder's identity (hub id + revision, or a local folder's config and weight files).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable

from .config import ModelConfig
from .registry import get_config
from .uris import is_remote

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# safetensors metadata of a checkpoint whose heads were saved as initialised, never trained (its value: the
# initialisation, as in ``UNTRAINED``); checkpoints without it hold trained weights.
UNTRAINED_KEY = "ma_agiqa_untrained"
# Recorded at save time, for a driver that reads only a remote checkpoint's header: the weights hash the id
# names (the hash of the tensors it holds), and the fingerprints of the model folders saved beside the heads
# (JSON: {"semantic": ..., "prompt": ...}). Checkpoints without them are read whole to work the id out.
WEIGHTS_HASH_KEY = "ma_agiqa_weights"
LOADED_KEY = "ma_agiqa_loaded"
# What a driver keeps of a remote checkpoint's weights file: its first 8 bytes and its JSON header.
HEADER_FILE = "model.safetensors.header"
# Files a driver leaves on the store: weights (the heads' header aside), which only the model actors load.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
INIT_SEED = 0  # random initialisation is seeded, so every actor that builds a model builds the same one
UNTRAINED = f"untrained:seed={INIT_SEED}"


def hash_weights(tensors: Iterable[tuple[str, bytes]]) -> str:
    """The weights hash: sha256 over (name, raw little-endian bytes) pairs given in name order (one tensor's
    bytes at a time, never a copy of all the weights)."""
    h = hashlib.sha256()
    for name, data in tensors:
        h.update(name.encode())
        h.update(data)
    return h.hexdigest()[:12]


def stored_tensors(path: str | os.PathLike) -> Iterable[tuple[str, bytes]]:
    """(name, raw bytes) of every tensor in a safetensors file in name order, read through
    ``safetensors.safe_open`` one tensor at a time (never a copy of all the weights): the file stores each
    tensor's bytes as torch holds them, so hashing these equals hashing the loaded tensors. A dtype numpy
    lacks (bfloat16) is read through torch, which only such a checkpoint costs."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        for name in sorted(f.keys()):
            try:
                data = f.get_tensor(name).tobytes()
            except TypeError:  # numpy has no such dtype
                data = _torch_bytes(path, name)
            yield name, data


def _torch_bytes(path, name: str) -> bytes:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def stored_metadata(path: str | os.PathLike) -> dict:
    """The ``__metadata__`` of a safetensors file, from its header alone (or from the header kept beside it,
    ``HEADER_FILE``, where a driver copied no more of a remote checkpoint)."""
    path = Path(path)
    if not path.exists() and (path.parent / HEADER_FILE).exists():
        path = path.parent / HEADER_FILE
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little"))).get("__metadata__") or {}


def shipped_checkpoint(name: str) -> Path | None:
    """Trained heads shipped inside the package (``ma_agiqa/checkpoints/<name>``), if any."""
    path = Path(__file__).parent / "checkpoints" / name
    return path if (path / CONFIG_FILE).is_file() else None


def directory_of(name_or_dir: str | os.PathLike) -> Path | None:
    """The local checkpoint directory a path or URI points to: a remote one (``s3://bucket/ckpt/``) is fetched
    once per node into the cache (``fetch_checkpoint``)."""
    if is_remote(name_or_dir):
        return fetch_checkpoint(str(name_or_dir))
    path = Path(str(name_or_dir).removeprefix("file://"))
    return path if (path / CONFIG_FILE).is_file() else None


def checkpoint_dir(name_or_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory a model reference points to (a directory, or a name with shipped weights)."""
    return directory_of(name_or_dir) or shipped_checkpoint(str(name_or_dir))


def read_config(directory: Path) -> ModelConfig:
    """A checkpoint directory's config. Its semantic config remembers the directory, for a relative MLLM
    folder (``semantic``)."""
    cfg = ModelConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    if cfg.semantic is not None:
        cfg.semantic._base_dir = str(directory)
    return cfg


def load_config(name_or_dir: str | os.PathLike) -> ModelConfig:
    """A model's config without building it: what a driver needs to plan a job (experts, prompts)."""
    directory = checkpoint_dir(name_or_dir)
    if directory is not None:
        return read_config(directory)
    if is_remote(name_or_dir):
        raise KeyError(f"{name_or_dir} holds no checkpoint ({CONFIG_FILE})")
    return get_config(str(name_or_dir))


def backbone_from_source(cfg: ModelConfig) -> bool:
    """A frozen pretrained backbone is loaded from its source, so a checkpoint leaves it out (the config names
    it and its source, so the id still covers it)."""
    return cfg.quality.freeze_backbone and cfg.quality.pretrained is not None


def identity(cfg: ModelConfig, weights: str, base_dir: str | os.PathLike | None = None) -> str:
    """``<name>@<digest>``: the digest of the weights (their hash, or ``UNTRAINED``), the config as it acts on a
    score (the training settings and the name aside) and the identity of the models it loads from elsewhere
    (``loaded_fingerprints``)."""
    d = cfg.to_dict()
    d.pop("name")
    d.pop("train", None)
    for expert in d["moe"]["experts"]:
        if expert["source"] in ("semantic", "stats"):
            expert["dim"] = None  # the MLLM's or backbone's width: recorded once built, implied before; the same model
    loaded = loaded_fingerprints(cfg, base_dir)
    for role in loaded:
        d[role].pop("model_id")  # a folder's name says nothing: its fingerprint does
    key = json.dumps({"weights": weights, "config": d, "loaded": loaded}, sort_keys=True)
    return f"{cfg.name}@{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def loaded_fingerprints(cfg: ModelConfig, base_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """{role: fingerprint} of the models a config loads from elsewhere (``hub.fingerprint``: a local folder by
    content, a hub id by id and revision). A folder saved beside a checkpoint's heads keeps the fingerprint its
    model had when saved (``LOADED_KEY``: a built-in tiny model copied in stays the same model) while its
    content is what was saved; changed, its content names it. A driver's copy of a remote checkpoint, which
    holds no weights, takes the recorded one (``NeedsWeights`` if none was)."""
    from .hub import fingerprint

    base = str(base_dir) if base_dir is not None else None
    inside = set(carried(cfg, Path(base))) if base is not None else set()
    recorded = _recorded_loaded(Path(base)) if inside else {}
    partial = base is not None and is_partial(Path(base))
    out = {}
    for role, part in loaded_models(cfg):
        rec = recorded.get(role) if role in inside else None
        if partial and role in inside:
            if rec is None:
                raise NeedsWeights(base)
            out[role] = rec["fingerprint"]
            continue
        fp = fingerprint(part.model_id, base, getattr(part, "revision", None))
        out[role] = rec["fingerprint"] if rec is not None and rec.get("content") == fp else fp
    return out


def _recorded_loaded(directory: Path) -> dict:
    if not (directory / WEIGHTS_FILE).exists() and not (directory / HEADER_FILE).exists():
        return {}
    return json.loads(stored_metadata(directory / WEIGHTS_FILE).get(LOADED_KEY) or "{}")


def loaded_models(cfg: ModelConfig) -> list[tuple[str, object]]:
    """(role, its config) of each model a config loads from elsewhere: the MLLM, the prompt encoder."""
    return [(role, part) for role, part in (("semantic", cfg.semantic), ("prompt", cfg.prompt)) if part is not None]


def carried(cfg: ModelConfig, directory: Path) -> list[str]:
    """The roles whose model folder lies inside a checkpoint directory (saved beside the heads)."""
    return [role for role, part in loaded_models(cfg)
            if not os.path.isabs(part.model_id) and (Path(directory) / part.model_id).is_dir()]


def recorded_metadata(named: dict[str, str], saved: ModelConfig, weights_hash: str | None, directory: Path) -> dict:
    """What a checkpoint's header records (``WEIGHTS_HASH_KEY``, ``LOADED_KEY``), for a driver that reads
    nothing else of it and for the folders saved beside the heads: ``named`` is the saved model's
    ``loaded_fingerprints`` before saving, ``saved`` its config as saved, its folders already in ``directory``."""
    from .hub import fingerprint

    parts = dict(loaded_models(saved))
    loaded = {role: {"fingerprint": named[role],
                     "content": fingerprint(parts[role].model_id, str(directory), getattr(parts[role], "revision", None))}
              for role in carried(saved, directory)}
    out = {WEIGHTS_HASH_KEY: weights_hash} if weights_hash else {}
    return {**out, LOADED_KEY: json.dumps(loaded, sort_keys=True)}


class NeedsWeights(LookupError):
    """A driver's copy of a remote checkpoint (its header) records too little to name the model: an older
    checkpoint, read whole instead."""


def is_partial(directory: Path) -> bool:
    """A driver's copy of a remote checkpoint: its config, small files and weights header, no weights."""
    return not (directory / WEIGHTS_FILE).exists() and (directory / HEADER_FILE).exists()


def stored_weights(directory: Path, cfg: ModelConfig) -> str:
    """A checkpoint's weights as its id names them: the hash of its tensors (without a backbone that comes from
    its source), or ``UNTRAINED`` for heads saved as initialised."""
    path = directory / WEIGHTS_FILE
    marker = stored_metadata(path).get(UNTRAINED_KEY)
    if marker:
        return marker
    tensors = stored_tensors(path)
    if backbone_from_source(cfg) and not cfg.quality.trainable_stages:  # else the file holds the stages that trained
        tensors = ((k, v) for k, v in tensors if not k.startswith("quality.backbone."))
    return hash_weights(tensors)


def model_id(name_or_dir: str | os.PathLike) -> str:
    """The ``model`` value a scoring run with this model writes: what resume and curation compare score rows
    with. Read from a checkpoint's files, or from a registered config alone (its heads as initialised); no
    model is built."""
    directory = checkpoint_dir(name_or_dir)
    return model_id_of(read_config(directory) if directory else load_config(name_or_dir), directory)


def model_id_of(cfg: ModelConfig, directory: Path | None) -> str:
    """``model_id`` of a config and the checkpoint directory it was read from (None: a registered config
    without shipped weights, its heads as initialised)."""
    if directory is None:
        return identity(cfg, UNTRAINED)
    if not is_partial(directory):
        return identity(cfg, stored_weights(directory, cfg), directory)
    meta = stored_metadata(directory / WEIGHTS_FILE)
    weights = meta.get(UNTRAINED_KEY) or meta.get(WEIGHTS_HASH_KEY)
    if weights is None:
        raise NeedsWeights(str(directory))
    return identity(cfg, weights, directory)


def is_trained(name_or_dir: str | os.PathLike) -> bool:
    """Whether a model's heads were trained: a checkpoint not saved as initialised, or a registered config
    that ships trained heads. A registered config without them has random heads, whose scores mean nothing."""
    return trained_at(checkpoint_dir(name_or_dir))


def trained_at(directory: Path | None) -> bool:
    """``is_trained`` of a checkpoint directory (None: no checkpoint), from its weights file's metadata alone."""
    return directory is not None and not stored_metadata(directory / WEIGHTS_FILE).get(UNTRAINED_KEY)


def untrained_message(name_or_dir) -> str:
    return (
        f"--model {name_or_dir}: its heads were never trained (random weights), so its scores would mean nothing. "
        "Score with a trained checkpoint (jobs.train writes one; --model takes its directory or s3:// URI) or a "
        "model that ships trained heads (ma-agiqa-offline-quality, the default; ma-agiqa-offline), or pass --allow-untrained for a smoke run"
    )


# -- checkpoints on object storage --------------------------------------------------------------------------
def _cache_target(fs, root: str, uri: str) -> Path:
    """Where a remote checkpoint is copied on this node: keyed by the URI and its weights file's size and
    ETag/mtime, so a checkpoint overwritten in place is fetched again."""
    from .cache import cache_dir

    fs.invalidate_cache(root)  # a filesystem instance is shared: ask the store, not an earlier listing
    try:
        info = fs.info(f"{root}/{WEIGHTS_FILE}")
    except FileNotFoundError:
        raise KeyError(f"{uri} holds no checkpoint ({WEIGHTS_FILE})") from None
    version = [uri.rstrip("/"), info.get("size"), str(info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or "")]
    key = hashlib.sha256(json.dumps(version).encode()).hexdigest()[:16]
    return cache_dir() / "checkpoints" / f"{root.rstrip('/').rsplit('/', 1)[-1]}-{key}"


def _copy_into_place(uri: str, target: Path, copy) -> Path:
    """Runs ``copy(tmp)`` into a temporary sibling of ``target`` renamed in place, so that several processes on
    a node never see a half-copied checkpoint."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        copy(tmp)
        if not (tmp / CONFIG_FILE).is_file():
            raise KeyError(f"{uri} holds no checkpoint ({CONFIG_FILE})")
        try:
            os.rename(tmp, target)
        except OSError:  # another process on this node got there first: its copy is the same
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_checkpoint(uri: str) -> Path:
    """A checkpoint directory on any fsspec store (``s3://bucket/ckpt/``), copied whole once per node into
    ``<cache>/checkpoints/`` (what the model actors load)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri.rstrip("/"))
    target = _cache_target(fs, root, uri)
    if (target / CONFIG_FILE).is_file():
        return target

    def copy(tmp: Path):
        for path in fs.find(root):
            rel = path[len(root):].lstrip("/")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(tmp / rel))

    return _copy_into_place(uri, target, copy)


def fetch_checkpoint_head(uri: str) -> Path:
    """What a driver needs of a remote checkpoint, copied once per node: config.json and the other small files
    (an MLLM folder's configs, which say how it frames images), and of the weights file only its header
    (two ranged reads: 8 bytes of length, then the JSON), kept as ``HEADER_FILE``. No weights are read; a
    node that already holds the whole checkpoint uses it."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(uri.rstrip("/"))
    full = _cache_target(fs, root, uri)
    if (full / CONFIG_FILE).is_file():
        return full
    target = full.with_name(full.name + ".head")
    if (target / CONFIG_FILE).is_file():
        return target

    def copy(tmp: Path):
        for path in fs.find(root):
            rel = path[len(root):].lstrip("/")
            if rel == WEIGHTS_FILE:
                length = fs.cat_file(path, start=0, end=8)
                header = fs.cat_file(path, start=8, end=8 + int.from_bytes(length, "little"))
                (tmp / HEADER_FILE).write_bytes(length + header)
            elif not rel.endswith(WEIGHT_SUFFIXES):
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(path, str(tmp / rel))

    return _copy_into_place(uri, target, copy)
