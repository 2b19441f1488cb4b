"""Throughput of jobs.export: 2,000 AGIQA-3K images exported in each format, rows/s and the driver's memory.

The kept set is built directly (image_id = the file's stem, uri = its absolute path, a made-up score and
prompt), so only the export is timed: one local Ray (started once, not timed), then each format into a fresh
directory, timed from the call to the summary written. For each: rows/s, MB/s of image bytes, shards, and the
driver's peak RSS (``ru_maxrss``, the process's high-water mark so far) against its RSS before the first
export: the driver reads the kept rows' metadata and never an image, so the peak should not grow with the
images' bytes (2,000 images are 61 MB here). A two-image export runs first, untimed, so that Ray's
worker start-up is not charged to the first format.

    python benchmarks/export_throughput.py [--images 2000] [--shard-size 500] [--formats webdataset,parquet,files]
    python benchmarks/export_throughput.py --smoke   # 8 sample images, seconds, to check that it runs
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ma_agiqa.export import FORMATS, run_export  # noqa: E402
from _common import local_run  # noqa: E402



def rss_mb() -> float:
    """The current RSS of this process (Linux), in MB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def kept_table(images: list[Path], path: Path) -> None:
    pq.write_table(pa.table({
        "image_id": [p.stem for p in images], "uri": [str(p) for p in images],
        "score": pa.array([(i % 97) / 97 for i in range(len(images))], pa.float32()),
        "prompt": [f"prompt {i % 300}" for i in range(len(images))],
    }), path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--shard-size", type=int, default=500)
    p.add_argument("--formats", default=",".join(FORMATS))
    p.add_argument("--smoke", action="store_true", help="8 sample images, shards of 3: checks that it runs")
    args = p.parse_args(argv)
    n, shard_size = (8, 3) if args.smoke else (args.images, args.shard_size)
    import ray

    with local_run(n, args.smoke, "export-bench-") as (images, work):
        kept_table(images, work / "kept.parquet")
        image_mb = sum(p.stat().st_size for p in images) / 2**20
        kept_table(images[:2], work / "warmup.parquet")
        run_export(str(work / "warmup.parquet"), str(work / "warmup"), "files", 1)
        baseline = rss_mb()
        results = {"images": n, "image_mb": round(image_mb, 1), "shard_size": shard_size,
                   "cpus": int(ray.cluster_resources().get("CPU", 0)), "driver_rss_before_mb": round(baseline, 1)}
        for fmt in args.formats.split(","):
            started = time.perf_counter()
            summary = run_export(str(work / "kept.parquet"), str(work / fmt), fmt, shard_size)
            elapsed = time.perf_counter() - started
            assert summary["exported"] == n, summary
            results[fmt] = {
                "rows_per_s": round(n / elapsed, 1), "mb_per_s": round(image_mb / elapsed, 1),
                "seconds": round(elapsed, 2), "shards": summary["shards"],
                "driver_peak_rss_mb": round(peak_rss_mb(), 1),
            }
            print(f"{fmt:>10}: {n / elapsed:8.1f} rows/s  {image_mb / elapsed:6.1f} MB/s  {elapsed:6.2f} s  "
                  f"{summary['shards']} shards  driver peak RSS {peak_rss_mb():.0f} MB (before: {baseline:.0f} MB)", flush=True)
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
