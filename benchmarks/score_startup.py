"""Where the scoring job's fixed time goes: a timeline of one `jobs.score` run on the sample manifest, and the
start-up of a model actor (the same as a plain loop's) timed in a fresh process.

    python benchmarks/score_startup.py [--repeats 3] [--smoke]

Each figure is seconds since the process started (timeline) or the duration of one step, median of the
repeats. The job's steps are timed by wrapping its own functions, so the job runs unchanged. ``--smoke`` wraps
them and times one actor start-up, without the job (seconds: it checks the benchmark still runs).
"""
from __future__ import annotations

import argparse
import importlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "agiqa3k"


def instrument(marks: dict, t0: float) -> None:
    """Wraps the scoring run's steps (ma_agiqa.scoring.run looks them up at call time) to mark when each
    starts and ends, in seconds since ``t0``."""
    from ma_agiqa.scoring import run

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            result = fn(*a, **k)
            marks[f"{name} start"], marks[f"{name} end"] = start - t0, time.perf_counter() - t0
            return result
        return wrapper

    run.plan_request = timed("manifest and model config checked", run.plan_request)
    run.init_ray = timed("ray start", run.init_ray)
    run.rows_to_score = timed("manifest rows to score", run.rows_to_score)
    run.run_watched = timed("pipeline", run.run_watched)


def job_timeline(output: str) -> dict:
    """Runs jobs.score in this process with a timestamp at each of its steps."""
    t0 = time.perf_counter()
    marks = {}
    sys.path.insert(0, str(ROOT))
    from jobs import score

    marks["imports done"] = time.perf_counter() - t0
    import ray

    instrument(marks, t0)
    args = ["--manifest", str(SAMPLE / "manifest.jsonl"), "--image-root", str(SAMPLE), "--output", output,
            "--model", "tiny-random", "--allow-untrained"]
    summary = score.run(score.parse_args(args))
    marks["summary written"] = time.perf_counter() - t0
    assert summary["ok"] == summary["rows"] == 40, summary
    start = time.perf_counter()
    ray.shutdown()
    marks["ray shutdown s"] = time.perf_counter() - start
    return {k: round(v, 2) for k, v in marks.items()}


def actor_startup() -> dict:
    """What a model actor (and a plain loop) pays before its first batch: torch, then the model."""
    t0 = time.perf_counter()
    importlib.import_module("torch")

    t1 = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    from ma_agiqa.scoring import ScoreRequest
    from ma_agiqa.scoring.plan import plan_request
    from ma_agiqa.scoring.steps import ScoreImages

    _, _, spec = plan_request(ScoreRequest(str(SAMPLE / "manifest.jsonl"), "unused", model="tiny-random", allow_untrained=True))
    t2 = time.perf_counter()
    ScoreImages(spec, 0.0, 1)
    t3 = time.perf_counter()
    return {"torch import s": round(t1 - t0, 2), "model load s (transformers import included)": round(t3 - t2, 2)}


def in_fresh_process(mode: str, *extra: str) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, mode, *extra], check=True, capture_output=True, text=True, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process wall s"] = round(time.perf_counter() - start, 2)
    return result


def median_of(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 2) for k in runs[0]}


def main():
    if sys.argv[1:2] == ["--job"]:
        return print(json.dumps(job_timeline(sys.argv[2])))
    if sys.argv[1:2] == ["--actor"]:
        return print(json.dumps(actor_startup()))
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="the job's steps wrapped, one actor start-up: does it run")
    args = p.parse_args()
    if args.smoke:
        sys.path.insert(0, str(ROOT))
        instrument({}, time.perf_counter())
        return print(json.dumps({"smoke": True, "one model actor / plain loop start-up": actor_startup()}, indent=2))
    work = Path(tempfile.mkdtemp(prefix="ma_agiqa_startup_"))
    jobs, actors = [], []
    for r in range(args.repeats):
        jobs.append(in_fresh_process("--job", str(work / f"out-{r}")))
        actors.append(in_fresh_process("--actor"))
    shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"images": 40, "model": "tiny-random", "repeats": args.repeats,
                      "job timeline (s since start, median)": median_of(jobs),
                      "one model actor / plain loop start-up (median)": median_of(actors)}, indent=2))


if __name__ == "__main__":
    main()
