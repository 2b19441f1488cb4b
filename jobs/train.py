"""Train MA-AGIQA's trainable parts on a labelled dataset; the frozen parts are computed once and cached.

    python -m jobs.train --dataset agiqa3k --data-root DIR --model CONFIG_OR_DIR --output DIR
        [--split label|random|reference] [--split-file F | --split-seed S [--split-by-prompt]]
        [--val-fraction F --test-fraction F] [--set quality.FIELD=VALUE ...] [--epochs N] [--drop-prompt P]
        [--repeats K | --test-generator G | --each-generator] [--address ADDR] [--workers N [--gpu]]

Splits: the label file's split column (or --split-file's) by default; --split random (implied by
--split-seed or --repeats) a seeded one, --test-fraction F holding out a test part; --split reference the
reference's script's: Python's random seeded with 20 shuffles the rows, 70 % train, 10 % val, 20 % test.
--test-generator G holds out one generator's images as the test part (val drawn from the others' with
--val-fraction); --each-generator does that once per generator (leave one generator out), each in
OUTPUT/generator-<G>, with the table of test metrics by generator in OUTPUT/metrics.json.
The val part chooses the epoch (best val SRCC + PLCC); the test part, where there is one, is scored once
with that epoch's weights and reported as "test" in metrics.json: it played no role in either.

Writes a checkpoint directory (loadable by from_pretrained and by jobs.score --model DIR), metrics.json
(per-epoch train/val SRCC, PLCC, loss; the test part's metrics), split.csv (image_id, split: for
jobs.evaluate --split-file) and the config used. With --repeats K: K seeded random splits, each
in OUTPUT/repeat-<k>, and the median and spread of the best val metrics (and of the test part's) in
OUTPUT/metrics.json. With --workers N the same training loop runs data-parallel on N Ray Train workers
(TorchTrainer, one GPU each with --gpu) of the local Ray or the cluster at --address: each step equals the
single-process step.

Resumable: each epoch's state is saved in OUTPUT/train_state.pt, and the same command run again (after a kill
or a time-out) continues from the last finished epoch to the result an uninterrupted run gives; a finished
run (or repeat) is not trained again, wherever it was written. So --each-generator's runs can be spread over
processes: each runs --test-generator G --output OUTPUT/generator-<G>, and --each-generator then takes them
as they are. Each epoch's figures are appended to OUTPUT/train.log; on a terminal a progress bar shows the
epoch, its loss and val SRCC.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import pandas as pd


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _weight(text: str) -> float:
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def parse_args(argv=None):
    from ma_agiqa.config import PRECISIONS
    from ma_agiqa.datasets import LOADERS

    p = argparse.ArgumentParser(prog="python -m jobs.train", description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="agiqa3k", choices=sorted(LOADERS),
                   help="the label file's layout (ma_agiqa/datasets.py)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--labels", default=None, help="label file (default: the dataset's own under --data-root)")
    p.add_argument("--target", default="quality", help="quality; agiqa3k: or align; aigciqa2023: or authenticity, correspondence")
    p.add_argument("--model", required=True, help="a registered config or a checkpoint directory to fine-tune")
    p.add_argument("--output", required=True)
    p.add_argument("--split", choices=["label", "random", "reference"], default=None,
                   help="label: the label file's (or --split-file's) split column; random: seeded (--split-seed, "
                        "--val-fraction, --test-fraction); reference: MA-AGIQA's random.seed(20) 70/10/20 train / val "
                        "/ test (with --split-seed S, seeded with S). Default: random with --split-seed or --repeats, "
                        "else label")
    p.add_argument("--val-fraction", type=float, default=0.2, help="random splits: the val part's fraction")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="random splits: hold out this fraction as a test part, reported after training (0: no test "
                        "part; val both chooses the epoch and reports)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a field of a registered config's quality branch or MoE before training, e.g. "
                        "quality.stage_conv=true, quality.views.antialias=false, moe.gate=linear (values as JSON)")
    p.add_argument("--split-file", default=None, help="CSV with image_id,split columns")
    p.add_argument("--split-seed", type=int, default=None, help="seeded random split instead of the label file's")
    p.add_argument("--split-by-prompt", action="store_true", help="no prompt on both sides of the split")
    # Training options: None is the config's value; any value given, 0 included, is used as given.
    p.add_argument("--epochs", type=_count, default=None, help="epochs to train (>= 1; default: the config's)")
    p.add_argument("--lr", type=_weight, default=None,
                   help="learning rate (>= 0; 0 trains nothing, the heads keep their initial weights)")
    p.add_argument("--seed", type=int, default=None,
                   help="the training seed (order, augmentation, dropout; the heads start from the same weights): "
                        "heads of several seeds make an ensemble (python -m jobs.ensemble)")
    p.add_argument("--batch-size", type=_count, default=None)
    p.add_argument("--scheduler", choices=["cosine-iter", "cosine-epoch"], default=None,
                   help="cosine-iter: the reference's CosineAnnealingLR(T_max) stepped per iteration")
    p.add_argument("--t-max", type=_count, default=None)
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up of the rates over this many epochs before the cosine (cosine-epoch)")
    p.add_argument("--plcc-loss", type=_weight, default=None,
                   help="weight of a (1 - PLCC) term over each batch, added to the MSE (default: the config's, 0)")
    p.add_argument("--rank-loss", type=_weight, default=None,
                   help="weight of a pairwise ranking (RankNet) term over each batch, added to the MSE (default: "
                        "the config's, 0)")
    p.add_argument("--normalize-mos", action=argparse.BooleanOptionalAction, default=None,
                   help="train on (mos - mean) / std of the training split (--no-normalize-mos: raw MOS)")
    p.add_argument("--backbone", choices=["config", "frozen", "trainable"], default="config",
                   help="freeze the quality backbone or train it (registered configs; default: as the config says)")
    p.add_argument("--backbone-lr", type=_weight, default=None, help="learning rate of a trainable backbone (default: --lr)")
    p.add_argument("--trainable-stages", type=int, default=None, metavar="N",
                   help="train the backbone's last N stages (a CNN's blocks) and keep the rest frozen, its outputs "
                        "cached: partial fine-tuning at a fraction of a trainable backbone's cost (default: the "
                        "config's, 0)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="the training forward's precision: bfloat16 runs it under autocast, the weights and the "
                        "loss float32 (about 2x faster for a trainable backbone on a CPU with AVX-512 BF16, "
                        "benchmarks/train_step.py; default: the config's, float32)")
    p.add_argument("--drop-prompt", type=_fraction, default=None,
                   help="expert dropout: the fraction of training images whose prompt expert is marked absent, so "
                        "images scored without a prompt stay on the MOS scale (models with a prompt expert; "
                        "default: the config's, 0.25 for registered configs)")
    p.add_argument("--limit", type=int, default=None, help="use the first N rows of each split (smoke runs)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--test-generator", default=None,
                   help="hold out this generator's images as the test part (val from the other generators')")
    p.add_argument("--each-generator", action="store_true",
                   help="leave one generator out: one run per generator, each testing on the held-out one")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar per epoch (default: on a terminal)")
    p.add_argument("--cache-dir", default=None, help="feature cache (default ~/.cache/ma_agiqa/features)")
    p.add_argument("--address", default=None, help="Ray address for the MLLM feature extraction and --workers")
    p.add_argument("--workers", type=_count, default=1,
                   help="data-parallel Ray Train workers (TorchTrainer); 1: this process alone")
    p.add_argument("--gpu", action=argparse.BooleanOptionalAction, default=None,
                   help="train on a GPU (one per worker); default: when one is visible (single process) / off (workers)")
    return p.parse_args(argv)


def split_scheme(args) -> str:
    if args.test_generator is not None:
        return f"generator:{args.test_generator}"
    if args.split is not None:
        return args.split
    if args.split_file:
        return "label"
    return "random" if args.split_seed is not None or args.repeats > 1 else "label"


def splits(args, df: pd.DataFrame, repeat: int):
    """(train, val, test); test is empty where the split has no test part."""
    from ma_agiqa.datasets import REFERENCE_SPLIT_SEED, generator_split, reference_split, split_three

    scheme = split_scheme(args)
    if args.test_generator is not None:
        try:
            return generator_split(df, args.test_generator, args.split_seed or 0, args.val_fraction)
        except ValueError as e:
            raise SystemExit(f"--test-generator {e}")
    if args.test_fraction and scheme != "random":
        raise SystemExit("--test-fraction applies to --split random (the reference split has its own 20 % test)")
    if args.split_file:
        s = pd.read_csv(args.split_file, dtype={"image_id": str})[["image_id", "split"]]
        df = df.drop(columns="split").merge(s, on="image_id", how="inner")
    if scheme == "reference":
        return reference_split(df, (REFERENCE_SPLIT_SEED if args.split_seed is None else args.split_seed) + repeat)
    if scheme == "label":
        return split_three(df)
    return split_three(df, (args.split_seed or 0) + repeat, args.split_by_prompt, args.val_fraction, args.test_fraction)


def _set_field(obj, path: list[str], value, full: str):
    import dataclasses

    names = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
    if path[0] not in names:
        raise SystemExit(f"--set {full}: {type(obj).__name__} has no field {path[0]!r}")
    current = getattr(obj, path[0])
    if len(path) > 1:
        value = _set_field(current, path[1:], value, full)
    elif isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return dataclasses.replace(obj, **{path[0]: value})


# The command line's options that set a TrainConfig field of the same name.
TRAIN_OPTIONS = ("backbone_lr", "epochs", "lr", "seed", "batch_size", "scheduler", "t_max", "warmup_epochs",
                 "normalize_mos", "drop_prompt", "plcc_loss", "rank_loss", "precision")


def apply_train_args(t, args):
    """``t`` (a TrainConfig) with the command line's training options on top (an option not given, None,
    keeps the config's value; 0 is a value); returns it."""
    for name in TRAIN_OPTIONS:
        value = getattr(args, name)
        if value is not None:
            setattr(t, name, value)
    return t


def config_overrides(args) -> dict:
    """The quality and MoE configs that --backbone and --set change, as create_model overrides."""
    import dataclasses
    import json as _json

    stages = getattr(args, "trainable_stages", None)
    if args.backbone == "config" and not args.set and stages is None:
        return {}
    from ma_agiqa.checkpoint import load_config

    cfg = load_config(args.model)
    parts = {"quality": cfg.quality, "moe": cfg.moe}
    if args.backbone != "config":
        parts["quality"] = dataclasses.replace(parts["quality"], freeze_backbone=args.backbone == "frozen")
    if stages is not None:
        if args.backbone == "trainable":
            raise SystemExit("--trainable-stages is for a frozen backbone: --backbone trainable trains every stage")
        try:
            parts["quality"] = dataclasses.replace(parts["quality"], freeze_backbone=True, trainable_stages=stages)
        except ValueError as e:
            raise SystemExit(f"--trainable-stages {stages}: {e}")
    for item in args.set:
        path, eq, text = item.partition("=")
        if not eq or path.split(".")[0] not in parts or "." not in path:
            raise SystemExit(f"--set {item!r}: expected quality.FIELD=VALUE or moe.FIELD=VALUE")
        try:
            value = _json.loads(text)
        except ValueError:
            value = text
        top, *rest = path.split(".")
        parts[top] = _set_field(parts[top], rest, value, item)
    return {k: v for k, v in parts.items() if v is not getattr(cfg, k)}


# Options that change how a run is shown or where its inputs are cached, not what it trains.
NOT_SETTINGS = ("progress", "address", "cache_dir")


def run_settings(args) -> dict:
    """What a finished run records of how it was made; a run with the same settings is not trained again."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}, default=str))


def finished_run(output: Path, settings: dict) -> dict | None:
    """The metrics of a run that finished in ``output`` with these settings, else None."""
    try:
        saved = json.loads((output / "train_config.json").read_text())
        metrics = json.loads((output / "metrics.json").read_text())
    except (FileNotFoundError, ValueError):
        return None
    # Where a run was written is not how it was made: a moved run, or `--test-generator G` trained into an
    # `--each-generator` run's generator-G folder (so its ten runs can be spread over processes), is the same run.
    if (output / STATE_FILE).exists() or _how(saved) != _how(settings):
        return None
    return metrics


def _how(settings: dict) -> dict:
    # An option not given (None) is the config's default, as it was before the option existed.
    return {k: v for k, v in settings.items() if k not in ("train", "output") and v is not None}


STATE_FILE = "train_state.pt"


def train_once(args, df, output: Path, repeat: int = 0) -> dict:
    import torch

    from ma_agiqa import create_model
    from ma_agiqa.training import prepare, train

    settings = run_settings(args)
    done = finished_run(output, settings)
    if done is not None:
        print(f"{output}: trained already with these settings (delete its metrics.json to train again)", file=sys.stderr)
        return done
    output.mkdir(parents=True, exist_ok=True)
    log_file = output / "train.log"

    def log(line: str) -> None:
        print(line, flush=True)
        with open(log_file, "a") as f:
            f.write(line + "\n")

    train_df, val_df, test_df = splits(args, df, repeat)
    if args.limit:
        train_df, val_df, test_df = train_df.head(args.limit), val_df.head(args.limit), test_df.head(args.limit)
    torch.manual_seed(0)
    # A registered name trains from scratch, even where trained heads ship with it; a directory fine-tunes.
    overrides = config_overrides(args)
    model = create_model(args.model, with_semantic=False, shipped=False, **overrides)
    t = apply_train_args(model.cfg.train, args)
    train_in, stats_train = prepare(model, args.model, train_df, args.cache_dir, args.address)
    val_in, stats_val = prepare(model, args.model, val_df, args.cache_dir, args.address)
    test_in, stats_test = prepare(model, args.model, test_df, args.cache_dir, args.address) if len(test_df) else (None, {})
    if args.workers > 1:
        import ray

        from ma_agiqa.training import train_distributed

        ray.init(address=args.address or os.environ.get("RAY_ADDRESS") or "local", ignore_reinit_error=True)
        result = train_distributed(args.model, vars(t), train_in, val_in, output, args.workers, use_gpu=bool(args.gpu),
                                   model_overrides=overrides)
        from ma_agiqa.checkpoint import model_id

        checkpoint = model_id(output)
    else:
        gpu = torch.cuda.is_available() if args.gpu is None else args.gpu
        model.to("cuda" if gpu else "cpu")
        result = train(model, train_in, val_in, log=log, state_path=output / STATE_FILE, progress=args.progress)
        model.save_pretrained(output)
        checkpoint = model.model_id
    test = None
    if test_in is not None:  # scored once, with the weights of the epoch that val chose
        from ma_agiqa.metrics import iqa_metrics
        from ma_agiqa.training import predict

        scorer = model if args.workers == 1 else create_model(str(output), with_semantic=False)
        test = {**iqa_metrics(predict(scorer, test_in), test_in.mos), "epoch": result["best_epoch"]}
    from ma_agiqa.datasets import split_table

    split_table(train_df, val_df, test_df).to_csv(output / "split.csv", index=False)
    metrics = {
        "dataset": args.dataset, "model": args.model, "checkpoint": checkpoint, "workers": args.workers,
        "split": split_scheme(args), "n_train": len(train_df), "n_val": len(val_df), "n_test": len(test_df),
        "test": test, "cache": {"train": stats_train, "val": stats_val, "test": stats_test}, **result,
    }
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (output / "train_config.json").write_text(json.dumps({**settings, "train": vars(t)}, indent=2, default=str) + "\n")
    (output / STATE_FILE).unlink(missing_ok=True)  # finished: the checkpoint and metrics.json say the rest
    return metrics


def summarise(runs: list[dict]) -> dict:
    keys = ["val_srcc", "val_plcc"] + (["test_srcc", "test_plcc", "test_krcc", "test_rmse"] if "test_srcc" in runs[0] else [])
    return {k: {"median": statistics.median(r[k] for r in runs), "min": min(r[k] for r in runs),
                "max": max(r[k] for r in runs)} for k in keys}


def flat(m: dict) -> dict:
    return {**m["best"], **{f"test_{key}": v for key, v in (m["test"] or {}).items() if key != "epoch"}}


def main(argv=None) -> int:
    import copy

    from ma_agiqa.datasets import load_dataset

    args = parse_args(argv)
    if sum([args.repeats > 1, args.test_generator is not None, args.each_generator]) > 1:
        raise SystemExit("--repeats, --test-generator and --each-generator choose the split each their own way: "
                         "use one of them")
    if (args.test_generator is not None or args.each_generator) and (args.split or args.split_file or args.test_fraction):
        raise SystemExit("--test-generator and --each-generator make their own split (the generator's images as "
                         "test, --val-fraction of the others' as val): drop --split, --split-file and --test-fraction")
    if args.workers > 1:
        from ma_agiqa import create_model
        from ma_agiqa.training import check_data_parallel

        model = create_model(args.model, with_semantic=False, shipped=False, **config_overrides(args))
        try:  # before the data is read: its features take minutes
            check_data_parallel(model, apply_train_args(model.cfg.train, args), args.workers)
        except ValueError as e:
            raise SystemExit(str(e))
    df = load_dataset(args.dataset, args.data_root, args.labels, args.target)
    output = Path(args.output)
    if args.each_generator:
        generators = sorted(df["generator"].dropna().unique())
        if len(generators) < 2:
            raise SystemExit("--each-generator needs a dataset with at least two generators")
        runs = {}
        for g in generators:
            one = copy.copy(args)
            one.each_generator, one.test_generator = False, g
            runs[g] = flat(train_once(one, df, output / f"generator-{g}"))
        summary = summarise(list(runs.values()))
        (output / "metrics.json").write_text(json.dumps({"by_generator": runs, "summary": summary}, indent=2) + "\n")
        print(json.dumps({"by_generator": {g: {k: r[k] for k in ("test_srcc", "test_plcc")} for g, r in runs.items()},
                          "summary": summary}, indent=2))
        return 0
    if args.repeats == 1:
        m = train_once(args, df, output)
        print(json.dumps({"best": m["best"], "test": m["test"], "checkpoint": str(output)}, indent=2))
        return 0
    runs = [flat(train_once(args, df, output / f"repeat-{k}", k)) for k in range(args.repeats)]
    summary = summarise(runs)
    (output / "metrics.json").write_text(json.dumps({"repeats": runs, "summary": summary}, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
