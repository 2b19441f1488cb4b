"""One training step of ``ma-agiqa-offline-quality`` with its whole backbone trainable, float32 against
``--precision bfloat16`` (autocast over the forward, as ``training.train`` runs it).

    python benchmarks/train_step.py [--model ma-agiqa-offline-quality] [--batch-size 8] [--rounds 3] [--smoke]

A step is what ``train`` does per batch: the augmented forward, the loss, backward and Adam. The two
precisions alternate (one step of each per round, the best of the rounds), so a busy machine moves both alike.
--smoke: a step of 2 on tf_efficientnet_lite0 at 64 px, one round (seconds; no timing worth reading).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ma-agiqa-offline-quality")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="seconds: lite0 at 64 px, a batch of 2, one round")
    args = p.parse_args()
    if args.smoke:
        args.batch_size, args.rounds = 2, 1

    from ma_agiqa import create_model
    from ma_agiqa.checkpoint import load_config
    from ma_agiqa.config import EnsembleConfig
    from ma_agiqa.training import Inputs, forward_precision, forward_rows, training_loss

    cfg = load_config(args.model)
    quality = dataclasses.replace(cfg.quality, freeze_backbone=False)
    if args.smoke:
        quality = dataclasses.replace(quality, backbone="tf_efficientnet_lite0",
                                      views=dataclasses.replace(quality.views, size=64))
    # one head: an ensemble's heads share one frozen backbone, and this measures a trainable one
    model = create_model(args.model, with_semantic=False, shipped=False, quality=quality, ensemble=EnsembleConfig())
    model.cfg.mos_std = 1.0
    size = quality.views.size
    rng = np.random.default_rng(0)
    n = args.batch_size
    inputs = Inputs(mos=rng.normal(3, 1, n).astype(np.float32),
                    pixels=rng.integers(0, 256, (n, 1, 3, size, size), dtype=np.uint8))
    opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad], lr=1e-6)
    mos, idx, gen = torch.from_numpy(inputs.mos), np.arange(n), torch.Generator().manual_seed(0)
    model.train()

    def step(precision: str) -> float:
        started = time.perf_counter()
        opt.zero_grad()
        with forward_precision(torch.device("cpu"), precision):
            pred, _ = forward_rows(model, inputs, idx, train=True, generator=gen)
        training_loss(pred.float(), mos, 1.0, n, model.cfg.train).backward()
        opt.step()
        return time.perf_counter() - started

    precisions = ("float32", "bfloat16")
    for precision in precisions:  # warm-up: oneDNN picks its kernels on the first call
        step(precision)
    times = {precision: [] for precision in precisions}
    for _ in range(args.rounds):
        for precision in precisions:
            times[precision].append(step(precision))
    best = {precision: round(min(t), 2) for precision, t in times.items()}
    print(json.dumps({
        "model": args.model, "image_px": size, "batch_size": n, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "seconds_per_step": best, "speed-up": round(best["float32"] / best["bfloat16"], 2),
    }, indent=2))


if __name__ == "__main__":
    main()
