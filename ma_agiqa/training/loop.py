"""Training and prediction on a labelled frame (see datasets.py), with the frozen parts computed once.

- The MLLM is frozen (as in MA-AGIQA): its vectors come from the scoring job run with --keep-features into
  a cache keyed by the semantic branch's hash (model, prompts, pooling); the job's resume logic makes the
  cache incremental, and a second run with the same MLLM loads no MLLM at all.
- A frozen backbone's feature maps are cached too (keyed by backbone, layers, grid and views), and the
  reference's flip/rot90 augmentation is applied to the cached maps instead of the pixels. With
  ``trainable_stages``, what is cached is the frozen stages' part: their levels and the input of the stages
  that train, which run in every step.
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

from .images import decode_image
from .preprocess import augment, normalize, quality_pixels
from .metrics import iqa_metrics
from .schema import feature_column
from .fetch import Fetcher
from .tiny import cache_dir


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


@torch.inference_mode()
def backbone_features(model, df: pd.DataFrame, root: Path, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """(feature maps of a frozen backbone for every row, None), from the cache where present; with
    ``trainable_stages``, (the frozen stages' levels, the trainable stages' input)."""
    directory = root / "backbone" / backbone_key(model)
    names = ["features", "cut"] if model.cfg.quality.trainable_stages else ["features"]
    cached: dict[str, tuple] = {}
    if (directory / "ids.json").exists():
        ids = json.loads((directory / "ids.json").read_text())
        arrays = [np.load(directory / f"{name}.npy", mmap_mode="r") for name in names]
        cached = {i: tuple(a[k] for a in arrays) for k, i in enumerate(ids)}
    missing = df[~df["image_id"].isin(cached.keys())]
    backbone = model.quality.backbone
    for start in range(0, len(missing), 256):
        chunk = missing.iloc[start : start + 256]
        pixels = _load_pixels(chunk, model.cfg.quality.views)
        for i in range(0, len(chunk), batch_size):
            views = normalize(torch.from_numpy(pixels[i : i + batch_size]), model.cfg.quality.views).flatten(0, 1)
            outs = backbone.split(views) if len(names) == 2 else (model.quality.features(views),)
            outs = [o.to(torch.float16).numpy() for o in outs]
            for k, image_id in enumerate(chunk["image_id"].iloc[i : i + batch_size]):
                cached[image_id] = tuple(o[k] for o in outs)
    if len(missing):
        directory.mkdir(parents=True, exist_ok=True)
        ids = sorted(cached)
        for n, name in enumerate(names):
            tmp = directory / f"{name}.tmp.npy"
            np.save(tmp, np.stack([cached[i][n] for i in ids]))
            tmp.replace(directory / f"{name}.npy")
        (directory / "ids.json").write_text(json.dumps(ids))  # last: it says which rows the arrays hold
    out = [np.stack([cached[i][n] for i in df["image_id"]]) for n in range(len(names))]
    stats = {"backbone_cached": len(df) - len(missing), "backbone_computed": len(missing)}
    return out[0], (out[1] if len(out) > 1 else None), stats


def semantic_features(model_ref: str, cfg, df: pd.DataFrame, root: Path, address: str | None = None) -> tuple[dict, dict]:
    """The MLLM's vectors for every row, computed by the scoring job (--keep-features) into a cache keyed by
    the semantic branch; only rows the cache lacks are scored."""
    from jobs import score

    from .hub import fingerprint
    from .checkpoint import checkpoint_dir

    base = checkpoint_dir(model_ref)
    weights = fingerprint(cfg.semantic.model_id, str(base) if base else None, cfg.semantic.revision)
    directory = root / "semantic" / f"{cfg.semantic.prompt_hash()}-{weights}"
    from .table_files import read_column

    have = set(read_column(str(directory), "image_id").to_pylist())
    todo = df[~df["image_id"].isin(have)]
    computed = 0
    if len(todo):
        with tempfile.TemporaryDirectory() as tmp:
            manifest = Path(tmp) / "manifest.parquet"
            pq.write_table(pa.table({"id": todo["image_id"].tolist(), "uri": todo["uri"].tolist()}), manifest)
            # The vectors are the MLLM's, whatever the heads: random heads are fine here.
            argv = ["--manifest", str(manifest), "--output", str(directory), "--model", model_ref, "--keep-features",
                    "--allow-untrained", "--max-error-fraction", "1"]
            summary = score.run(score.parse_args(argv + (["--address", address] if address else [])))
            computed = summary["rows"]
    from .score_table import read_scores

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


def forward_rows(model, inputs: Inputs, idx: np.ndarray, train: bool = False, generator=None, drop_prompt=None):
    """(MOS predictions [b], gates [b, E]) for rows ``idx``; augmented when training. ``drop_prompt`` ([b]
    bool) marks rows whose prompt expert is treated as absent, as for an image scored without a prompt."""
    views = model.cfg.quality.views
    device = next(model.quality.parameters()).device
    if inputs.backbone is not None:
        feats = torch.from_numpy(inputs.backbone[idx]).float()
        cut = None if inputs.backbone_cut is None else torch.from_numpy(inputs.backbone_cut[idx]).float()
        if train and cut is None:
            feats = torch.stack([augment(f.unsqueeze(0), generator, model.cfg.train.aug_p)[0] for f in feats])
        elif train:  # the same flip and turn for an image's two maps
            pairs = [augment((f.unsqueeze(0), c.unsqueeze(0)), generator, model.cfg.train.aug_p) for f, c in zip(feats, cut)]
            feats, cut = torch.cat([f for f, _ in pairs]), torch.cat([c for _, c in pairs])
        kwargs = {"backbone_features": feats.to(device)}
        if cut is not None:
            kwargs["backbone_cut"] = cut.to(device)
    else:
        px = torch.from_numpy(inputs.pixels[idx])  # [b, V, 3, s, s]
        if train:
            px = torch.stack([augment(p, generator, model.cfg.train.aug_p) for p in px])
        kwargs = {"views": normalize(px.to(device), views)}
    semantic = {k: torch.from_numpy(v[idx]).to(device) for k, v in (inputs.semantic or {}).items()}
    emb = present = None
    if inputs.prompt is not None:
        emb = torch.from_numpy(inputs.prompt[idx]).to(device)
        present = torch.from_numpy(inputs.prompt_present[idx])
        if drop_prompt is not None:
            present = present & ~torch.as_tensor(drop_prompt, dtype=torch.bool)
        present = present.to(device)
    return model(semantic=semantic, prompt_embedding=emb, prompt_present=present, **kwargs)


@torch.inference_mode()
def predict(model, inputs: Inputs, batch_size: int = 64) -> np.ndarray:
    """Scores every row (no last partial batch dropped, unlike the reference's evaluation)."""
    model.eval()
    n = len(inputs.mos)
    return np.concatenate([forward_rows(model, inputs, np.arange(i, min(n, i + batch_size)))[0].cpu().numpy() for i in range(0, n, batch_size)])


def forward_precision(device: torch.device, precision: str):
    """The context a training forward runs in: autocast to bfloat16 for ``precision`` "bfloat16" (the
    weights stay float32), else nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


def prompt_dropout(n: int, fraction: float, generator: torch.Generator) -> np.ndarray:
    """[n] bool: the rows of a batch whose prompt expert training marks absent (each with probability
    ``fraction``)."""
    return (torch.rand(n, generator=generator) < fraction).numpy()


def training_loss(pred: torch.Tensor, mos: torch.Tensor, mos_std: float, batch_size: int, t) -> torch.Tensor:
    """This share's part of the batch's loss: the MSE on MOS / ``mos_std`` (summed here, divided by the whole
    batch's size, so that workers' shares add up to it), plus the batch-level terms of ``t`` (``plcc_loss``,
    ``rank_loss``), which need the whole batch in one process."""
    err = (pred - mos) / mos_std
    loss = torch.sum(err**2) / batch_size
    if t.plcc_loss and len(pred) > 1:
        p, m = pred - pred.mean(), mos - mos.mean()
        # PLCC's gradient grows as 1 / the predictions' spread: a batch predicted (nearly) alike, as a head
        # starts or a dead ReLU leaves it, has no correlation to follow, and gets the MSE alone.
        if p.detach().std() > 1e-3 * mos_std:
            loss = loss + t.plcc_loss * (1 - torch.sum(p * m) / (p.norm() * m.norm() + 1e-8))
    if t.rank_loss:
        higher = mos[:, None] > mos[None, :]  # pairs (i, j) where i's MOS is above j's
        if higher.any():
            diff = (pred[:, None] - pred[None, :]) / mos_std
            loss = loss + t.rank_loss * torch.nn.functional.softplus(-diff[higher]).mean()
    return loss


def _scheduler(opt, t, steps_per_epoch: int):
    if t.scheduler == "cosine-iter":  # the reference: T_max counted in iterations
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.t_max)
    if t.scheduler != "cosine-epoch":
        raise ValueError(f"unknown scheduler {t.scheduler!r}")
    total = t.epochs * steps_per_epoch
    warmup = min(total - 1, round(getattr(t, "warmup_epochs", 0.0) * steps_per_epoch))
    if warmup <= 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    return torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.01, total_iters=warmup),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup),
    ], milestones=[warmup])


# Training options added after training states were first saved: left out of the key while off, as if they
# did not exist, so that a state saved before them still resumes.
TERMS_ADDED_SINCE_STATES = ("plcc_loss", "rank_loss")


def run_key(model, train_in: Inputs, val_in: Inputs) -> str:
    """What a saved training state must match to be resumed: the config (training settings included) and
    the targets of both parts, in order (so another split or label file is another run)."""
    cfg = model.cfg.to_dict()
    for name in TERMS_ADDED_SINCE_STATES:
        if not cfg["train"].get(name):
            cfg["train"].pop(name, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(train_in.mos).tobytes())
    h.update(np.ascontiguousarray(val_in.mos).tobytes())
    return h.hexdigest()[:16]


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a kill mid-write leaves the previous epoch's state


def train(model, train_in: Inputs, val_in: Inputs, log=print, rank: int = 0, world: int = 1,
          state_path: str | Path | None = None, progress: bool | None = False, stop_after: int | None = None) -> dict:
    """Trains the trainable parts of ``model`` in place; keeps the epoch with the best val SRCC + PLCC.

    Expert dropout: with a prompt expert, each training image's prompt is marked absent with probability
    ``cfg.train.drop_prompt`` (the same ``present`` mask as an image scored without a prompt), so that the
    head also learns to score from the other experts alone, on the same scale. Validation keeps the prompts.

    Resumable: with ``state_path`` (one process), everything the next epoch depends on (weights, optimiser,
    scheduler, every random stream, history, the best epoch's weights) is saved after each epoch, and a call
    that finds a state of the same run (``run_key``) continues from it: a killed run ends where an
    uninterrupted one ends. ``stop_after`` ends the call after that many epochs in all (as a kill would).
    ``progress``: a progress bar per epoch with the loss, then val SRCC (None: only on a terminal).

    Data parallel when ``world`` > 1 (under torch.distributed, as Ray Train's TorchTrainer sets it up): every
    worker draws the same batches, computes its share of each (rows rank, rank + world, ...) and the
    gradients are summed across workers, each share's loss divided by the whole batch's size, so a step is
    the single-process step and the same code serves both."""
    from tqdm.auto import tqdm

    t = model.cfg.train
    if world > 1 and state_path is not None:
        raise ValueError("resumable training runs in one process")
    key = run_key(model, train_in, val_in)
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    # One process draws batches and augmentations from one stream (so its runs reproduce the recorded ones);
    # workers share the batch order and augment their own rows from their own streams.
    aug_gen = gen if world == 1 else torch.Generator().manual_seed(t.seed + 1 + rank)
    # Prompt dropout draws from a stream of its own, for whole batches, so every worker marks the same rows
    # and runs without it draw exactly as before.
    t.check()
    drop = t.drop_prompt if train_in.prompt is not None else 0.0
    drop_gen = torch.Generator().manual_seed(t.seed + 1_000_003)
    if world > 1:
        check_data_parallel(model.cfg.moe, t, world)
    if t.normalize_mos:
        model.cfg.mos_mean, model.cfg.mos_std = float(train_in.mos.mean()), float(train_in.mos.std())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("semantic.", "prompt_encoder."))]
    params = [p for _, p in named]
    backbone = [p for n, p in named if n.startswith("quality.backbone.")]
    head = [p for n, p in named if not n.startswith("quality.backbone.")]
    groups = [{"params": head}] + ([{"params": backbone, "lr": t.backbone_lr or t.lr}] if backbone else [])
    opt = torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
    steps_per_epoch = math.ceil(len(train_in.mos) / t.batch_size)
    sched = _scheduler(opt, t, steps_per_epoch)
    history, best, best_epoch, best_state, first = [], -float("inf"), 0, None, 0
    state_path = Path(state_path) if state_path is not None else None
    if state_path is not None and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["run_key"] != key:
            raise ValueError(f"{state_path} holds the state of another training run (other settings or data): "
                             "train into another output directory, or delete it to start again")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        for g, s in zip((gen, drop_gen), state["generators"]):
            g.set_state(s)
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        history, best, best_epoch, best_state = state["history"], state["best"], state["best_epoch"], state["best_state"]
        first = len(history)
        log(f"resuming from {state_path} after epoch {first} of {t.epochs}")
    device = next(model.quality.parameters()).device
    mos = torch.from_numpy(train_in.mos).to(device)
    autocast = forward_precision(device, t.precision)
    for epoch in range(first, t.epochs if stop_after is None else min(t.epochs, stop_after)):
        model.train()
        started, losses = time.time(), []
        order = torch.randperm(len(mos), generator=gen).numpy()
        train_pred = np.zeros(len(order), np.float32)
        # tqdm's disable: True off, None on a terminal only, False always on
        disable = True if progress is False or rank != 0 else (None if progress is None else False)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{t.epochs}", unit="step", leave=True,
                   disable=disable, dynamic_ncols=True)
        for i in range(0, len(order), t.batch_size):
            batch = order[i : i + t.batch_size]
            idx = batch[rank::world]
            dropped = prompt_dropout(len(batch), drop, drop_gen)[rank::world] if drop > 0 else None
            opt.zero_grad()
            batch_loss = 0.0  # this worker's share of the batch's mean loss
            if len(idx):
                with autocast:
                    pred, _ = forward_rows(model, train_in, idx, train=True, generator=aug_gen, drop_prompt=dropped)
                pred = pred.float()
                train_pred[idx] = pred.detach().cpu().numpy()
                loss = training_loss(pred, mos[idx], model.cfg.mos_std, len(batch), t)
                loss.backward()
                batch_loss = loss.item()
            losses.append(batch_loss)
            if world > 1:
                _sum_gradients(params)
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        if world > 1:  # every worker predicted its own rows: add up the shares for the epoch's figures
            train_pred = _sum_array(train_pred)
            losses = _sum_array(np.asarray(losses, np.float64))
        # train metrics from the epoch's own (augmented, train-mode) predictions: a second pass over the
        # training set would cost a third of an epoch
        val_pred = predict(model, val_in)
        tm, vm = iqa_metrics(train_pred, train_in.mos), iqa_metrics(val_pred, val_in.mos)
        bar.set_postfix(loss=f"{np.mean(losses):.4f}", val_srcc=f"{vm['srcc']:.4f}", val_plcc=f"{vm['plcc']:.4f}")
        bar.close()
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_srcc": tm["srcc"], "train_plcc": tm["plcc"],
               "val_srcc": vm["srcc"], "val_plcc": vm["plcc"], "val_krcc": vm["krcc"], "val_rmse": vm["rmse"],
               "seconds": round(time.time() - started, 1)}
        history.append(row)
        log(json.dumps(row))
        quality = float(np.nan_to_num(vm["srcc"] + vm["plcc"], nan=-np.inf))  # constant predictions give NaN
        if best_state is None or quality > best:
            best, best_epoch = quality, epoch + 1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if state_path is not None:
            _save_state(state_path, {
                "run_key": key, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "generators": [gen.get_state(), drop_gen.get_state()],
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "history": history, "best": best, "best_epoch": best_epoch,
                "best_state": best_state,
            })
    finished = len(history) == t.epochs
    if finished:
        model.load_state_dict(best_state)
    model.eval()
    best_row = history[[h["epoch"] for h in history].index(best_epoch)] if history else None
    return {"history": history, "best_epoch": best_epoch, "best": best_row, "finished": finished}


def _sum_gradients(params) -> None:
    import torch.distributed as dist

    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad)


def _sum_array(values: np.ndarray) -> np.ndarray:
    import torch.distributed as dist

    tensor = torch.from_numpy(values.copy())
    dist.all_reduce(tensor)
    return tensor.numpy()


def train_worker(config: dict) -> None:
    """Ray Train's per-worker loop (jobs.train --workers N): builds the model as the single process does and
    runs ``train`` on this worker's share; rank 0 reports the checkpoint."""
    import os

    import ray.train
    from ray.train import Checkpoint

    from .model import create_model

    from ray.train.torch import get_device

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.get("threads", 1))
    torch.manual_seed(0)
    model = create_model(config["model"], device=get_device(), with_semantic=False, shipped=False,
                         **config.get("overrides", {}))
    for k, v in config["train"].items():
        setattr(model.cfg.train, k, v)
    result = train(model, config["train_in"], config["val_in"], log=(print if rank == 0 else (lambda _: None)),
                   rank=rank, world=world)
    metrics = {"best_epoch": result["best_epoch"], **{k: v for k, v in result["best"].items() if k != "epoch"}}
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            with open(os.path.join(tmp, "train_result.json"), "w") as f:
                json.dump(result, f)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def check_data_parallel(moe, t, workers: int) -> None:
    """A step on N workers equals the single-process step only where nothing depends on the batch as a
    whole, which the workers split: not a stats expert's BatchNorm (it standardises over the batch), nor the
    loss's PLCC and ranking terms (``t``: the TrainConfig the run will use)."""
    if workers <= 1:
        return
    if any(e.source == "stats" for e in moe.experts):
        raise ValueError("a stats expert standardises its input over the whole batch (a BatchNorm), which "
                         "data-parallel workers split: train it in one process (--workers 1)")
    if t.plcc_loss or t.rank_loss:
        raise ValueError("the PLCC and ranking loss terms are computed over the whole batch, which "
                         "data-parallel workers split: train them in one process (--workers 1)")


def train_distributed(model_ref: str, train_overrides: dict, train_in: Inputs, val_in: Inputs, output: Path,
                      workers: int, use_gpu: bool = False, storage: str | None = None,
                      model_overrides: dict | None = None) -> dict:
    """Runs ``train_worker`` on ``workers`` Ray Train workers (the Ray cluster of the caller) and copies the
    best checkpoint to ``output``; returns what ``train`` returns."""
    import shutil

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ma_agiqa.checkpoint import load_config

    cfg = load_config(model_ref)
    for k, v in train_overrides.items():
        setattr(cfg.train, k, v)
    check_data_parallel((model_overrides or {}).get("moe") or cfg.moe, cfg.train, workers)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"model": model_ref, "train": train_overrides, "train_in": train_in, "val_in": val_in,
                           "overrides": model_overrides or {}},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=storage or tempfile.mkdtemp(prefix="ma_agiqa_train_")),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as directory:
        output.mkdir(parents=True, exist_ok=True)
        for item in Path(directory).iterdir():
            if item.is_file():
                shutil.copy2(item, output / item.name)
            else:
                shutil.copytree(item, output / item.name, dirs_exist_ok=True)
    result_file = output / "train_result.json"
    trained = json.loads(result_file.read_text())
    result_file.unlink()
    return trained
