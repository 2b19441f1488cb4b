"""Write a self-contained HTML report of a score table: histogram, scores by group, gate weights, errors,
and a thumbnail grid per score decile with each image's prompt.

    python -m jobs.report --scores URI [--metadata URI] --output report.html [--image-root URI]

The file embeds its charts (SVG) and thumbnails (JPEG data URIs): it opens offline, sent by mail or kept
beside a curated dataset. Aggregates run on DuckDB over the whole table; only the thumbnails are fetched.
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import run_and_report
from ma_agiqa.report import build_report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.split("\n")[0])
    p.add_argument("--scores", required=True, help="the score table (or a curated manifest from jobs.filter)")
    p.add_argument("--output", required=True, help="the HTML file to write (any fsspec URI)")
    p.add_argument("--metadata", default=None, help="a table to join for groups and prompts (a manifest works)")
    p.add_argument("--on", default="image_id", help="join column, or SCORE_COLUMN=METADATA_COLUMN")
    p.add_argument("--model", default=None, help="the model to report on when the table holds several")
    p.add_argument("--image-root", default=None, help="URI that relative image uris are resolved against")
    p.add_argument("--group-by", default=None, help="comma-separated columns for box plots (default: every column with 2-40 values)")
    p.add_argument("--prompt-column", default=None, help="the column shown under each thumbnail (default: prompt)")
    p.add_argument("--thumbs-per-decile", type=int, default=8)
    p.add_argument("--thumb-size", type=int, default=160, help="thumbnail side in pixels")
    return p.parse_args(argv)


def run(args) -> dict:
    import fsspec

    from ma_agiqa.table_files import check_output_location

    check_output_location(args.output, "--output", kind="file")  # before the table is read
    group_by = [c.strip() for c in args.group_by.split(",") if c.strip()] if args.group_by else None
    page, stats = build_report(args.scores, args.metadata, args.on, args.model, args.image_root, group_by,
                               args.prompt_column, args.thumbs_per_decile, args.thumb_size)
    with fsspec.open(args.output, "w", encoding="utf-8") as f:
        f.write(page)
    return {**stats, "output": args.output, "bytes": len(page.encode())}


def main(argv=None) -> int:
    return run_and_report(parse_args(argv), run, lambda stats, args: (
        f"report: {args.output} ({stats['bytes'] / 1e6:.1f} MB, {stats['thumbnails']} thumbnails)"
        + (f"; {stats['note']}" if stats.get("note") else "")))


if __name__ == "__main__":
    sys.exit(main())
