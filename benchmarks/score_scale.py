"""The scoring job at the scale it exists for, on this machine with tiny-random (per-row bookkeeping, not
the model, is what is measured):

A. a manifest of --rows rows (a few hundred real AGIQA-3K images, the rest rows whose objects are missing)
   scored by `python -m jobs.score`: wall time, rows/s, the driver's peak RSS, blocks, output files;
B. a re-run of that finished job: time to "nothing to do";
C. resume planning of that manifest against a --table-rows score table (two models, --table-parts parts):
   the driver's plan (reading and checking the manifest, ids, repeats) plus the anti-join, time and peak RSS.

    python benchmarks/score_scale.py [--rows 1000000] [--images 300] [--table-rows 10000000] [--workdir DIR]

``--smoke``: part C only, on 2,000 rows and a 20,000-row table in a temporary directory (seconds: it checks the
benchmark still runs).

Each command runs as its own process; the driver's RSS is sampled from /proc every 0.2 s (A, B) or read from
its own getrusage (C). Results are printed as JSON and appended to WORKDIR/results.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
AGIQA = REPO.parent / "shared" / "datasets" / "agiqa3k" / "images"
SAMPLE_IMAGES = REPO / "samples" / "agiqa3k" / "images"


def peak_rss_of(proc: subprocess.Popen) -> dict:
    """Samples the process's RSS until it exits; returns {"peak_mb": ...} (filled in as it runs)."""
    peak = {"peak_mb": 0.0}

    def sample():
        while proc.poll() is None:
            try:
                for line in open(f"/proc/{proc.pid}/status"):
                    if line.startswith("VmRSS:"):
                        peak["peak_mb"] = max(peak["peak_mb"], int(line.split()[1]) / 1024)
            except FileNotFoundError:
                return
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    return peak


def make_manifest(path: Path, rows: int, images: int, image_dir: Path) -> None:
    names = sorted(p.name for p in image_dir.iterdir())[:images]
    uris = np.array([f"missing/{i:08d}.jpg" for i in range(rows)], dtype=object)
    spots = np.linspace(0, rows - 1, len(names)).astype(int)  # the real images spread over the manifest
    uris[spots] = names
    pq.write_table(pa.table({"id": [f"r{i:08d}" for i in range(rows)], "uri": pa.array(uris, pa.string()),
                             "prompt": pa.array(["a prompt"] * rows)}), path, row_group_size=100_000)


def make_table(path: Path, manifest: Path, rows: int, parts: int) -> None:
    """A score table of ``rows`` rows in ``parts`` parts, two models: the first half of the manifest's ids
    scored by the job's model, the rest other ids and another model's rows."""
    from ma_agiqa.schema import score_schema

    path.mkdir(parents=True, exist_ok=True)
    ids = pq.read_table(manifest, columns=["id"])["id"].to_numpy(zero_copy_only=False)
    schema = score_schema(["coherence", "semantic", "quality"])
    per = rows // parts
    for p in range(parts):
        n = per if p < parts - 1 else rows - per * (parts - 1)
        start = p * per
        model = "tiny-random@567bfeb48b9e" if p % 2 == 0 else "other@000000000000"
        image_ids = [ids[i] if i < len(ids) // 2 and model.startswith("tiny") else f"t{i:09d}" for i in range(start, start + n)]
        ok = np.ones(n, bool)
        table = pa.table({
            "image_id": image_ids, "uri": pa.array([None] * n, pa.string()), "score": pa.array(np.full(n, 2.5, np.float32)),
            "gate_coherence": pa.array(np.full(n, 0.3, np.float32)), "gate_semantic": pa.array(np.full(n, 0.3, np.float32)),
            "gate_quality": pa.array(np.full(n, 0.4, np.float32)), "status": pa.array(np.where(ok, "ok", "error")),
            "error": pa.array([None] * n, pa.string()), "width": pa.array(np.full(n, 512, np.int32)),
            "height": pa.array(np.full(n, 512, np.int32)), "model": [model] * n,
            "scored_at": pa.array(np.full(n, np.datetime64("2026-11-01T00:00:00", "us")), pa.timestamp("us", tz="UTC")),
        }, schema=schema)
        pq.write_table(table, path / f"part-{p:05d}.parquet", compression="zstd")


PLAN = """
import json, resource, sys, time
t0 = time.time()
from ma_agiqa.score_table import resume_plan
from ma_agiqa.scoring import ScoreRequest
from ma_agiqa.scoring.plan import plan_request
request = ScoreRequest(manifest=sys.argv[1], output=sys.argv[2], image_root=sys.argv[3], model="tiny-random", allow_untrained=True)
_, manifest, spec = plan_request(request)
t1 = time.time()
done, retried = resume_plan(request.output, "tiny-random@567bfeb48b9e", manifest.ids, manifest.score)
t2 = time.time()
print(json.dumps({"plan_s": round(t1 - t0, 2), "anti_join_s": round(t2 - t1, 2), "total_s": round(t2 - t0, 2),
                  "manifest_rows": manifest.rows, "already_in_table": int(done.sum()),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def run_job(manifest: Path, out: Path, image_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "jobs.score", "--manifest", str(manifest), "--image-root", str(image_dir), "--output", str(out),
           "--model", "tiny-random", "--allow-untrained", "--max-error-fraction", "1"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = peak_rss_of(proc)
    stdout, stderr = proc.communicate()
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({proc.returncode}):\n{stderr[-3000:]}")
    summary = json.loads(stdout[: stdout.rindex("}") + 1])
    return {"wall_s": round(wall, 1), "rows_per_s": round(summary["manifest_rows"] / wall), "driver_peak_rss_mb": round(rss["peak_mb"]),
            "to_score": summary["to_score"], "ok": summary["ok"], "errors": summary["errors"], "blocks": summary["blocks"],
            "rows_per_block": summary["rows_per_block"], "output_files": len(list(out.glob("part-*.parquet"))),
            "job_elapsed_s_after_ray_start": summary["elapsed_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--table-rows", type=int, default=10_000_000)
    p.add_argument("--table-parts", type=int, default=100)
    p.add_argument("--workdir", default=str(REPO / "runs" / "score_scale"))
    p.add_argument("--skip-job", action="store_true", help="only part C")
    p.add_argument("--smoke", action="store_true", help="part C on a small manifest and table: does it run")
    args = p.parse_args()
    image_dir = AGIQA
    if args.smoke:
        import tempfile

        args.rows, args.images, args.table_rows, args.table_parts, args.skip_job = 2000, 4, 20_000, 4, True
        args.workdir, image_dir = tempfile.mkdtemp(prefix="ma_agiqa_score_scale_"), SAMPLE_IMAGES
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / f"manifest-{args.rows}.parquet"
    if not manifest.exists():
        make_manifest(manifest, args.rows, args.images, image_dir)
    result = {"rows": args.rows, "real_images": args.images, "cores": os.cpu_count(),
              "at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if not args.skip_job:
        out = work / f"scores-{args.rows}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        result["A_job"] = run_job(manifest, out, image_dir)
        result["B_rerun"] = run_job(manifest, out, image_dir)
    table = work / f"table-{args.table_rows}"
    if not table.exists():
        make_table(table, manifest, args.table_rows, args.table_parts)
    plan = subprocess.run([sys.executable, "-c", PLAN, str(manifest), str(table), str(image_dir)], cwd=REPO,
                          capture_output=True, text=True)
    if plan.returncode != 0:
        raise SystemExit(f"the resume plan failed:\n{plan.stderr[-3000:]}")
    result["C_resume_plan"] = {"table_rows": args.table_rows, "table_parts": args.table_parts, **json.loads(plan.stdout)}
    print(json.dumps(result, indent=2))
    if args.smoke:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
        return
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
