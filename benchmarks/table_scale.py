"""End-of-run and compaction costs at table scale: count_rows and jobs.compact on a synthetic score table.

    python benchmarks/table_scale.py --rows 10000000 --parts 1000 --workdir /tmp/table-scale [--s3]

Writes a score table in the scoring job's schema (ma_agiqa.schema) of ROWS rows in PARTS parts, 1 % of its
rows superseded by a later part (retried rows), on local disk and, with --s3, on a moto S3 server started
here. Then, each in a fresh process: ``table_files.count_rows`` (wall time, store requests counted through
fsspec, peak resident memory) and ``jobs.compact`` (wall time, peak resident memory, parts after). Prints one
JSON object. ``--smoke``: 20,000 rows in 20 parts, in seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ma_agiqa.schema import score_schema  # noqa: E402

EXPERTS = ["coherence", "semantic", "quality"]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def part_table(schema: pa.Schema, ids: np.ndarray, rng, at: datetime) -> pa.Table:
    n = len(ids)
    image_id = pa.array(np.char.add("img-", ids.astype(str)))
    cols = {
        "image_id": image_id, "uri": pa.array(np.char.add(np.char.add("s3://images/", ids.astype(str)), ".jpg")),
        "score": pa.array(rng.normal(3, 1, n).astype(np.float32)),
        **{f"gate_{e}": pa.array(rng.random(n, dtype=np.float32)) for e in EXPERTS},
        "status": pa.array(["ok"] * n), "error": pa.nulls(n, pa.string()),
        "width": pa.array(np.full(n, 1024, np.int32)), "height": pa.array(np.full(n, 1024, np.int32)),
        "model": pa.array(["ma-agiqa-paper@0123456789ab"] * n), "scored_at": pa.array([at] * n, pa.timestamp("us", tz="UTC")),
    }
    return pa.table({f.name: cols[f.name].cast(f.type) if f.name in cols else pa.nulls(n, f.type) for f in schema}, schema=schema)


def synth(rows: int, parts: int, root: Path) -> None:
    """PARTS-1 parts of fresh rows, then one part re-scoring 1 % of them later (their current rows)."""
    schema = score_schema(EXPERTS)
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    redo = max(1, rows // 100)
    fresh = np.array_split(np.arange(rows - redo), max(1, parts - 1))
    for i, ids in enumerate(fresh):
        pq.write_table(part_table(schema, ids, rng, T0), root / f"part-{i:05d}.parquet", compression="zstd")
    retried = rng.choice(rows - redo, redo, replace=False)
    pq.write_table(part_table(schema, retried, rng, T0 + timedelta(hours=1)), root / f"part-{parts:05d}-retry.parquet",
                   compression="zstd")


def measure(what: str, table: str) -> dict:
    """Runs in a fresh process (``--measure``): the operation, its time and the store requests it made."""
    import fsspec

    requests = {"open": 0, "ls": 0}
    fs, _ = fsspec.core.url_to_fs(table)
    cls = type(fs)
    original_open, original_ls = cls._open, cls.ls

    def counted_open(self, *a, **kw):
        requests["open"] += 1
        return original_open(self, *a, **kw)

    def counted_ls(self, *a, **kw):
        requests["ls"] += 1
        return original_ls(self, *a, **kw)

    cls._open, cls.ls = counted_open, counted_ls
    if hasattr(cls, "_call_s3"):  # s3fs: every S3 API request (GET, HEAD, LIST, PUT, DELETE)
        original_call = cls._call_s3
        requests["s3_requests"] = 0

        async def counted_call(self, *a, **kw):
            requests["s3_requests"] += 1
            return await original_call(self, *a, **kw)

        cls._call_s3 = counted_call
    if what == "count_rows":
        from ma_agiqa.table_files import count_rows

        start = time.perf_counter()
        result = {"rows": count_rows(table)}
    else:
        from ma_agiqa.compaction import compact

        start = time.perf_counter()
        s = compact(table)
        result = {"rows_after": s["rows_after"], "parts_before": s["parts_before"], "parts_after": s["parts_after"]}
    seconds = round(time.perf_counter() - start, 2)
    return {**result, "seconds": seconds, "files_opened": requests["open"], "listings": requests["ls"],
            **({"s3_requests": requests["s3_requests"]} if "s3_requests" in requests else {}),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def in_fresh_process(what: str, table: str, env: dict) -> dict:
    """``measure`` in a fresh Python (its peak resident memory its own: the imports included)."""
    out = subprocess.run([sys.executable, __file__, "--measure", what, "--table", table], cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO), **env}, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{what} on {table} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def s3_copy(local: Path) -> tuple[dict, object]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id="testing",
                      aws_secret_access_key="testing-secret", region_name="us-east-1")
    s3.create_bucket(Bucket="scores")
    for f in sorted(local.glob("*.parquet")):
        s3.upload_file(str(f), "scores", f"table/{f.name}")
    return env, server


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--parts", type=int, default=1000)
    p.add_argument("--workdir", default="/tmp/table-scale")
    p.add_argument("--s3", action="store_true", help="also on a moto S3 server (count_rows and compaction)")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--measure", choices=["count_rows", "compact"], help=argparse.SUPPRESS)
    p.add_argument("--table", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.table)))
        return
    if args.smoke:
        args.rows, args.parts, args.s3 = 20_000, 20, True
    work = Path(args.workdir) / ("smoke" if args.smoke else f"{args.rows}")
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    synth(args.rows, args.parts, work / "table")
    built = time.perf_counter() - start
    size = sum(f.stat().st_size for f in (work / "table").glob("*.parquet"))
    result = {"rows": args.rows, "current_rows": args.rows - max(1, args.rows // 100), "parts": args.parts, "table_mib": round(size / 2**20, 1), "build_seconds": round(built, 1),
              "machine": f"{platform.machine()} {os.cpu_count()} cpus"}
    server = None
    if args.s3:  # measured on S3 first, from the copy of the table before local compaction rewrites it
        env, server = s3_copy(work / "table")
        result["s3_count_rows"] = in_fresh_process("count_rows", "s3://scores/table", env)
        result["s3_compact"] = in_fresh_process("compact", "s3://scores/table", env)
        server.stop()
    result["local_count_rows"] = in_fresh_process("count_rows", str(work / "table"), {})
    result["local_compact"] = in_fresh_process("compact", str(work / "table"), {})
    print(json.dumps(result, indent=2))
    if args.smoke:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
