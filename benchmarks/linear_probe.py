"""A linear probe of the offline configs' frozen backbone features: what the ImageNet EfficientNet-Lite2 maps
(levels 1-4, 544 channels on the 14x14 grid, as jobs.train caches them) hold about AGIQA-3K quality, without
the MANIQA head. Each image's map is pooled to its channels' mean and standard deviation over the grid (1,088
numbers), and a ridge regression is fitted on the train part, its strength chosen on the val part, scored on
the test part. Seconds instead of a training run, so it can be run on every split, and for each generator
left out, where the head's recipe costs 10-15 minutes a run on 2 cores.

    python benchmarks/linear_probe.py [--data-root ../shared/datasets/agiqa3k] [--model ma-agiqa-offline-quality]
        [--features BACKBONE@SIZE ...] [--pool mean-std|max|p10-p90|quadrants] [--cache-dir DIR] [--smoke]

--features (repeatable) replaces the config's backbone and view size (e.g. tf_efficientnet_lite2@448: the
whole 512 px image resized to 448 instead of 224) and concatenates the pooled maps of every set given; each
set is cached as jobs.train caches the config's (the first run of a new set computes it: minutes).

Splits: the reference's procedure (jobs.train --split reference), three seeded three-way splits (--split-seed
1..3, 10 % val, 20 % test) and leave one generator out (every image of a generator as test, val 10 % of the
others'), the parts jobs.train uses for the same options. Prints JSON; the generator-mean baseline
(benchmarks/generator_baseline.py) beside each figure.

--head-repeats RUN (a `jobs.train --repeats 3 --split-seed 1 --val-fraction 0.1 --test-fraction 0.2` run, whose
three splits are the probe's seeded ones) also scores each repeat's MANIQA head on its test part with
jobs.evaluate, and the mean of the head's and the probe's predictions: whether the two read different things
from the same features.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generator_baseline import mean_metrics  # noqa: E402

from ma_agiqa.datasets import generator_split, load_dataset, reference_split, split_three  # noqa: E402
from ma_agiqa.metrics import iqa_metrics  # noqa: E402

ALPHAS = [10.0 ** k for k in range(-2, 5)]


POOLS = {  # what each image's [C, g*g] map is pooled to, beside its channels' mean and std
    "mean-std": lambda m: [],
    "max": lambda m: [m.max(-1)],
    "p10-p90": lambda m: [np.percentile(m, 10, axis=-1), np.percentile(m, 90, axis=-1)],
    "quadrants": lambda m: [_quadrant_means(m)],
}


def _quadrant_means(m: np.ndarray) -> np.ndarray:
    g = int(round(m.shape[-1] ** 0.5))
    h = g // 2
    grid = m.reshape(*m.shape[:2], g, g)
    return np.concatenate([grid[..., i:i + h, j:j + h].mean((-1, -2)) for i in (0, h) for j in (0, h)], axis=1)


def pooled_features(model_ref: str, df: pd.DataFrame, backbone: str | None = None, size: int | None = None,
                    pool: str = "mean-std", cache: str | None = None) -> np.ndarray:
    """[N, kC]: mean and std over the grid of each image's cached backbone map (computed where not cached),
    and what ``pool`` adds."""
    import dataclasses

    from ma_agiqa import create_model, get_config
    from ma_agiqa.training import backbone_features
    from ma_agiqa.tiny import cache_dir

    q = get_config(model_ref).quality
    q = dataclasses.replace(q, backbone=backbone or q.backbone, views=dataclasses.replace(q.views, size=size or q.views.size))
    model = create_model(model_ref, with_semantic=False, shipped=False, quality=q)
    maps, _, _ = backbone_features(model, df, Path(cache) if cache else cache_dir() / "features")
    out = []
    for i in range(0, len(df), 256):
        m = maps[i : i + 256].astype(np.float32).reshape(min(256, len(df) - i), maps.shape[1], -1)
        out.append(np.concatenate([m.mean(-1), m.std(-1), *POOLS[pool](m)], axis=1))
    return np.concatenate(out)


def ridge(x: np.ndarray, y: np.ndarray, alpha: float):
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = (x - mean) / std
    w = np.linalg.solve(z.T @ z + alpha * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return lambda q: ((q - mean) / std) @ w + y.mean()


def probe(features: np.ndarray, df: pd.DataFrame, parts) -> dict:
    index = {i: k for k, i in enumerate(df["image_id"])}
    (xtr, ytr), (xva, yva), (xte, yte) = [
        (features[[index[i] for i in p["image_id"]]], p["mos"].to_numpy(np.float64)) for p in parts]
    best = max(ALPHAS, key=lambda a: _score(iqa_metrics(ridge(xtr, ytr, a)(xva), yva)))
    test = iqa_metrics(ridge(xtr, ytr, best)(xte), yte)
    baseline = mean_metrics(parts[0], parts[2], "generator")  # no srcc where one generator is the whole test part
    return {"alpha": best, **{k: round(float(v), 4) for k, v in test.items() if k != "n"}, "n": int(test["n"]),
            "generator_mean_srcc": baseline.get("srcc", float("nan")), "generator_mean_plcc": baseline.get("plcc", float("nan"))}


def head_and_probe(features: np.ndarray, df: pd.DataFrame, run: Path, seed: int, data_root: str) -> dict:
    """Test figures of the head trained in ``run`` (a repeat of jobs.train), of the probe on the same split, and
    of the mean of their predictions."""
    from jobs import evaluate

    parts = split_three(df, seed, False, 0.1, 0.2)
    saved = pd.read_csv(run / "split.csv")
    if set(saved["image_id"][saved["split"] == "test"]) != set(parts[2]["image_id"]):
        raise SystemExit(f"{run}: its test part is not the probe's seed-{seed} split (--split-seed 1 --val-fraction "
                         "0.1 --test-fraction 0.2 --repeats 3 makes them)")
    index = {i: k for k, i in enumerate(df["image_id"])}
    (xtr, ytr), (xva, yva), (xte, yte) = [
        (features[[index[i] for i in p["image_id"]]], p["mos"].to_numpy(np.float64)) for p in parts]
    alpha = max(ALPHAS, key=lambda a: _score(iqa_metrics(ridge(xtr, ytr, a)(xva), yva)))
    probe_pred = ridge(xtr, ytr, alpha)(xte)
    scored = evaluate.evaluate(evaluate.parse_args([
        "--model", str(run), "--data-root", data_root, "--split", "test", "--split-file", str(run / "split.csv")]))
    head_pred = np.array([scored["predictions"][i] for i in parts[2]["image_id"]])
    out = {}
    for name, pred in (("head", head_pred), ("probe", probe_pred), ("mean", (head_pred + probe_pred) / 2)):
        m = iqa_metrics(pred, yte)
        out[name] = {"srcc": round(float(m["srcc"]), 4), "plcc": round(float(m["plcc"]), 4)}
    return out


def _score(m: dict) -> float:
    s = m["srcc"] + m["plcc"]
    return -np.inf if np.isnan(s) else s


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets" / "agiqa3k"))
    p.add_argument("--model", default="ma-agiqa-offline-quality", help="a registered config with a frozen CNN backbone")
    p.add_argument("--features", action="append", default=[], metavar="BACKBONE@SIZE",
                   help="feature sets to concatenate instead of the config's (backbone and view size)")
    p.add_argument("--pool", choices=sorted(POOLS), default="mean-std",
                   help="statistics of each channel over the grid beside its mean and std (quadrants: the mean of each "
                        "quarter of the grid)")
    p.add_argument("--head-repeats", type=Path, default=None, metavar="RUN",
                   help="a jobs.train --repeats 3 --split-seed 1 --val-fraction 0.1 --test-fraction 0.2 run: score its "
                        "heads too, and the mean of head and probe")
    p.add_argument("--cache-dir", default=None, help="feature cache (default ~/.cache/ma_agiqa/features)")
    p.add_argument("--smoke", action="store_true",
                   help="seconds: samples/agiqa3k's 40 images, tf_efficientnet_lite0@64, a temporary cache")
    args = p.parse_args(argv)
    if args.smoke:
        from _common import scratch_dir

        args.data_root = str(Path(__file__).resolve().parents[1] / "samples" / "agiqa3k")
        args.features = args.features or ["tf_efficientnet_lite0@64"]
        args.cache_dir = args.cache_dir or scratch_dir("linear_probe_smoke_")
    df = load_dataset("agiqa3k", args.data_root)
    sets = [(b, int(s)) for b, _, s in (f.partition("@") for f in args.features)] or [(None, None)]
    features = np.concatenate([pooled_features(args.model, df, b, s, args.pool, args.cache_dir) for b, s in sets], axis=1)
    out = {"model": args.model, "feature_sets": args.features or ["config"], "pool": args.pool, "features": features.shape[1],
           "reference": probe(features, df, reference_split(df))}
    out["seeds"] = {s: probe(features, df, split_three(df, s, False, 0.1, 0.2)) for s in (1, 2, 3)}
    out["seeds_median"] = {k: statistics.median(r[k] for r in out["seeds"].values()) for k in ("srcc", "plcc")}
    out["leave_one_generator_out"] = {
        g: probe(features, df, generator_split(df, g, 0, 0.1)) for g in sorted(df["generator"].unique())}
    out["leave_one_generator_out_median"] = {
        k: statistics.median(r[k] for r in out["leave_one_generator_out"].values()) for k in ("srcc", "plcc")}
    if args.head_repeats is not None:
        runs = {s: head_and_probe(features, df, args.head_repeats / f"repeat-{s - 1}", s, args.data_root) for s in (1, 2, 3)}
        out["head_repeats"] = runs
        out["head_repeats_median"] = {
            name: {k: statistics.median(r[name][k] for r in runs.values()) for k in ("srcc", "plcc")}
            for name in ("head", "probe", "mean")}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
