"""What knowing only an image's generator, or only its prompt, is worth on AGIQA-3K: each test image predicted
by the mean MOS of the training images of its generator (``--by generator``) or of its prompt (``--by prompt``).
A model near the first has learnt to tell generators apart, not to rank images within one; the per-generator
SRCC of a model (jobs.evaluate) says how far it goes beyond. The second is what a prompt expert can learn
from the prompt alone: with ``--each-generator`` (each generator's images predicted from the other nine's,
as ``jobs.train --each-generator`` tests), it says whether a prompt's quality on other generators ranks a
new generator's images at all.

    python benchmarks/generator_baseline.py [--by generator|prompt] [--each-generator]
        [--data-root ../shared/datasets/agiqa3k] [--split-file RUN/split.csv] [--smoke]

Without --split-file or --each-generator: the reference's split procedure (jobs.train --split reference) and
three seeded three-way splits (--split-seed 1..3, 10 % val, 20 % test), the parts jobs.train would use; the
val part is not needed (nothing is chosen) and is left out. Prints JSON. --smoke: on the 40 images of
samples/agiqa3k.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ma_agiqa.datasets import generator_split, load_dataset, reference_split, split_three  # noqa: E402
from ma_agiqa.metrics import iqa_metrics  # noqa: E402


def mean_prediction(train: pd.DataFrame, test: pd.DataFrame, by: str = "generator") -> np.ndarray:
    """Each test image's prediction: the mean training MOS of the images sharing its ``by`` column (the overall
    training mean for a value the training part lacks)."""
    means = train.groupby(by)["mos"].mean()
    return test[by].map(means).fillna(train["mos"].mean()).to_numpy(np.float64)


def mean_metrics(train: pd.DataFrame, test: pd.DataFrame, by: str = "generator") -> dict:
    pred = mean_prediction(train, test, by)
    if np.ptp(pred) == 0:  # one value for every image (one generator's part): no ranking to measure
        return {"n": len(test), "ranks": False}
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in iqa_metrics(pred, test["mos"].to_numpy()).items()}


def each_generator(df: pd.DataFrame, by: str) -> dict:
    """Leave one generator out, as ``jobs.train --each-generator --val-fraction 0.1`` splits: each generator's
    images predicted from the other generators' train part (their val part is not needed and is left out)."""
    out = {}
    for g in sorted(df["generator"].unique()):
        train, _, test = generator_split(df, g, 0, 0.1)
        out[g] = mean_metrics(train, test, by)
    ranked = [m for m in out.values() if m.get("srcc") is not None]
    if ranked:
        out["median"] = {k: round(float(np.median([m[k] for m in ranked])), 4) for k in ("srcc", "plcc")}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "agiqa3k"))
    p.add_argument("--split-file", default=None, help="a jobs.train run's split.csv")
    p.add_argument("--by", choices=["generator", "prompt"], default="generator", help="the column whose mean predicts")
    p.add_argument("--each-generator", action="store_true", help="leave one generator out instead of the splits")
    p.add_argument("--smoke", action="store_true", help="seconds: the 40 images of samples/agiqa3k")
    args = p.parse_args(argv)
    if args.smoke:
        args.data_root = str(Path(__file__).resolve().parents[1] / "samples" / "agiqa3k")
    df = load_dataset("agiqa3k", args.data_root)
    out = {}
    if args.each_generator:
        out["each generator"] = each_generator(df, args.by)
    elif args.split_file:
        parts = pd.read_csv(args.split_file, dtype={"image_id": str})
        df = df.drop(columns="split").merge(parts, on="image_id")
        out[args.split_file] = mean_metrics(df[df["split"] == "train"], df[df["split"] == "test"], args.by)
    else:
        train, _, test = reference_split(df)
        out["reference"] = mean_metrics(train, test, args.by)
        for seed in (1, 2, 3):
            train, _, test = split_three(df, seed, False, 0.1, 0.2)
            out[f"seed {seed}"] = mean_metrics(train, test, args.by)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
