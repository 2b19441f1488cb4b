"""Throughput of the scoring job against its parts, in one run on the same images and model:

1. the job end to end (`jobs.score` on a local Ray, from manifest to Parquet), with and without its start-up;
2. model only: the same model and batch size on pre-decoded inputs held in memory;
3. fetch + decode + preprocess only (the job's FetchDecode step, in one process);
4. a plain single-process loop running the same steps one batch after the other.

The figure we track: job / min(model only, decode only), toward 0.9.

    python benchmarks/score_throughput.py [--images 1000] [--model tiny-random] [--batch-size 16]

Runs unchanged on a GPU machine (the model actors take the GPU when Ray sees one).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jobs import score  # noqa: E402
from ma_agiqa.pipeline import AssignIds, FetchDecode, ScoreRows, SemanticFeatures, WriteParts  # noqa: E402

DATA = Path(os.environ.get("MA_AGIQA_AGIQA3K", Path(__file__).resolve().parents[2] / "shared/datasets/agiqa3k"))


def batches(table: pa.Table, size: int):
    for i in range(0, len(table), size):
        yield table.slice(i, size)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--semantic-actors", type=int, default=1)
    p.add_argument("--quality-actors", type=int, default=None, help="default: the job's")
    p.add_argument("--fuse", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--threads-per-actor", type=int, default=None)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ma_agiqa_bench_"))
    names = sorted(os.listdir(DATA / "images"))[: args.images]
    pq.write_table(pa.table({"uri": names}), work / "manifest.parquet")
    job_args = score.parse_args([
        "--manifest", str(work / "manifest.parquet"), "--image-root", str(DATA / "images"), "--output", str(work / "job"),
        "--model", args.model, "--batch-size", str(args.batch_size),
        "--semantic-actors", str(args.semantic_actors),
        *(["--quality-actors", str(args.quality_actors)] if args.quality_actors else []),
        "--fuse", args.fuse, *(["--threads-per-actor", str(args.threads_per_actor)] if args.threads_per_actor else []),
    ])
    spec, _, _ = score.plan(job_args)
    manifest = AssignIds(spec)(pq.read_table(work / "manifest.parquet"))
    gpus = 1.0 if torch.cuda.is_available() else 0.0
    results = {}

    # 1. the job, end to end
    t = time.perf_counter()
    summary = score.run(job_args)
    results["job end to end (incl. Ray start, model load)"] = len(names) / (time.perf_counter() - t)
    assert summary["rows"] == len(names), summary
    import ray

    ray.shutdown()

    # 3. fetch + decode + preprocess only
    fetch = FetchDecode(spec)
    t = time.perf_counter()
    decoded = [fetch(b) for b in batches(manifest, args.batch_size)]
    results["fetch + decode + preprocess only"] = len(names) / (time.perf_counter() - t)

    # 2. model only, on the pre-decoded batches
    t_load = time.perf_counter()
    semantic = SemanticFeatures(spec, gpus) if spec.semantic_prompts else None
    scorer = ScoreRows(spec, gpus)
    load_s = time.perf_counter() - t_load
    t = time.perf_counter()
    for b in decoded:
        scorer(semantic(b) if semantic else b)
    if gpus:
        torch.cuda.synchronize()
    results["model only (pre-decoded, same batch size)"] = len(names) / (time.perf_counter() - t)

    # 4. a plain loop doing the job's work, one step after the other
    writer = WriteParts(str(work / "loop"))
    t = time.perf_counter()
    for b in batches(manifest, args.batch_size):
        b = fetch(b)
        writer(scorer(semantic(b) if semantic else b))
    loop_s = time.perf_counter() - t
    results["plain single-process loop"] = len(names) / loop_s
    # the loop as a script would run it: loading its model first (the job's end-to-end figure includes its own)
    results["plain loop incl. model load"] = len(names) / (loop_s + load_s)

    job_steady = summary["rows"] / summary["elapsed_s"]
    results["job (its own summary)"] = job_steady
    bound = min(results["model only (pre-decoded, same batch size)"], results["fetch + decode + preprocess only"])
    out = {
        "images": len(names), "model": args.model, "batch_size": args.batch_size,
        "job_settings": {k: summary[k] for k in ("model_stages", "threads_per_actor", "cpus_per_actor", "quality_actors")},
        "torch_threads_in_loop": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if gpus else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "images_per_s": {k: round(v, 1) for k, v in results.items()},
        "job_over_plain_loop": round(results["job end to end (incl. Ray start, model load)"] / results["plain single-process loop"], 2),
        "job_over_plain_loop_incl_load": round(
            results["job end to end (incl. Ray start, model load)"] / results["plain loop incl. model load"], 2),
        "job_over_min_model_decode": round(results["job end to end (incl. Ray start, model load)"] / bound, 2),
    }
    print(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
