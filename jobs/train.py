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
import sys

from ma_agiqa.training.runs import TrainingRunError, run_training


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
    p.add_argument("--split", choices=["label", "random", "reference", "all"], default=None,
                   help="label: the label file's (or --split-file's) split column; random: seeded (--split-seed, "
                        "--val-fraction, --test-fraction); reference: MA-AGIQA's random.seed(20) 70/10/20 train / val "
                        "/ test (with --split-seed S, seeded with S); all: every labelled image trains, no val part, "
                        "the last of --epochs kept (fix the epoch count with split runs first). Default: random with "
                        "--split-seed or --repeats, else label")
    p.add_argument("--val-fraction", type=float, default=0.2, help="random splits: the val part's fraction")
    p.add_argument("--test-fraction", type=float, default=0.0,
                   help="random splits: hold out this fraction as a test part, reported after training (0: no test "
                        "part; val both chooses the epoch and reports)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="change a field of the config's quality branch, MoE or ensemble before training (a registered "
                        "config's recipe, or a checkpoint directory's, fine-tuned where its weights still fit), e.g. "
                        "quality.stage_conv=true, quality.views.antialias=false, moe.gate=linear, ensemble.heads=3 "
                        "(values as JSON)")
    p.add_argument("--split-file", default=None, help="CSV with image_id,split columns")
    p.add_argument("--probe-alpha", type=float, default=None,
                   help="a config with ensemble.probe: the probe's ridge strength (default: chosen on the val rows; "
                        "required with --split all)")
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
                   help="freeze the quality backbone or train it (default: as the config says)")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = run_training(args)
    except TrainingRunError as e:  # options that cannot make a run: one line, exit 2, as argparse's refusals
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
