"""Export a kept set (jobs.filter's output) as a dataset to train on: WebDataset shards, Parquet with the image
bytes (the Hugging Face layout) or copied files, with every kept row's score, gates and metadata.

    python -m jobs.export --kept URI --output URI --format webdataset|parquet|files [--shard-size N]
        [--image-root URI] [--address ADDR] [--s3-endpoint URL]

Shards are named deterministically (kept rows sorted by image_id, N per shard) and published whole; running
the same command again completes a killed export without duplicates. Images that cannot be read are listed in
OUTPUT/_errors.parquet, never a crash. Runs on Ray Data: a local Ray, or the cluster at --address /
RAY_ADDRESS. See ma_agiqa/export.py.
"""
from __future__ import annotations

import argparse
import os
import sys

from jobs.cli import run_and_report
from ma_agiqa.export import DEFAULT_SHARD_SIZE, FORMATS, ExportError, run_export
from ma_agiqa.fetch import DEFAULT_MAX_BYTES
from ma_agiqa.uris import redact


def add_shard_size(p: argparse.ArgumentParser) -> None:
    """--shard-size, shared with jobs.curate (which names the others --export-format / --export-output)."""
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="images per shard (default %(default)s)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.export", description=__doc__.split("\n")[0])
    p.add_argument("--kept", required=True, help="the kept set: a jobs.filter output directory, its kept/, or a Parquet manifest with image_id and uri")
    p.add_argument("--output", required=True, help="output directory URI (local or s3://...)")
    p.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    add_shard_size(p)
    p.add_argument("--image-root", default=None, help="URI that relative uris are resolved against (as for jobs.score)")
    p.add_argument("--allow-outside-root", action="store_true", help="with --image-root, accept absolute uris outside it")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="images larger than this are errors, refused before they are read")
    p.add_argument("--address", default=None, help="Ray address; default RAY_ADDRESS, else a local Ray")
    p.add_argument("--s3-endpoint", default=None, help="endpoint of an S3-compatible store (sets AWS_ENDPOINT_URL)")
    return p.parse_args(argv)


def run(args) -> dict:
    from ma_agiqa.scoring.run import init_ray

    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    return run_export(args.kept, args.output, args.format, args.shard_size, image_root=args.image_root,
                      allow_outside_root=args.allow_outside_root, max_bytes=args.max_bytes,
                      start_ray=lambda: init_ray(args.address, args.s3_endpoint))


def main(argv=None) -> int:
    args = parse_args(argv)
    output = redact(args.output)
    return run_and_report(
        args, run,
        lambda summary, args: f"exported {summary['exported']} of {summary['kept_rows']} kept rows as {summary['shards']} "
                              f"{args.format} shards: {output}" + (f"; {summary['errors']} errors in "
                              f"{output.rstrip('/')}/_errors.parquet" if summary["errors"] else ""),
        errors=(ExportError,),
        interrupted=f"the shards published so far are kept; run the same command again to complete {output}")


if __name__ == "__main__":
    sys.exit(main())
