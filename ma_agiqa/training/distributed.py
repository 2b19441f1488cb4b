"""Data-parallel training on Ray Train (``jobs.train --workers N``): torch DDP on a TorchTrainer.

The inputs travel through Ray's object store (``ray.put`` in the driver, ``ray.get`` in each worker), not
as Ray Train datasets: every worker draws the same batch order from the run's seed and takes its share of
each batch (rows rank, rank + world, ...), which needs every row of the arrays in every worker, so that a
step is the single-process step on the same global batch (``loop.train``). A dataset shard would give each
worker a fixed part of the rows, and another order. The arrays stay numpy, read zero-copy from the store on
each node, and no longer ride in ``train_loop_config``.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .features import Inputs
from .loop import check_data_parallel, train


def train_worker(config: dict) -> None:
    """Ray Train's per-worker loop: builds the model as the single process does, wraps it in DDP
    (``ray.train.torch.prepare_model``: gloo on CPUs, NCCL on GPUs) and runs ``train`` on this worker's
    share; rank 0 reports the checkpoint."""
    import os

    import ray
    import ray.train
    from ray.train import Checkpoint
    from ray.train.torch import get_device, prepare_model

    from ..model import create_model

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config.get("threads", 1))
    torch.manual_seed(0)
    model = create_model(config["model"], device=get_device(), with_semantic=False, shipped=False,
                         **config.get("overrides", {}))
    for k, v in config["train"].items():
        setattr(model.cfg.train, k, v)
    train_in, val_in = ray.get(config["inputs"])
    # Some trainable parameters take no part in a given forward (an expert whose input a model lacks, a
    # head's layers that the config bypasses): DDP must look for them each step instead of waiting for their
    # gradients; where no worker used one, its gradient stays unset, as in one process.
    parallel = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True}) if world > 1 else None
    result = train(model, train_in, val_in, log=(print if rank == 0 else (lambda _: None)), rank=rank, world=world,
                   parallel=parallel)
    metrics = {"best_epoch": result["best_epoch"], **{k: v for k, v in result["best"].items() if k != "epoch"}}
    if rank == 0:
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            with open(os.path.join(tmp, "train_result.json"), "w") as f:
                json.dump(result, f)
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
    else:
        ray.train.report(metrics)


def train_distributed(model_ref: str, train_overrides: dict, train_in: Inputs, val_in: Inputs | None, output: Path,
                      workers: int, use_gpu: bool = False, storage: str | None = None,
                      model_overrides: dict | None = None) -> dict:
    """Runs ``train_worker`` on ``workers`` Ray Train workers (the Ray cluster of the caller) and copies the
    best checkpoint to ``output``; returns what ``train`` returns. Refuses, before Ray starts anything, a
    model or loss that couples a batch's rows (``check_data_parallel``)."""
    import shutil

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ..model import create_model

    model = create_model(model_ref, with_semantic=False, shipped=False, **(model_overrides or {}))
    for k, v in train_overrides.items():
        setattr(model.cfg.train, k, v)
    check_data_parallel(model, model.cfg.train, workers)
    inputs = [ray.put(train_in), ray.put(val_in)]  # held here until fit() returns
    # Ray Train's run folder (its checkpoints, tens of MB) is scratch unless the caller keeps it: removed
    # however the run ends, so a training run leaves nothing in the node's temporary directory.
    scratch = None if storage else tempfile.mkdtemp(prefix="ma_agiqa_train_")
    try:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"model": model_ref, "train": train_overrides, "overrides": model_overrides or {},
                               "inputs": inputs},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(storage_path=storage or scratch),
        )
        result = trainer.fit()
        with result.checkpoint.as_directory() as directory:
            output.mkdir(parents=True, exist_ok=True)
            for item in Path(directory).iterdir():
                if item.is_file():
                    shutil.copy2(item, output / item.name)
                else:
                    shutil.copytree(item, output / item.name, dirs_exist_ok=True)
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    result_file = output / "train_result.json"
    trained = json.loads(result_file.read_text())
    result_file.unlink()
    return trained
