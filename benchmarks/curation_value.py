"""What a curator gets from a model's scores: keep the top 10 %, 30 %, 50 % of a labelled part by score, and
compare what was kept with the best possible pick (the top by MOS, "oracle") and a random one.

    python benchmarks/curation_value.py [--model ma-agiqa-offline-quality | --predictions FILE]
        [--data-root ../shared/datasets/agiqa3k] [--part reference-test|label-val|all] [--split-file CSV]
        [--trained-on none|label|CSV]

For each kept fraction: the mean MOS kept, the oracle's and a random pick's (its expected value: the part's
mean); ``gain_captured``, (kept - random) / (oracle - random); the share of the true bottom quartile (by MOS)
that survives (a random pick's expectation: the fraction itself); and the overlap with the oracle set,
|kept ∩ oracle| / |oracle| (random: the fraction). Per prompt, over prompts with at least two images in the
part: how often the top-scored image is the prompt's best by MOS (ties in MOS count as best), beside a random
pick's expectation.

Scores come from ``--model`` (scored through the library as jobs.evaluate scores, with its feature cache) or
``--predictions`` (jobs.evaluate --output JSON, whose "predictions" map image_id to score, or a CSV with
image_id and score columns). ``--part`` chooses the images: the reference split's test part (jobs.train
--split reference), the label file's val rows, or all; ``--split-file`` (a jobs.train run's split.csv) takes
its test rows instead. ``--trained-on`` drops from the part the images the model was trained on: ``label``,
the label file's train rows (what the shipped checkpoints were trained on), or a run's split.csv (its train
rows). Prints JSON.

--smoke: the shipped default model (ma-agiqa-offline-quality) on samples/agiqa3k's 40 labelled images (seconds).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ma_agiqa.datasets import load_dataset, reference_split  # noqa: E402
from ma_agiqa.metrics import iqa_metrics  # noqa: E402
from ma_agiqa.registry import DEFAULT_MODEL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FRACTIONS = (0.1, 0.3, 0.5)


def curation_value(score: np.ndarray, mos: np.ndarray, prompts: np.ndarray | None = None,
                   fractions=FRACTIONS) -> dict:
    """The curator's figures for scores ``score`` of images with MOS ``mos`` (and their prompts, for the
    per-prompt pick). The top k is taken by a stable sort, so ties keep the part's order."""
    score, mos = np.asarray(score, np.float64), np.asarray(mos, np.float64)
    n = len(mos)
    by_score = np.argsort(-score, kind="stable")
    by_mos = np.argsort(-mos, kind="stable")
    bottom = set(np.argsort(mos, kind="stable")[: max(1, n // 4)].tolist())
    out = {"n": n}
    for f in fractions:
        k = max(1, int(round(f * n)))
        kept, oracle = set(by_score[:k].tolist()), set(by_mos[:k].tolist())
        kept_mos, oracle_mos, random_mos = mos[by_score[:k]].mean(), mos[by_mos[:k]].mean(), mos.mean()
        out[f"top_{round(f * 100)}%"] = {
            "k": k,
            "mean_mos_kept": round(float(kept_mos), 4),
            "mean_mos_oracle": round(float(oracle_mos), 4),
            "mean_mos_random": round(float(random_mos), 4),
            "gain_captured": round(float((kept_mos - random_mos) / (oracle_mos - random_mos)), 4)
            if oracle_mos > random_mos else float("nan"),
            "bottom_quartile_survivors": round(len(kept & bottom) / len(bottom), 4),
            "bottom_quartile_survivors_random": round(k / n, 4),
            "oracle_overlap": round(len(kept & oracle) / k, 4),
            "oracle_overlap_random": round(k / n, 4),
        }
    if prompts is not None:
        hits, chance, groups = 0, 0.0, 0
        for idx in pd.Series(np.arange(n)).groupby(np.asarray(prompts)).indices.values():
            if len(idx) < 2:
                continue
            groups += 1
            best = mos[idx].max()
            hits += mos[idx[np.argmax(score[idx])]] == best
            chance += (mos[idx] == best).mean()
        out["per_prompt"] = {"prompts": groups,
                             "top_scored_is_best": round(hits / groups, 4) if groups else float("nan"),
                             "random_pick_is_best": round(chance / groups, 4) if groups else float("nan")}
    return out


def choose_part(df: pd.DataFrame, part: str, split_file: str | None) -> pd.DataFrame:
    if split_file:
        s = pd.read_csv(split_file, dtype={"image_id": str})
        return df[df["image_id"].isin(set(s["image_id"][s["split"] == "test"]))].reset_index(drop=True)
    if part == "reference-test":
        return reference_split(df)[2]
    if part == "label-val":
        return df[df["split"].isin(["val", "test"])].reset_index(drop=True)
    return df.reset_index(drop=True)


def trained_ids(df: pd.DataFrame, trained_on: str) -> set:
    """The images a model was trained on: the label file's train rows (``label``), a split.csv's, or none."""
    if trained_on == "none":
        return set()
    if trained_on == "label":
        return set(df["image_id"][df["split"] == "train"])
    s = pd.read_csv(trained_on, dtype={"image_id": str})
    return set(s["image_id"][s["split"] == "train"])


def read_predictions(path: str) -> dict:
    if path.endswith(".json"):
        return {str(k): float(v) for k, v in json.loads(Path(path).read_text())["predictions"].items()}
    t = pd.read_csv(path, dtype={"image_id": str})
    return dict(zip(t["image_id"], t["score"].astype(float)))


def score_part(model: str, part: pd.DataFrame, data_root: str, labels: str | None, cache_dir: str | None) -> dict:
    """The model's scores of ``part``'s images, through jobs.evaluate (its feature cache, its predictions)."""
    from jobs import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        split_file = Path(tmp) / "split.csv"
        pd.DataFrame({"image_id": part["image_id"], "split": "test"}).to_csv(split_file, index=False)
        argv = ["--model", model, "--data-root", data_root, "--split", "test", "--split-file", str(split_file)]
        argv += ["--labels", labels] if labels else []
        argv += ["--cache-dir", cache_dir] if cache_dir else []
        return evaluate.evaluate(evaluate.parse_args(argv))["predictions"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help="a registered model or checkpoint directory to score with "
                                                     f"(default {DEFAULT_MODEL}, the shipped default)")
    p.add_argument("--predictions", default=None, help="scores instead of --model: jobs.evaluate --output JSON, or CSV "
                                                        "with image_id,score")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "datasets" / "agiqa3k"))
    p.add_argument("--labels", default=None)
    p.add_argument("--part", choices=["reference-test", "label-val", "all"], default="reference-test")
    p.add_argument("--split-file", default=None, help="a jobs.train run's split.csv: its test rows are the part")
    p.add_argument("--trained-on", default="none", help="drop these training images from the part: none, label (the "
                                                        "label file's train rows: the shipped checkpoints'), or a split.csv")
    p.add_argument("--cache-dir", default=None, help="the feature cache (default: jobs.evaluate's)")
    p.add_argument("--smoke", action="store_true", help="the shipped quality model on the 40 sample images")
    args = p.parse_args(argv)
    if args.smoke:
        args.model, args.data_root, args.part, args.trained_on = DEFAULT_MODEL, str(REPO / "samples" / "agiqa3k"), "all", "none"
    df = load_dataset("agiqa3k", args.data_root, args.labels)
    part = choose_part(df, args.part, args.split_file)
    trained = trained_ids(df, args.trained_on)
    n_part = len(part)
    part = part[~part["image_id"].isin(trained)].reset_index(drop=True)
    if args.predictions:
        scores = read_predictions(args.predictions)
    elif args.smoke:
        with tempfile.TemporaryDirectory() as cache:  # the samples' features stay out of the real cache
            scores = score_part(args.model, part, args.data_root, args.labels, cache)
    else:
        scores = score_part(args.model, part, args.data_root, args.labels, args.cache_dir)
    missing = [i for i in part["image_id"] if i not in scores]
    if missing:
        raise SystemExit(f"no score for {len(missing)} images of the part, e.g. {missing[:3]}")
    score = np.array([scores[i] for i in part["image_id"]])
    mos = part["mos"].to_numpy(np.float64)
    m = iqa_metrics(score, mos)
    out = {"model": args.predictions or args.model, "part": args.split_file or args.part, "trained_on": args.trained_on,
           "n_part": n_part, "dropped_as_trained_on": n_part - len(part),
           **{k: round(float(m[k]), 4) for k in ("srcc", "plcc", "krcc", "rmse")},
           **curation_value(score, mos, part["prompt"].to_numpy())}
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
