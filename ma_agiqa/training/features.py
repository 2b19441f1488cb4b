"""The frozen inputs of training, computed once per image and cached (see ``cache`` for the cache's layout).

- The MLLM is frozen (as in MA-AGIQA): its vectors come from the scoring library (``ma_agiqa.scoring``) run
  with ``keep_features`` into a cache keyed by the semantic branch's hash (model, prompts, pooling); the
  scoring's resume logic makes the cache incremental, and a second run with the same MLLM loads no MLLM.
- A frozen backbone's feature maps are cached too (keyed by backbone, layers, grid and views), and the
  reference's flip/rot90 augmentation is applied to the cached maps instead of the pixels. With
  ``trainable_stages``, what is cached is the frozen stages' part: their levels and the input of the stages
  that train, which run in every step.
- A trainable backbone trains from the images' 8-bit views, kept in memory.
- The prompt encoder's embeddings are computed each time (a text encoder over short prompts: seconds).
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..fetch import Fetcher
from ..images import decode_image
from ..preprocess import normalize, quality_pixels
from ..schema import feature_column
from ..cache import cache_dir
from .cache import publish as publish_entry, read as read_entries

# The backbone cache's folder: entries published whole (``cache``). The layout before it (one features.npy,
# cut.npy and ids.json per key, in "backbone/") is not read: a cache is rebuilt, never migrated.
BACKBONE_CACHE = "backbone-v2"
CHUNK = 256  # images per computed (and published) entry: a kill loses at most one chunk's work


@dataclass
class Inputs:
    """Everything a batch needs, aligned with a frame's rows."""

    mos: np.ndarray  # [N]
    backbone: np.ndarray | None = None  # [N, C, g, g] float16, for a frozen backbone
    backbone_cut: np.ndarray | None = None  # [N, C', h, w] float16: the trainable stages' input (trainable_stages)
    pixels: np.ndarray | None = None  # [N, V, 3, s, s] uint8, for a trainable one
    semantic: dict | None = None  # prompt name -> [N, D] float32
    prompt: np.ndarray | None = None  # [N, d] float32
    prompt_present: np.ndarray | None = None  # [N] bool


def _load_pixels(df: pd.DataFrame, views, threads: int = 8) -> np.ndarray:
    from concurrent.futures import ThreadPoolExecutor

    fetcher = Fetcher()

    def one(uri):
        return quality_pixels(decode_image(fetcher.fetch(uri)), views).numpy()

    with ThreadPoolExecutor(threads) as pool:
        return np.stack(list(pool.map(one, df["uri"])))


def backbone_key(model) -> str:
    q = model.cfg.quality
    parts = [q.backbone, q.pretrained, list(q.layers), q.grid, q.backbone_kwargs, asdict(q.views)]
    if q.trainable_stages:  # another split of the backbone; the fully frozen caches keep their keys
        parts.append({"trainable_stages": q.trainable_stages})
    key = json.dumps(parts, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def backbone_cache_dir(model, root: Path) -> Path:
    return Path(root) / BACKBONE_CACHE / backbone_key(model)


@torch.inference_mode()
def backbone_features(model, df: pd.DataFrame, root: Path, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(feature maps of a frozen backbone for every row, None), from the cache where present; with
    ``trainable_stages``, (the frozen stages' levels, the trainable stages' input)."""
    directory = backbone_cache_dir(model, root)
    names = ["features", "cut"] if model.cfg.quality.trainable_stages else ["features"]
    cached = read_entries(directory, names)
    missing = df[~df["image_id"].isin(cached.keys())]
    backbone = model.quality.backbone
    for start in range(0, len(missing), CHUNK):
        chunk = missing.iloc[start : start + CHUNK]
        pixels = _load_pixels(chunk, model.cfg.quality.views)
        parts = []
        for i in range(0, len(chunk), batch_size):
            views = normalize(torch.from_numpy(pixels[i : i + batch_size]), model.cfg.quality.views).flatten(0, 1)
            outs = backbone.split(views) if len(names) == 2 else (model.quality.features(views),)
            parts.append([o.to(torch.float16).numpy() for o in outs])
        arrays = {name: np.concatenate([p[n] for p in parts]) for n, name in enumerate(names)}
        ids = chunk["image_id"].tolist()
        publish_entry(directory, ids, arrays)
        cached.update({i: tuple(arrays[name][k] for name in names) for k, i in enumerate(ids)})
    out = [np.stack([cached[i][n] for i in df["image_id"]]) for n in range(len(names))]
    stats = {"backbone_cached": len(df) - len(missing), "backbone_computed": len(missing)}
    return out[0], (out[1] if len(out) > 1 else None), stats


def semantic_cache_dir(model_ref: str, cfg, root: Path) -> Path:
    """Where the MLLM's vectors for ``cfg``'s semantic branch are kept: by its prompts and pooling and by the
    MLLM's weights."""
    from ..checkpoint import checkpoint_dir
    from ..hub import fingerprint

    base = checkpoint_dir(model_ref)
    weights = fingerprint(cfg.semantic.model_id, str(base) if base else None, cfg.semantic.revision)
    return Path(root) / "semantic" / f"{cfg.semantic.prompt_hash()}-{weights}"


def semantic_features(model_ref: str, cfg, df: pd.DataFrame, root: Path, address: str | None = None) -> tuple[dict, dict]:
    """The MLLM's vectors for every row, computed by the scoring library (``keep_features``) into a cache
    keyed by the semantic branch; only rows the cache lacks are scored. The cache is a score table: its
    parts are published whole and its current rows are read (``score_table.read_scores``)."""
    from ..scoring import ScoreRequest, score
    from ..score_table import read_scores
    from ..table_files import read_column

    directory = semantic_cache_dir(model_ref, cfg, root)
    have = set(read_column(str(directory), "image_id").to_pylist())
    todo = df[~df["image_id"].isin(have)]
    computed = 0
    if len(todo):
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "manifest.parquet"
            pq.write_table(pa.table({"id": todo["image_id"].tolist(), "uri": todo["uri"].tolist()}), manifest)
            # The vectors are the MLLM's, whatever the heads: random heads are fine here.
            summary = score(ScoreRequest(manifest=str(manifest), output=str(directory), model=str(model_ref),
                                         address=address, keep_features=True, allow_untrained=True,
                                         max_error_fraction=1.0))
            computed = summary["rows"]
    table = read_scores(str(directory))  # current rows: a retried row supersedes its error row
    index = {i: k for k, i in enumerate(table["image_id"].to_pylist())}
    rows = [index[i] for i in df["image_id"]]
    status = np.array(table["status"].to_pylist())[rows]
    if (status != "ok").any():
        bad = df["image_id"][status != "ok"].tolist()[:5]
        raise ValueError(f"the MLLM could not read {int((status != 'ok').sum())} images, e.g. {bad}")
    out = {}
    for name in cfg.semantic.prompts:
        col = table[feature_column(name)].combine_chunks()
        values = col.flatten().to_numpy().astype(np.float32).reshape(len(table), -1)
        out[name] = values[rows]
    return out, {"semantic_cached": len(df) - computed, "semantic_computed": computed}


@torch.inference_mode()
def prompt_features(model, df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    emb, present = [], []
    prompts = df["prompt"].tolist()
    for i in range(0, len(prompts), 256):
        e, p = model.prompt_encoder(prompts[i : i + 256])
        emb.append(e.cpu().numpy())
        present.append(p.cpu().numpy())
    return np.concatenate(emb), np.concatenate(present)


def prepare(model, model_ref: str, df: pd.DataFrame, root: Path | None = None, address: str | None = None) -> tuple[Inputs, dict]:
    """Compute (or load) every frozen input of ``df`` once."""
    root = Path(root) if root else cache_dir() / "features"
    stats = {}
    inputs = Inputs(mos=df["mos"].to_numpy(np.float32))
    if model.cfg.quality.freeze_backbone:
        inputs.backbone, inputs.backbone_cut, s = backbone_features(model, df, root)
        stats.update(s)
    else:
        inputs.pixels = _load_pixels(df, model.cfg.quality.views)
    if model.cfg.semantic is not None:
        inputs.semantic, s = semantic_features(model_ref, model.cfg, df, root, address)
        stats.update(s)
    if model.prompt_encoder is not None:
        inputs.prompt, inputs.prompt_present = prompt_features(model, df)
    return inputs, stats


def pooled_backbone_stats(model, df: pd.DataFrame, root: Path | None = None) -> np.ndarray:
    """[N, 2C] float64: each row's backbone map pooled as the model's forward pools it for its stats expert or
    probe (each channel's mean and std), from the feature cache: what a ridge probe is fitted on."""
    maps, _, _ = backbone_features(model, df, Path(root) if root else cache_dir() / "features")
    out = [model.quality.pooled_stats(torch.from_numpy(maps[i : i + 256]).float()).numpy() for i in range(0, len(df), 256)]
    return np.concatenate(out).astype(np.float64)
