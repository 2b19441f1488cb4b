"""Training and prediction on a labelled frame (see datasets.py), with the frozen parts computed once.

- The MLLM is frozen (as in MA-AGIQA): its vectors come from the scoring job run with --keep-features into
  a cache keyed by the semantic branch's hash (model, prompts, pooling); the job's resume logic makes the
  cache incremental, and a second run with the same MLLM loads no MLLM at all.
- A frozen backbone's feature maps are cached too (keyed by backbone, layers, grid and views), and the
  reference's flip/rot90 augmentation is applied to the cached maps instead of the pixels.
- A trainable backbone trains from the images' 8-bit views, kept in memory.
"""
from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .images import augment, decode_image, normalize, quality_pixels
from .metrics import iqa_metrics
from .schema import feature_column
from .storage import Fetcher
from .tiny import cache_dir


@dataclass
class Inputs:
    """Everything a batch needs, aligned with a frame's rows."""

    mos: np.ndarray  # [N]
    backbone: np.ndarray | None = None  # [N, C, g, g] float16, for a frozen backbone
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
    key = json.dumps([q.backbone, q.pretrained, list(q.layers), q.grid, q.backbone_kwargs, asdict(q.views)], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@torch.inference_mode()
def backbone_features(model, df: pd.DataFrame, root: Path, batch_size: int = 32) -> tuple[np.ndarray, dict]:
    """Feature maps of a frozen backbone for every row, from the cache where present."""
    directory = root / "backbone" / backbone_key(model)
    cached: dict[str, np.ndarray] = {}
    if (directory / "ids.json").exists():
        ids = json.loads((directory / "ids.json").read_text())
        arr = np.load(directory / "features.npy", mmap_mode="r")
        cached = {i: arr[k] for k, i in enumerate(ids)}
    missing = df[~df["image_id"].isin(cached.keys())]
    for start in range(0, len(missing), 256):
        chunk = missing.iloc[start : start + 256]
        pixels = _load_pixels(chunk, model.cfg.quality.views)
        for i in range(0, len(chunk), batch_size):
            views = normalize(torch.from_numpy(pixels[i : i + batch_size]), model.cfg.quality.views)
            feats = model.quality.features(views.flatten(0, 1)).to(torch.float16).numpy()
            for image_id, f in zip(chunk["image_id"].iloc[i : i + batch_size], feats):
                cached[image_id] = f
    if len(missing):
        directory.mkdir(parents=True, exist_ok=True)
        ids = sorted(cached)
        tmp = directory / "features.tmp.npy"
        np.save(tmp, np.stack([cached[i] for i in ids]))
        tmp.replace(directory / "features.npy")
        (directory / "ids.json").write_text(json.dumps(ids))
    out = np.stack([cached[i] for i in df["image_id"]])
    return out, {"backbone_cached": len(df) - len(missing), "backbone_computed": len(missing)}


def semantic_features(model_ref: str, cfg, df: pd.DataFrame, root: Path, address: str | None = None) -> tuple[dict, dict]:
    """The MLLM's vectors for every row, computed by the scoring job (--keep-features) into a cache keyed by
    the semantic branch; only rows the cache lacks are scored."""
    from jobs import score

    from .hub import fingerprint
    from .model import checkpoint_dir

    base = checkpoint_dir(model_ref)
    weights = fingerprint(cfg.semantic.model_id, str(base) if base else None, cfg.semantic.revision)
    directory = root / "semantic" / f"{cfg.semantic.prompt_hash()}-{weights}"
    from .storage import read_column

    have = set(read_column(str(directory), "image_id").to_pylist())
    todo = df[~df["image_id"].isin(have)]
    computed = 0
    if len(todo):
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "manifest.parquet"
            pq.write_table(pa.table({"id": todo["image_id"].tolist(), "uri": todo["uri"].tolist()}), manifest)
            argv = ["--manifest", str(manifest), "--output", str(directory), "--model", model_ref, "--keep-features"]
            summary = score.run(score.parse_args(argv + (["--address", address] if address else [])))
            computed = summary["rows"]
    table = pq.ParquetDataset(sorted(str(p) for p in directory.glob("part-*.parquet"))).read()
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
        inputs.backbone, s = backbone_features(model, df, root)
        stats.update(s)
    else:
        inputs.pixels = _load_pixels(df, model.cfg.quality.views)
    if model.cfg.semantic is not None:
        inputs.semantic, s = semantic_features(model_ref, model.cfg, df, root, address)
        stats.update(s)
    if model.prompt_encoder is not None:
        inputs.prompt, inputs.prompt_present = prompt_features(model, df)
    return inputs, stats


def forward_rows(model, inputs: Inputs, idx: np.ndarray, train: bool = False, generator=None):
    """(MOS predictions [b], gates [b, E]) for rows ``idx``; augmented when training."""
    views = model.cfg.quality.views
    if inputs.backbone is not None:
        feats = torch.from_numpy(inputs.backbone[idx]).float()
        if train:
            feats = torch.stack([augment(f.unsqueeze(0), generator, model.cfg.train.aug_p)[0] for f in feats])
        kwargs = {"backbone_features": feats}
    else:
        px = torch.from_numpy(inputs.pixels[idx])  # [b, V, 3, s, s]
        if train:
            px = torch.stack([augment(p, generator, model.cfg.train.aug_p) for p in px])
        kwargs = {"views": normalize(px, views)}
    semantic = {k: torch.from_numpy(v[idx]) for k, v in (inputs.semantic or {}).items()}
    emb = present = None
    if inputs.prompt is not None:
        emb, present = torch.from_numpy(inputs.prompt[idx]), torch.from_numpy(inputs.prompt_present[idx])
    return model(semantic=semantic, prompt_embedding=emb, prompt_present=present, **kwargs)


@torch.inference_mode()
def predict(model, inputs: Inputs, batch_size: int = 64) -> np.ndarray:
    """Scores every row (no last partial batch dropped, unlike the reference's evaluation)."""
    model.eval()
    n = len(inputs.mos)
    return np.concatenate([forward_rows(model, inputs, np.arange(i, min(n, i + batch_size)))[0].numpy() for i in range(0, n, batch_size)])


def train(model, train_in: Inputs, val_in: Inputs, log=print) -> dict:
    """Trains the trainable parts of ``model`` in place; keeps the epoch with the best val SRCC + PLCC."""
    t = model.cfg.train
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    if t.normalize_mos:
        model.cfg.mos_mean, model.cfg.mos_std = float(train_in.mos.mean()), float(train_in.mos.std())
    params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("semantic.", "prompt_encoder."))]
    opt = torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = math.ceil(len(train_in.mos) / t.batch_size)
    if t.scheduler == "cosine-iter":  # the reference: T_max counted in iterations
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.t_max)
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs * steps_per_epoch)
    history, best, best_state = [], -float("inf"), None
    mos = torch.from_numpy(train_in.mos)
    for epoch in range(t.epochs):
        model.train()
        started, losses = time.time(), []
        order = torch.randperm(len(mos), generator=gen).numpy()
        train_pred = np.zeros(len(order), np.float32)
        for i in range(0, len(order), t.batch_size):
            idx = order[i : i + t.batch_size]
            pred, _ = forward_rows(model, train_in, idx, train=True, generator=gen)
            train_pred[idx] = pred.detach().numpy()
            loss = torch.mean(((pred - mos[idx]) / model.cfg.mos_std) ** 2)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        # train metrics from the epoch's own (augmented, train-mode) predictions: a second pass over the
        # training set would cost a third of an epoch
        val_pred = predict(model, val_in)
        tm, vm = iqa_metrics(train_pred, train_in.mos), iqa_metrics(val_pred, val_in.mos)
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_srcc": tm["srcc"], "train_plcc": tm["plcc"],
               "val_srcc": vm["srcc"], "val_plcc": vm["plcc"], "val_krcc": vm["krcc"], "val_rmse": vm["rmse"],
               "seconds": round(time.time() - started, 1)}
        history.append(row)
        log(json.dumps(row))
        quality = float(np.nan_to_num(vm["srcc"] + vm["plcc"], nan=-np.inf))  # constant predictions give NaN
        if best_state is None or quality > best:
            best, best_epoch = quality, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    model.eval()
    best_row = history[[h["epoch"] for h in history].index(best_epoch)]
    return {"history": history, "best_epoch": best_epoch, "best": best_row}
