"""A classical no-reference baseline on the same split as the trained models: the variance of the
Laplacian of the grey image (a sharpness measure), through the project's own decoder and metrics.

    python benchmarks/classical_baseline.py [--data-root ../shared/datasets/agiqa3k] [--split val]
    python benchmarks/classical_baseline.py --smoke   # seconds: the 40 sample images (samples/agiqa3k) instead

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


REPO = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--data-root", default=str(REPO.parent / "shared/datasets/agiqa3k"))
    p.add_argument("--split", default="val")
    p.add_argument("--smoke", action="store_true", help="seconds, for the test suite: the sample's split of 40 images")
    args = p.parse_args(argv)
    if args.smoke:
        args.data_root = str(REPO / "samples" / "agiqa3k")
    df = load_dataset("agiqa3k", args.data_root)
    df = df[df["split"] == args.split].reset_index(drop=True)
    with ThreadPoolExecutor(4) as pool:
        pred = np.array(list(pool.map(laplacian_variance, df["uri"])))
    out = {"baseline": "laplacian variance", "split": args.split, **iqa_metrics(np.log1p(pred), df["mos"].to_numpy())}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
