"""Test-time mean over orientations: a model's val (and test, where the split has one) figures scored as it is,
with the mean over a horizontal flip, and with the mean over all 8 flips and quarter turns of its backbone
map (the orientations training's augmentation draws), from the cached maps.

    python benchmarks/orientation_mean.py MODEL [--split-file RUN/split.csv] [--data-root ../shared/datasets/agiqa3k]
    python benchmarks/orientation_mean.py --smoke

MODEL is a registered name or a checkpoint directory; without --split-file the label file's split is used.
--smoke: an untrained ma-agiqa-offline-quality on tf_efficientnet_lite0 at 64 px, samples/agiqa3k, a temporary
cache (seconds; figures of no meaning).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ma_agiqa import create_model  # noqa: E402
from ma_agiqa.datasets import load_dataset  # noqa: E402
from ma_agiqa.metrics import iqa_metrics  # noqa: E402
from ma_agiqa.training import prepare  # noqa: E402


@torch.inference_mode()
def oriented_predictions(model, inputs, flip: bool, turns: int, batch_size: int = 64) -> np.ndarray:
    def orient(x):
        x = x.flip(-1) if flip else x
        return torch.rot90(x, turns, dims=(-2, -1))

    out = []
    for i in range(0, len(inputs.mos), batch_size):
        idx = np.arange(i, min(len(inputs.mos), i + batch_size))
        kwargs = {"backbone_features": orient(torch.from_numpy(inputs.backbone[idx]).float())}
        if inputs.backbone_cut is not None:
            kwargs["backbone_cut"] = orient(torch.from_numpy(inputs.backbone_cut[idx]).float())
        out.append(model(**kwargs)[0].numpy())
    return np.concatenate(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--data-root", default="../shared/datasets/agiqa3k")
    p.add_argument("--split-file", default=None)
    p.add_argument("--smoke", action="store_true", help="seconds: an untrained small model on samples/agiqa3k")
    args = p.parse_args()
    cache = None
    if args.smoke:
        import dataclasses

        from _common import scratch_dir
        from ma_agiqa import get_config

        args.model = args.model or "ma-agiqa-offline-quality"
        args.data_root = str(Path(__file__).resolve().parents[1] / "samples" / "agiqa3k")
        cache = scratch_dir("orientation_mean_smoke_")
        q = get_config(args.model).quality
        q = dataclasses.replace(q, backbone="tf_efficientnet_lite0", views=dataclasses.replace(q.views, size=64))
        model = create_model(args.model, with_semantic=False, shipped=False, quality=q).eval()
    elif args.model is None:
        p.error("MODEL is required (or --smoke)")
    else:
        model = create_model(args.model, with_semantic=False).eval()
    df = load_dataset("agiqa3k", args.data_root)
    if args.split_file:
        df = df.drop(columns="split").merge(pd.read_csv(args.split_file)[["image_id", "split"]], on="image_id")
    if not model.cfg.quality.freeze_backbone:
        raise SystemExit("orientation means are taken over cached maps: a frozen backbone's model")
    result = {"model": model.model_id}
    for part in ("val", "test"):
        rows = df[df["split"] == part].reset_index(drop=True)
        if rows.empty:
            continue
        inputs, _ = prepare(model, args.model, rows, cache)
        preds = [oriented_predictions(model, inputs, flip, k) for flip in (False, True) for k in range(4)]
        mos = rows["mos"].to_numpy()
        result[part] = {name: {k: round(v, 4) for k, v in iqa_metrics(pred, mos).items() if k in ("srcc", "plcc")}
                        for name, pred in (("as_is", preds[0]), ("flip_mean", (preds[0] + preds[4]) / 2),
                                           ("all_8_mean", np.mean(preds, axis=0)))}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
