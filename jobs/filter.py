"""Curate a score table: keep the images that pass the rules, joined with their prompt metadata.

    python -m jobs.filter --scores URI --output URI [--metadata URI --on image_id] [--min-score X]
        [--top-fraction F --per COLUMN] [--top-k K --per COLUMN] [--max-gate-quality G] [--drop-errors]

Writes OUTPUT/kept/ (a Parquet manifest: the kept rows with their scores and metadata), OUTPUT/rejected/ (the
other rows, each with the rule that rejected it and why) and OUTPUT/_summary.json. Rules apply in a fixed
order, each to the rows the ones before it kept: errors, --min-score, --max-gate-quality, --top-fraction,
--top-k. Runs in-process on DuckDB (out-of-core), without a Ray cluster: see ma_agiqa/curation.py.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import run_and_report
from ma_agiqa.curation import build_rules, run_filter


def add_rule_args(p: argparse.ArgumentParser) -> None:
    """The rule options, shared with jobs.curate."""
    g = p.add_argument_group("rules (applied in this order)")
    g.add_argument("--drop-errors", action="store_true", help="reject the rows the scoring job could not score")
    g.add_argument("--min-score", type=float, default=None, help="reject scores below X")
    g.add_argument("--max-gate-quality", type=float, default=None, help="reject rows whose gate_quality is above G")
    g.add_argument("--top-fraction", type=float, default=None, help="keep the best F of each group (ceil(F x size))")
    g.add_argument("--top-k", type=int, default=None, help="keep the best K of each group")
    g.add_argument("--per", default=None, help="the column that groups --top-fraction / --top-k (e.g. prompt); default: one group")
    g.add_argument("--keep-ties", action="store_true", help="keep every row tied with the last one kept (default: ties broken by image_id)")
    p.add_argument("--metadata", default=None, help="Parquet/CSV/JSONL table to join (a manifest works: its image_id is derived as the scoring job does)")
    p.add_argument("--on", default="image_id", help="join column, or SCORE_COLUMN=METADATA_COLUMN")
    p.add_argument("--memory-limit", default=None, help="DuckDB memory limit, e.g. 4GB (it spills to disk beyond it)")
    p.add_argument("--temp-dir", default=None, help="where DuckDB spills (default: its own, under the working directory)")
    p.add_argument("--rows-per-file", type=int, default=1_000_000, help="rows per output Parquet part")


def rules_from(args) -> list:
    return build_rules(args.drop_errors, args.min_score, args.max_gate_quality, args.top_fraction, args.top_k,
                       args.per, args.keep_ties)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.filter", description=__doc__.split("\n")[0])
    p.add_argument("--scores", required=True, help="the score table (a directory of Parquet parts, a file or a glob)")
    p.add_argument("--output", required=True, help="output directory URI")
    p.add_argument("--model", default=None, help="curate the scores of this model (name@hash, or a config name) when the table holds several")
    add_rule_args(p)
    return p.parse_args(argv)


def run(args, unmatched_scores: str = "reject") -> dict:
    return run_filter(args.scores, args.output, rules_from(args), model=args.model, metadata=args.metadata,
                      on=args.on, unmatched_scores=unmatched_scores, rows_per_file=args.rows_per_file,
                      memory_limit=args.memory_limit, temp_dir=args.temp_dir)


def main(argv=None) -> int:
    return run_and_report(parse_args(argv), run, lambda summary, args: (
        f"kept {summary['kept']} of {summary['rows']} rows: {args.output.rstrip('/')}/kept/ "
        f"(rejected rows with their rule in {args.output.rstrip('/')}/rejected/)"))


if __name__ == "__main__":
    sys.exit(main())
