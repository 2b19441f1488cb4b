"""The training loop: batches, steps, the epoch kept, resumable state; one process or data-parallel."""
from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..metrics import iqa_metrics
from ..preprocess import augment, normalize
from .features import Inputs
from .loss import training_loss


def forward_rows(model, inputs: Inputs, idx: np.ndarray, train: bool = False, generator=None, drop_prompt=None,
                 net=None):
    """(MOS predictions [b], gates [b, E]) for rows ``idx``; augmented when training. ``drop_prompt`` ([b]
    bool) marks rows whose prompt expert is treated as absent, as for an image scored without a prompt.
    ``net``: what runs the forward, where it is not ``model`` itself (``model`` wrapped for data parallelism).
    ``generator``: the augmentation's stream, or a list of one per row."""
    views = model.cfg.quality.views
    device = next(model.quality.parameters()).device
    gens = generator if isinstance(generator, list) else [generator] * len(idx)
    if inputs.backbone is not None:
        feats = torch.from_numpy(inputs.backbone[idx]).float()
        cut = None if inputs.backbone_cut is None else torch.from_numpy(inputs.backbone_cut[idx]).float()
        if train and cut is None:
            feats = torch.stack([augment(f.unsqueeze(0), g, model.cfg.train.aug_p)[0] for f, g in zip(feats, gens)])
        elif train:  # the same flip and turn for an image's two maps
            pairs = [augment((f.unsqueeze(0), c.unsqueeze(0)), g, model.cfg.train.aug_p) for f, c, g in zip(feats, cut, gens)]
            feats, cut = torch.cat([f for f, _ in pairs]), torch.cat([c for _, c in pairs])
        kwargs = {"backbone_features": feats.to(device)}
        if cut is not None:
            kwargs["backbone_cut"] = cut.to(device)
    else:
        px = torch.from_numpy(inputs.pixels[idx])  # [b, V, 3, s, s]
        if train:
            px = torch.stack([augment(p, g, model.cfg.train.aug_p) for p, g in zip(px, gens)])
        kwargs = {"views": normalize(px.to(device), views)}
    semantic = {k: torch.from_numpy(v[idx]).to(device) for k, v in (inputs.semantic or {}).items()}
    emb = present = None
    if inputs.prompt is not None:
        emb = torch.from_numpy(inputs.prompt[idx]).to(device)
        present = torch.from_numpy(inputs.prompt_present[idx])
        if drop_prompt is not None:
            present = present & ~torch.as_tensor(drop_prompt, dtype=torch.bool)
        present = present.to(device)
    return (net or model)(semantic=semantic, prompt_embedding=emb, prompt_present=present, **kwargs)


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


def run_key(model, train_in: Inputs, val_in: Inputs | None) -> str:
    """What a saved training state must match to be resumed: the config (training settings included) and
    the targets of both parts, in order (so another split or label file is another run)."""
    cfg = model.cfg.to_dict()
    for name in TERMS_ADDED_SINCE_STATES:
        if not cfg["train"].get(name):
            cfg["train"].pop(name, None)
    h = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(train_in.mos).tobytes())
    if val_in is not None:
        h.update(np.ascontiguousarray(val_in.mos).tobytes())
    return h.hexdigest()[:16]


def _save_state(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)  # a kill mid-write leaves the previous epoch's state


def train(model, train_in: Inputs, val_in: Inputs | None, log=print, rank: int = 0, world: int = 1,
          state_path: str | Path | None = None, progress: bool | None = False, stop_after: int | None = None,
          parallel=None) -> dict:
    """Trains the trainable parts of ``model`` in place; keeps the epoch with the best val SRCC + PLCC, or
    without val rows (``val_in`` None: a run on all labelled data) the last epoch.

    Expert dropout: with a prompt expert, each training image's prompt is marked absent with probability
    ``cfg.train.drop_prompt`` (the same ``present`` mask as an image scored without a prompt), so that the
    head also learns to score from the other experts alone, on the same scale. Validation keeps the prompts.

    Resumable: with ``state_path`` (one process), everything the next epoch depends on (weights, optimiser,
    scheduler, every random stream, history, the best epoch's weights) is saved after each epoch, and a call
    that finds a state of the same run (``run_key``) continues from it: a killed run ends where an
    uninterrupted one ends. ``stop_after`` ends the call after that many epochs in all (as a kill would).
    ``progress``: a progress bar per epoch with the loss, then val SRCC (None: only on a terminal).

    Data parallel when ``world`` > 1, ``parallel`` being ``model`` wrapped in torch's DistributedDataParallel
    (``ray.train.torch.prepare_model``, as ``distributed.train_worker`` does): every worker draws the same
    batches, draws every augmentation of each batch (applying its own rows') and computes its share of
    each (rows rank, rank + world, ...). A share's loss is its rows' part
    of the whole batch's loss (``training_loss``), times ``world``: DDP averages the workers' gradients, so
    the average of the scaled shares is the gradient of the whole batch's loss, and a step is the
    single-process step. Nothing may couple a batch's rows (``check_data_parallel``)."""
    from tqdm.auto import tqdm

    t = model.cfg.train
    if world > 1 and state_path is not None:
        raise ValueError("resumable training runs in one process")
    key = run_key(model, train_in, val_in)
    torch.manual_seed(t.seed)
    gen = torch.Generator().manual_seed(t.seed)
    # Batches and augmentations are drawn from one stream (so that runs reproduce the recorded ones); every
    # worker draws all of a batch's augmentations, as one process does, and applies its own rows' (``_share``).
    # Prompt dropout draws from a stream of its own, for whole batches, so every worker marks the same rows
    # and runs without it draw exactly as before.
    t.check()
    drop = t.drop_prompt if train_in.prompt is not None else 0.0
    drop_gen = torch.Generator().manual_seed(t.seed + 1_000_003)
    if world > 1:
        if parallel is None:
            raise ValueError("data-parallel training runs the model wrapped for it (parallel=prepare_model(model))")
        check_data_parallel(model, t, world)
    if t.normalize_mos:
        model.cfg.mos_mean, model.cfg.mos_std = float(train_in.mos.mean()), float(train_in.mos.std())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith(("semantic.", "prompt_encoder."))]
    backbone = [p for n, p in named if n.startswith("quality.backbone.")]
    head = [p for n, p in named if not n.startswith("quality.backbone.")]
    backbone_lr = t.lr if t.backbone_lr is None else t.backbone_lr
    groups = [{"params": head}] + ([{"params": backbone, "lr": backbone_lr}] if backbone else [])
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
    mos = torch.tensor(train_in.mos, device=device)  # a copy: the arrays may be the object store's, read-only
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
            # A worker whose share is empty (a last batch smaller than the workers) still takes part in the
            # step's gradient exchange: it runs one row with weight 0.
            weight = 1.0 if len(idx) else 0.0
            rows = idx if len(idx) else batch[:1]
            opt.zero_grad()
            aug = gen if world == 1 else _share(gen, len(batch), rank, world, t.aug_p) or [torch.Generator()]
            with autocast:
                pred, _ = forward_rows(model, train_in, rows, train=True, generator=aug,
                                       drop_prompt=dropped if len(idx) else None, net=parallel)
            pred = pred.float()
            loss = weight * training_loss(pred, mos[rows], model.cfg.mos_std, len(batch), t)
            (loss * world).backward()  # DDP averages over the workers; one process: world is 1
            if len(idx):
                train_pred[idx] = pred.detach().cpu().numpy()
            losses.append(loss.item())  # this worker's share of the batch's mean loss
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}")
        if world > 1:  # every worker predicted its own rows: add up the shares for the epoch's figures
            train_pred = _sum_array(train_pred)
            losses = _sum_array(np.asarray(losses, np.float64))
        # train metrics from the epoch's own (augmented, train-mode) predictions: a second pass over the
        # training set would cost a third of an epoch
        tm = iqa_metrics(train_pred, train_in.mos)
        if val_in is not None:
            vm = iqa_metrics(predict(model, val_in), val_in.mos)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", val_srcc=f"{vm['srcc']:.4f}", val_plcc=f"{vm['plcc']:.4f}")
        else:
            vm = dict.fromkeys(("srcc", "plcc", "krcc", "rmse"))
        bar.close()
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_srcc": tm["srcc"], "train_plcc": tm["plcc"],
               "val_srcc": vm["srcc"], "val_plcc": vm["plcc"], "val_krcc": vm["krcc"], "val_rmse": vm["rmse"],
               "seconds": round(time.time() - started, 1)}
        history.append(row)
        log(json.dumps(row))
        # constant predictions give NaN; without val rows every epoch is the best so far (the last is kept)
        quality = float(np.nan_to_num(vm["srcc"] + vm["plcc"], nan=-np.inf)) if val_in is not None else float(epoch)
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


_DRAW = torch.zeros(1, 1, 1, 1)  # what a row's augmentation draws are made on where the row is another worker's


def _share(gen: torch.Generator, n: int, rank: int, world: int, p: float) -> list[torch.Generator]:
    """For a batch of ``n`` rows: a generator per row of this worker's share (rows rank, rank + world, ...),
    each at the state one process's ``gen`` is in when it augments that row; ``gen`` ends where one process
    leaves it after the batch."""
    own = []
    for j in range(n):
        if j % world == rank:
            own.append(torch.Generator().set_state(gen.get_state()))
        augment(_DRAW, gen, p)
    return own


def _sum_array(values: np.ndarray) -> np.ndarray:
    import torch.distributed as dist

    tensor = torch.from_numpy(values.copy())
    dist.all_reduce(tensor)
    return tensor.numpy()


def batch_coupled(model) -> list[str]:
    """The modules of ``model`` whose output for one row depends on the other rows of its batch as training
    runs them: every BatchNorm left in train mode by ``model.train()`` (which keeps frozen parts in eval
    mode), whether in a head, a stats expert or backbone stages that train."""
    from torch.nn.modules.batchnorm import _BatchNorm

    was_training = model.training
    model.train()
    try:
        return [name for name, m in model.named_modules() if isinstance(m, _BatchNorm) and m.training]
    finally:
        model.train(was_training)


def check_data_parallel(model, t, workers: int) -> None:
    """A step on N workers equals the single-process step only where nothing depends on the batch as a
    whole, which the workers split: no module that standardises over the batch (``batch_coupled``), nor the
    loss's PLCC and ranking terms (``t``: the TrainConfig the run will use)."""
    if workers <= 1:
        return
    coupled = batch_coupled(model)
    if coupled:
        raise ValueError(f"{', '.join(coupled[:3])}{' ...' if len(coupled) > 3 else ''}: a BatchNorm in train mode "
                         "standardises over the whole batch, which data-parallel workers split: train it in one "
                         "process (--workers 1)")
    if t.plcc_loss or t.rank_loss:
        raise ValueError("the PLCC and ranking loss terms are computed over the whole batch, which "
                         "data-parallel workers split: train them in one process (--workers 1)")
