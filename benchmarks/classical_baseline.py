"""A classical no-reference baseline on the same split as the trained models: the variance of the
Laplacian of the grey image (a sharpness measure), through the project's own decoder and metrics.

    python benchmarks/classical_baseline.py [--data-root ../shared/datasets/agiqa3k] [--split val]

BRISQUE (PyPI `brisque`) was not used: it pulls in OpenCV, scikit-image and libsvm for one baseline.
"""
from __future__ import annotations

import argparse
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from scipy import ndimage

from ma_agiqa.datasets import load_dataset
from ma_agiqa.images import decode_image
from ma_agiqa.metrics import iqa_metrics


def laplacian_variance(path: str) -> float:
    grey = np.asarray(decode_image(Path(path).read_bytes()).convert("L"), dtype=np.float64)
    return float(ndimage.laplace(grey).var())


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/agiqa3k"))
    p.add_argument("--split", default="val")
    args = p.parse_args()
    df = load_dataset("agiqa3k", args.data_root)
    df = df[df["split"] == args.split].reset_index(drop=True)
    with ThreadPoolExecutor(4) as pool:
        pred = np.array(list(pool.map(laplacian_variance, df["uri"])))
    out = {"baseline": "laplacian variance", "split": args.split, **iqa_metrics(np.log1p(pred), df["mos"].to_numpy())}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
