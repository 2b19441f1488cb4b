"""What knowing only an image's generator is worth on AGIQA-3K: each test image predicted by the mean MOS of
its generator's training images. A model near this figure has learnt to tell generators apart, not to rank
images within one; the per-generator SRCC of a model (jobs.evaluate) says how far it goes beyond.

    python benchmarks/generator_baseline.py [--data-root ../shared/datasets/agiqa3k] [--split-file RUN/split.csv]
        [--smoke]

Without --split-file: the reference's split procedure (jobs.train --split reference) and three seeded
three-way splits (--split-seed 1..3, 10 % val, 20 % test), the parts jobs.train would use; the val part is not
needed (nothing is chosen) and is left out. Prints JSON. --smoke: on the 40 images of samples/agiqa3k.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ma_agiqa.datasets import load_dataset, reference_split, split_three  # noqa: E402
from ma_agiqa.metrics import iqa_metrics  # noqa: E402


def generator_mean_prediction(train: pd.DataFrame, test: pd.DataFrame) -> np.ndarray:
    """Each test image's prediction: its generator's mean training MOS (the overall mean for a generator the
    training part lacks)."""
    means = train.groupby("generator")["mos"].mean()
    return test["generator"].map(means).fillna(train["mos"].mean()).to_numpy(np.float64)


def generator_means(train: pd.DataFrame, test: pd.DataFrame) -> dict:
    pred = generator_mean_prediction(train, test)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in iqa_metrics(pred, test["mos"].to_numpy()).items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "agiqa3k"))
    p.add_argument("--split-file", default=None, help="a jobs.train run's split.csv")
    p.add_argument("--smoke", action="store_true", help="seconds: the 40 images of samples/agiqa3k")
    args = p.parse_args(argv)
    if args.smoke:
        args.data_root = str(Path(__file__).resolve().parents[1] / "samples" / "agiqa3k")
    df = load_dataset("agiqa3k", args.data_root)
    out = {}
    if args.split_file:
        parts = pd.read_csv(args.split_file, dtype={"image_id": str})
        df = df.drop(columns="split").merge(parts, on="image_id")
        out[args.split_file] = generator_means(df[df["split"] == "train"], df[df["split"] == "test"])
    else:
        train, _, test = reference_split(df)
        out["reference"] = generator_means(train, test)
        for seed in (1, 2, 3):
            train, _, test = split_three(df, seed, False, 0.1, 0.2)
            out[f"seed {seed}"] = generator_means(train, test)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
