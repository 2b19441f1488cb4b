"""jobs.filter at scale: a synthetic score table joined with a metadata table and filtered per prompt.

    python benchmarks/filter_scale.py --rows 5000000 --workdir /tmp/filter-scale

Writes a score table in the scoring job's schema (ma_agiqa.schema) and a metadata table of the same size
(1 % of scores without metadata, 1 % of metadata without scores, 0.1 % duplicate ids in each, 4 images per
prompt), then runs `python -m jobs.filter` as a user would, in a fresh process, and records its wall time and
peak resident memory: with DuckDB's default memory limit, under a limit far below the data's size (it spills
to disk), and on a 1,000-row table (the latency a small curation costs). Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ma_agiqa.schema import score_schema  # noqa: E402

EXPERTS = ["coherence", "semantic", "quality"]
GENERATORS = np.array(["sd1.5", "sdxl", "dalle3", "midjourney", "flux", "glide"])


def synth(rows: int, root: Path, parts: int = 10, seed: int = 0) -> tuple[Path, Path]:
    """The score table (``parts`` Parquet files) and the metadata table (one file per part as well)."""
    rng = np.random.default_rng(seed)
    scores_dir, meta_dir = root / "scores", root / "metadata"
    for d in (scores_dir, meta_dir):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    schema = score_schema(EXPERTS, {"generator": pa.string()})
    per = -(-rows // parts)
    now = datetime(2026, 11, 24, tzinfo=timezone.utc)
    for k in range(parts):
        idx = np.arange(k * per, min(rows, (k + 1) * per))
        n = len(idx)
        dup = rng.random(n) < 0.001  # re-scored ids: point at an earlier row's id
        ids_num = np.where(dup, np.maximum(idx - 7, 0), idx)
        image_id = pa.array([f"img-{i:09d}" for i in ids_num])
        err = rng.random(n) < 0.01
        score = rng.normal(3.0, 0.8, n).astype(np.float32)
        gates = rng.dirichlet([2, 2, 2], n).astype(np.float32)
        table = pa.table({
            "image_id": image_id,
            "uri": pa.array([f"s3://corpus/images/{i:09d}.png" for i in ids_num]),
            "score": pa.array(score, mask=err),
            **{f"gate_{e}": pa.array(gates[:, j], mask=err) for j, e in enumerate(EXPERTS)},
            "status": pa.array(np.where(err, "error", "ok")),
            "error": pa.array(np.where(err, "truncated: image file is truncated", None)),
            "width": pa.array(np.full(n, 1024, np.int32), mask=err),
            "height": pa.array(np.full(n, 1024, np.int32), mask=err),
            "model": pa.array(["ma-agiqa-paper@0123456789ab"] * n),
            "scored_at": pa.array([now] * n, pa.timestamp("us", tz="UTC")),
            "generator": pa.array(GENERATORS[idx % len(GENERATORS)]),
        }, schema=schema)
        pq.write_table(table, scores_dir / f"part-{k:05d}.parquet", compression="zstd")

        # metadata: 1 % of ids missing, 1 % extra ids never scored, 0.1 % keys twice
        keep = rng.random(n) >= 0.01
        meta_ids = idx[keep]
        extra = rows + k * per + np.arange(max(1, n // 100))
        twice = meta_ids[rng.random(len(meta_ids)) < 0.001]
        all_ids = np.concatenate([meta_ids, extra, twice])
        meta = pa.table({
            "image_id": pa.array([f"img-{i:09d}" for i in all_ids]),
            "prompt": pa.array([f"prompt number {i // 4} of the corpus" for i in all_ids]),
            "seed": pa.array(all_ids % 100003),
            "style": pa.array(np.array(["photo", "anime", "oil", "3d"])[all_ids % 4]),
        })
        pq.write_table(meta, meta_dir / f"part-{k:05d}.parquet", compression="zstd")
    return scores_dir, meta_dir


def run_filter(scores: Path, metadata: Path, out: Path, extra: list[str]) -> dict:
    """One `python -m jobs.filter` in a fresh process: wall time and the child's peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    argv = [sys.executable, "-m", "jobs.filter", "--scores", str(scores), "--metadata", str(metadata),
            "--output", str(out), "--drop-errors", "--min-score", "2.0", "--top-fraction", "0.5", "--top-k", "1",
            "--per", "prompt", *extra]
    t0 = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w+") as log:
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage: its peak RSS
        wall = time.perf_counter() - t0
        if os.waitstatus_to_exitcode(status):
            log.seek(0)
            raise SystemExit(log.read()[-3000:])
    summary = json.loads((out / "_summary.json").read_text())
    return {
        "options": " ".join(extra) or "(default DuckDB memory limit: 80 % of RAM)",
        "wall_s": round(wall, 2),
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "rows_out": summary["rows"], "kept": summary["kept"], "rejected_by": summary["rejected_by"],
        "groups": summary.get("groups"), "join": summary["join"],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=5_000_000)
    p.add_argument("--workdir", default="/tmp/filter-scale")
    p.add_argument("--memory-limit", default="1GB", help="the low limit of the out-of-core run")
    p.add_argument("--smoke", action="store_true", help="the same runs on 20,000 rows in a temporary folder (seconds)")
    args = p.parse_args()
    if args.smoke:
        from _common import scratch_dir

        args.rows, args.workdir = 20_000, scratch_dir("filter-scale-smoke-")
    root = Path(args.workdir)
    t0 = time.perf_counter()
    scores, meta = synth(args.rows, root)
    synth_s = time.perf_counter() - t0
    small_scores, small_meta = synth(1000, root / "small", parts=1)
    size = lambda d: sum(f.stat().st_size for f in d.glob("*.parquet"))  # noqa: E731
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB",
        "rows": args.rows,
        "score_table_mib": round(size(scores) / 2**20, 1), "metadata_mib": round(size(meta) / 2**20, 1),
        "synthesis_s": round(synth_s, 1),
        "command": "python -m jobs.filter --scores S --metadata M --output O --drop-errors --min-score 2.0 "
                   "--top-fraction 0.5 --top-k 1 --per prompt",
        "small_1000_rows": run_filter(small_scores, small_meta, root / "out-small", []),
        "out_of_core": run_filter(scores, meta, root / "out-limited",
                                  ["--memory-limit", args.memory_limit, "--temp-dir", str(root / "spill")]),
        "default": run_filter(scores, meta, root / "out-default", []),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
