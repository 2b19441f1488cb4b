"""Evaluate a checkpoint on a labelled dataset: SRCC, PLCC, KRCC, RMSE, n, overall and per generator.

    python -m jobs.evaluate --model DIR --dataset agiqa3k --data-root DIR [--split val|test|train|all]
        [--labels CSV] [--output metrics.json]
"""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="agiqa3k", choices=["agiqa3k", "agiqa1k", "aigciqa2023", "aigiqa20k"],
                   help="the label file's layout (ma_agiqa/datasets.py)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--labels", default=None)
    p.add_argument("--target", default="quality", help="quality; agiqa3k: or align; aigciqa2023: or authenticity, correspondence")
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
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
    if args.split != "all":
        df = df[df["split"].isin(["val", "test"] if args.split in ("val", "test") else [args.split])].reset_index(drop=True)
    model = create_model(args.model, with_semantic=False)
    inputs, _ = prepare(model, args.model, df, args.cache_dir, args.address)
    pred = predict(model, inputs)
    out = {"model": model.model_id, "dataset": args.dataset, "split": args.split, **iqa_metrics(pred, df["mos"].to_numpy())}
    out["per_generator"] = {
        g: iqa_metrics(pred[idx], df["mos"].to_numpy()[idx])
        for g, idx in df.groupby("generator").indices.items()
    }
    out["predictions"] = dict(zip(df["image_id"], map(float, pred)))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    out = evaluate(args)
    text = json.dumps(out, indent=2)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "predictions"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
