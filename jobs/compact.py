"""Rewrite a score table's small parts into large ones, keeping exactly the current row per (image_id, model).

    python -m jobs.compact --table URI [--target-bytes-per-file 512MB] [--target-rows-per-file N] [--memory-limit 2GB]

The command line of ``ma_agiqa.compaction`` (how compaction keeps what readers see, and streams).
"""
from __future__ import annotations

import argparse
import sys

from jobs.cli import USER_ERRORS, run_and_report
from ma_agiqa.compaction import DEFAULT_TARGET_BYTES, compact


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.compact", description=__doc__.split("\n")[0])
    p.add_argument("--table", required=True, help="directory URI of the score table")
    p.add_argument("--target-rows-per-file", type=int, default=1_000_000, help="at most this many rows per new part")
    p.add_argument("--target-bytes-per-file", type=parse_bytes, default=DEFAULT_TARGET_BYTES,
                   help="a new part is closed once it holds this many bytes (e.g. 512MB)")
    p.add_argument("--memory-limit", default=None, help="DuckDB's memory limit while ranking rows, e.g. 2GB")
    return p.parse_args(argv)


def parse_bytes(text: str) -> int:
    """``512MB``, ``2GiB``, ``1000000`` -> bytes."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    t = text.strip().upper()
    number = t.rstrip("KMGIB")
    if not number or t[len(number):] not in units:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512MB)")
    return int(float(number) * units[t[len(number):]])


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_and_report(
        args, lambda a: compact(a.table, a.target_rows_per_file, a.memory_limit, a.target_bytes_per_file),
        lambda s, a: f"compacted {a.table}: {s['parts_before']} parts, {s['rows_before']} rows -> {s['parts_after']} parts, "
                     f"{s['rows_after']} rows", errors=(*USER_ERRORS, ValueError))


if __name__ == "__main__":
    sys.exit(main())
