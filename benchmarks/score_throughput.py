"""Throughput of the scoring job against its parts and against a plain loop, on the same images and model.

Two kinds of measurement, both in one run:

A. Commands, as a user runs them: wall time of a fresh process from launch to exit, Python start, imports,
   model loads and writing included, each repeated ``--repeats`` times, alternating, and the median kept:
   - the job: ``python -m jobs.score ...``, starting its local Ray;
   - the job on a Ray already running (``ray start --head`` before its run, then ``--address``), as on a
     cluster or a workstation that keeps one: no Ray start or shut-down in its time; the running Ray is
     stopped before the other two commands run, so that its idle processes do not share their cores;
   - a plain loop: ``python benchmarks/score_throughput.py --plain-loop ...``, one process doing the same steps
     (read manifest, fetch + decode + preprocess, the model, write Parquet) one batch after the other.
   The job's steady rate (images/s once its actors run) comes from Ray Data's progress log. On Linux each
   command's CPU time is counted too: the machine's busy CPU-seconds while it runs, split by kind of process
   (model actors, the driver or loop, Ray's other processes); busy CPU-s / cores is the shortest wall time
   that work can take here, whatever the schedule.
B. In one process whose imports are already paid:
   - the job (``jobs.score.run``: Ray start, actor start-up and model loads included);
   - model only: the same model and batch size on pre-decoded inputs held in memory;
   - fetch + decode + preprocess only (the job's FetchDecode step);
   - the plain loop, with and without its model load.

The figure we track: job / min(model only, decode only), toward 0.9.

    python benchmarks/score_throughput.py [--images 1000] [--repeats 3] [--model tiny-random] [--batch-size 16]

``--images`` above the dataset's 2,385 lists its images again under new ids (``name#2``...), to find where the
job's fixed start-up stops mattering; ``--no-in-process`` runs part A only. ``--smoke``: part B without the job
on 4 sample images (seconds: it checks the benchmark still runs, and measures nothing).

Runs unchanged on a GPU machine (the model actors take the GPU when Ray sees one).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs import score  # noqa: E402
from ma_agiqa.scoring.plan import driver_rows, plan_request  # noqa: E402
from ma_agiqa.scoring.steps import FetchDecode, ScoreImages, WriteParts  # noqa: E402

DATA = Path(os.environ.get("MA_AGIQA_AGIQA3K", ROOT.parent / "shared/datasets/agiqa3k"))
SAMPLE = ROOT / "samples" / "agiqa3k"
ROWS_PER_FILE = 5000  # the job's default --rows-per-file


def batches(table: pa.Table, size: int):
    for i in range(0, len(table), size):
        yield table.slice(i, size)


def job_args(manifest, image_root, output, model, batch_size, extra=()):
    # random heads score as fast as trained ones
    return ["--manifest", str(manifest), "--image-root", str(image_root), "--output", str(output),
            "--model", model, "--batch-size", str(batch_size), "--allow-untrained", *extra]


def planned(argv):
    """The job's request for a command line, its JobSpec and the rows it would score, as its driver plans them."""
    args = score.parse_args(argv)
    request = score.request_from(args, args.manifest, args.output, rows_per_file=args.rows_per_file)
    _, manifest, spec = plan_request(request)
    return request, spec, driver_rows(manifest, spec)


def loop(rows: pa.Table, fetch: FetchDecode, model: ScoreImages, write: WriteParts, batch_size: int):
    """The job's steps one after the other in this process: fetch + decode, score, then write parts."""
    scored = [model(fetch(b)) for b in batches(rows, batch_size)]
    for part in batches(pa.concat_tables(scored), ROWS_PER_FILE):
        write(part)


def plain_loop(argv):
    """The plain single-process loop as a script would run it, model load included (part A's third command)."""
    request, spec, rows = planned(argv)
    model = ScoreImages(spec, 1.0 if _cuda() else 0.0)
    loop(rows, FetchDecode(spec), model, WriteParts(request.output), request.batch_size)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


TICK_S = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01  # /proc's unit of CPU time


def machine_busy_cpu_s() -> float | None:
    """CPU-seconds all cores have spent busy since boot (/proc/stat: user, nice, system, irq, softirq).
    Between two readings this includes this script's own sampling thread (CpuByProcess), a fraction of a
    CPU-second per command here: the gap between the machine's count and the loop's own process."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:8]]
    except OSError:  # not Linux
        return None
    return (sum(ticks[:3]) + sum(ticks[5:7])) * TICK_S


def process_kind(cmdline: str) -> str | None:
    """Which part of a command a process is, from its command line (Ray names its workers by what they run)."""
    if any(step in cmdline for step in ("ScoreImages", "ScoreRows", "SemanticFeatures")):
        return "model actors"
    if "jobs.score" in cmdline or "--plain-loop" in cmdline:
        return "driver or loop process"
    if "ray" in cmdline:
        return "Ray's other processes"
    return None  # kernel threads, anything else on the machine


class CpuByProcess(threading.Thread):
    """Adds up, by kind, the CPU time processes spend while a command runs, sampling /proc every 0.2 s.
    A process that ends between two samples loses at most 0.2 s of its count."""

    def __init__(self):
        super().__init__(daemon=True)
        self.first, self.last, self.kind, self.done = {}, {}, {}, threading.Event()
        self.sample(initial=True)

    def sample(self, initial=False):
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if pid == str(os.getpid()):  # this script
                continue
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            cpu = (int(fields[11]) + int(fields[12])) * TICK_S
            self.first.setdefault(pid, cpu if initial else 0.0)
            self.last[pid] = cpu
            self.kind[pid] = process_kind(cmdline) or self.kind.get(pid)

    def run(self):
        while not self.done.wait(0.2):
            self.sample()

    def stop(self) -> dict:
        self.done.set()
        self.join()
        self.sample()
        totals = {}
        for pid, kind in self.kind.items():
            if kind:
                totals[kind] = totals.get(kind, 0.0) + self.last[pid] - self.first[pid]
        return totals


def time_command(cmd: list[str], log: Path, env=None) -> tuple[float, float | None, dict]:
    """(wall s, the machine's busy CPU-s, CPU-s by kind of process) of one run of ``cmd``."""
    by_process = CpuByProcess() if os.path.isdir("/proc/self") else None
    busy = machine_busy_cpu_s()
    if by_process:
        by_process.start()
    t = time.perf_counter()
    try:
        with open(log, "w") as out:
            subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    finally:
        wall = time.perf_counter() - t
        kinds = by_process.stop() if by_process else {}
    return wall, machine_busy_cpu_s() - busy if busy is not None else None, kinds


PROGRESS = re.compile(r"^(\S+ \S+),(\d+)\s+INFO logging_progress.py:\d+ -- MapBatches\(.*(ScoreImages|ScoreRows)\): (\d+)/")


def steady_rate(log: Path) -> float | None:
    """Images/s of the last model stage between its first and its last progress line with rows done."""
    points = []
    for line in log.read_text().splitlines():
        m = PROGRESS.match(line)
        if m and int(m.group(4)) > 0:
            t = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
            points.append((t, int(m.group(4))))
    if len(points) < 2 or points[-1][0] == points[0][0]:
        return None
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def start_head(cpus: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus", str(cpus), "--port", str(port), "--include-dashboard",
         "false", "--disable-usage-stats"],
        env=dict(os.environ, RAY_AUTH_MODE="disabled"), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 60
    while subprocess.run(["ray", "status", "--address", address], env=dict(os.environ, RAY_AUTH_MODE="disabled"),
                         capture_output=True).returncode != 0:
        assert time.time() < deadline and head.poll() is None, "ray start --head did not come up"
        time.sleep(1)
    time.sleep(10)  # a running Ray is an idle one: let its start-up (agents, prestarted workers) finish first
    return head, address


def stop_head(head: subprocess.Popen) -> None:
    """`ray stop` also ends the head's idle workers, which run in process groups of their own."""
    subprocess.run(["ray", "stop"], capture_output=True, env=dict(os.environ, RAY_AUTH_MODE="disabled"))
    try:
        os.killpg(head.pid, 9)
    except ProcessLookupError:
        pass
    head.wait()


def commands(args, work: Path, n: int, extra: list[str]) -> dict:
    """Part A: the job with its own local Ray, the plain loop, then the job on a running Ray, as fresh
    processes, alternating. The running Ray is started before and stopped after its own run only, so that
    its idle processes take no CPU from the other two."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    names = ("job", "loop", "job on a running Ray")
    times, steady = {k: [] for k in names}, {k: [] for k in names if k != "loop"}
    cpu, by_process = {k: [] for k in names}, {k: [] for k in names}
    for r in range(args.repeats):
        for i, name in enumerate(names):
            out, log = work / f"cmd-{r}-{i}", work / f"cmd-{r}-{i}.log"
            argv = job_args(work / "manifest.parquet", DATA / "images", out, args.model, args.batch_size, extra)
            head = None
            if name == "loop":
                cmd = [sys.executable, str(Path(__file__).resolve()), "--plain-loop", *argv]
            elif name == "job":
                cmd = [sys.executable, "-m", "jobs.score", *argv]
            else:
                head, address = start_head(os.cpu_count())
                cmd = [sys.executable, "-m", "jobs.score", *argv, "--address", address]
            try:
                wall, busy, kinds = time_command(cmd, log, env)
                times[name].append(wall)
                cpu[name].append(busy)
                by_process[name].append(kinds)
            finally:
                if head is not None:
                    stop_head(head)
            if name in steady:
                steady[name].append(steady_rate(log))
            assert len(pq.read_table(out, columns=["image_id"])) == n, f"{name} wrote an incomplete table"
            shutil.rmtree(out)
    median = {k: statistics.median(v) for k, v in times.items()}
    cores = os.cpu_count()
    cpu_out = {}
    if all(x is not None for v in cpu.values() for x in v):
        median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        cpu_out = {
            "machine_busy_cpu_s": {k: [round(x, 1) for x in v] for k, v in cpu.items()},
            "cores_used_median": {k: round(median_cpu[k] / median[k], 2) for k in names},
            # No schedule of this much CPU work can end sooner on this machine's cores.
            "wall_floor_s_median (busy cpu_s / cores)": {k: round(median_cpu[k] / cores, 1) for k in names},
            "cpu_s_by_process_median": {
                k: {kind: round(statistics.median(run.get(kind, 0.0) for run in runs), 1)
                    for kind in sorted({kind for run in runs for kind in run})}
                for k, runs in by_process.items()
            },
        }
    return {
        "wall_s": {k: [round(x, 1) for x in v] for k, v in times.items()},
        "images_per_s_median": {k: round(n / v, 1) for k, v in median.items()},
        "job_steady_images_per_s": {k: [round(x, 1) if x else None for x in v] for k, v in steady.items()},
        # The machine's speed drifts between minutes: compare runs made side by side, repeat by repeat.
        "job_over_plain_loop_per_repeat": [round(l / j, 2) for j, l in zip(times["job"], times["loop"])],
        "job_on_running_ray_over_plain_loop_per_repeat": [
            round(l / j, 2) for j, l in zip(times["job on a running Ray"], times["loop"])],
        "job_over_plain_loop_of_medians": round(median["loop"] / median["job"], 2),
        "cpu": cpu_out,
    }


def in_process(args, work: Path, names: list[str], extra: list[str], images: Path) -> dict:
    """Part B: one process, imports paid; the job (not with --smoke), its parts and the loop."""
    import torch

    from ma_agiqa.scoring import score as score_job

    job, spec, manifest = planned(job_args(work / "manifest.parquet", images, work / "job", args.model,
                                           args.batch_size, extra))
    gpus = 1.0 if _cuda() else 0.0
    results = {}

    summary = None
    if not args.smoke:
        t = time.perf_counter()
        summary = score_job(job)
        results["job end to end (incl. Ray start, model load)"] = len(names) / (time.perf_counter() - t)
        assert summary["rows"] == len(names), summary
        import ray

        ray.shutdown()

    fetch = FetchDecode(spec)
    t = time.perf_counter()
    decoded = [fetch(b) for b in batches(manifest, args.batch_size)]
    results["fetch + decode + preprocess only"] = len(names) / (time.perf_counter() - t)

    t_load = time.perf_counter()
    model = ScoreImages(spec, gpus)
    load_s = time.perf_counter() - t_load
    t = time.perf_counter()
    for b in decoded:
        model(b)
    if gpus:
        torch.cuda.synchronize()
    results["model only (pre-decoded, same batch size)"] = len(names) / (time.perf_counter() - t)

    t = time.perf_counter()
    loop(manifest, fetch, model, WriteParts(str(work / "loop")), args.batch_size)
    loop_s = time.perf_counter() - t
    results["plain single-process loop"] = len(names) / loop_s
    results["plain loop incl. model load"] = len(names) / (loop_s + load_s)
    assert len(pq.read_table(work / "loop", columns=["image_id"])) == len(names), "the loop wrote an incomplete table"
    if summary is None:
        return {"images_per_s": {k: round(v, 1) for k, v in results.items()}}
    results["job (its own summary: after Ray start)"] = summary["rows"] / summary["elapsed_s"]

    job_rate = results["job end to end (incl. Ray start, model load)"]
    bound = min(results["model only (pre-decoded, same batch size)"], results["fetch + decode + preprocess only"])
    return {
        "job_settings": {k: summary[k] for k in ("model_stages", "threads_per_actor", "cpus_per_actor", "quality_actors")},
        "torch_threads_in_loop": torch.get_num_threads(),
        "device": torch.cuda.get_device_name() if gpus else f"cpu ({os.cpu_count()} cores, {platform.machine()})",
        "images_per_s": {k: round(v, 1) for k, v in results.items()},
        "job_over_plain_loop": round(job_rate / results["plain single-process loop"], 2),
        "job_over_plain_loop_incl_load": round(job_rate / results["plain loop incl. model load"], 2),
        "job_over_min_model_decode": round(job_rate / bound, 2),
    }


def main():
    if "--plain-loop" in sys.argv:
        sys.argv.remove("--plain-loop")
        return plain_loop(sys.argv[1:])
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3, help="runs of each command (part A); 0 skips part A")
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--quality-actors", type=int, default=None, help="default: the job's")
    p.add_argument("--fuse", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--threads-per-actor", type=int, default=None)
    p.add_argument("--in-process", action=argparse.BooleanOptionalAction, default=True, help="part B")
    p.add_argument("--smoke", action="store_true", help="part B without the job, on 4 sample images: does it run")
    args = p.parse_args()
    data = SAMPLE if args.smoke else DATA
    if args.smoke:
        args.images, args.repeats, args.in_process = 4, 0, True

    work = Path(tempfile.mkdtemp(prefix="ma_agiqa_bench_"))
    images = sorted(os.listdir(data / "images"))
    names = [images[i % len(images)] for i in range(args.images)]
    ids = [name if i < len(images) else f"{name}#{i // len(images) + 1}" for i, name in enumerate(names)]
    pq.write_table(pa.table({"id": ids, "uri": names}), work / "manifest.parquet")
    extra = ["--fuse", args.fuse,
             *(["--quality-actors", str(args.quality_actors)] if args.quality_actors else []),
             *(["--threads-per-actor", str(args.threads_per_actor)] if args.threads_per_actor else [])]
    out = {"images": len(names), "distinct_images": len(set(names)), "model": args.model,
           "batch_size": args.batch_size, "job_options": extra}
    if args.repeats:
        out["commands"] = commands(args, work, len(names), extra)
    if args.in_process:
        out["in_process"] = in_process(args, work, names, extra, data / "images")
    print(json.dumps(out, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
