"""Evaluate a checkpoint on a labelled dataset: SRCC, PLCC, KRCC, RMSE, n, overall and per generator.

    python -m jobs.evaluate --model DIR --dataset agiqa3k --data-root DIR [--split val|test|train|all]
        [--split-file CSV] [--labels CSV] [--output metrics.json]

A training run's own parts: --split-file RUN/split.csv (jobs.train writes it) with --split test scores the
images that played no part in training or in choosing its epoch. Without --split-file the label file's
split column is read; where it has no test rows, val and test are both its val rows.
"""
from __future__ import annotations

import argparse
import json
import sys

import pandas as pd


def parse_args(argv=None):
    from ma_agiqa.datasets import LOADERS
    from ma_agiqa.registry import DEFAULT_MODEL

    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"a registered config or a checkpoint directory (default {DEFAULT_MODEL})")
    p.add_argument("--dataset", default="agiqa3k", choices=sorted(LOADERS),
                   help="the label file's layout (ma_agiqa/datasets.py)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--labels", default=None)
    p.add_argument("--target", default="quality", help="quality; agiqa3k: or align; aigciqa2023: or authenticity, correspondence")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    p.add_argument("--split-file", default=None,
                   help="CSV with image_id,split (a jobs.train run's split.csv) instead of the label file's split")
    p.add_argument("--output", default=None, help="where to write the JSON (default: print only)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--address", default=None)
    return p.parse_args(argv)


def evaluate(args) -> dict:
    from ma_agiqa import create_model
    from ma_agiqa.datasets import load_dataset
    from ma_agiqa.metrics import iqa_metrics
    from ma_agiqa.training import predict, prepare

    df = load_dataset(args.dataset, args.data_root, args.labels, args.target)
    if args.split_file:
        parts = pd.read_csv(args.split_file, dtype={"image_id": str})[["image_id", "split"]]
        df = df.drop(columns="split").merge(parts, on="image_id", how="inner")
    if args.split != "all":
        three_way = (df["split"] == "val").any() and (df["split"] == "test").any()
        wanted = [args.split] if three_way or args.split == "train" else ["val", "test"]
        df = df[df["split"].isin(wanted)].reset_index(drop=True)
        if df.empty:
            raise EvaluationError(f"no {args.split} rows in the split")
    model = create_model(args.model, with_semantic=False)
    inputs, _ = prepare(model, args.model, df, args.cache_dir, args.address)
    pred = predict(model, inputs)
    out = {"model": model.model_id, "dataset": args.dataset, "split": args.split, "split_file": args.split_file,
           **iqa_metrics(pred, df["mos"].to_numpy()), "played_a_role": played_a_role(args.model, df["image_id"])}
    role = out["played_a_role"]
    if role and (role["trained"] or role["chose_the_epoch"]):
        print(f"note: of these {len(df)} rows, {role['trained']} trained this checkpoint and {role['chose_the_epoch']} "
              "chose its epoch (its split.csv): not a held-out figure", file=sys.stderr)
    out["per_generator"] = {
        g: iqa_metrics(pred[idx], df["mos"].to_numpy()[idx])
        for g, idx in df.groupby("generator").indices.items()
    }
    out["predictions"] = dict(zip(df["image_id"], map(float, pred)))
    return out


def played_a_role(model: str, image_ids: pd.Series) -> dict | None:
    """How many of the rows scored trained the checkpoint or chose its epoch, by the split.csv that jobs.train
    leaves beside the weights (shipped checkpoints carry theirs); None where there is none."""
    from ma_agiqa.checkpoint import checkpoint_dir

    directory = checkpoint_dir(model)
    if directory is None or not (directory / "split.csv").is_file():
        return None
    parts = pd.read_csv(directory / "split.csv", dtype={"image_id": str})
    ids = set(image_ids)
    count = lambda part: int(parts.loc[parts["split"] == part, "image_id"].isin(ids).sum())  # noqa: E731
    return {"trained": count("train"), "chose_the_epoch": count("val")}


class EvaluationError(ValueError):
    """Options that select nothing to score: one line, exit 2."""


def finite(value):
    """NaN (a correlation over fewer than three images, or constant scores) as JSON's null: strict JSON
    readers refuse NaN."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = finite(evaluate(args))
    except EvaluationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(out, indent=2, allow_nan=False)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "predictions"}, indent=2, allow_nan=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
