"""A worker node lost mid-run: on a two-node `ray start` cluster (head and worker, 2 CPUs each, one machine, so
the local output is shared storage: --shared-filesystem), the worker's raylet is killed once the job has
written a part. The job either survives it or is re-run once; then the table holds every row exactly once."""
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from helpers import copied_sample_images
from ma_agiqa.score_table import read_scores
from ray_clusters import REPO, command_line, env, free_port, kill_session, session_pids, start_node


def test_a_worker_node_lost_mid_run_costs_at_most_one_re_run(tmp_path):
    images = tmp_path / "images"
    names = copied_sample_images(images, 3)
    pq.write_table(pa.table({"uri": names}), tmp_path / "manifest.parquet")
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = start_node("--head", "--num-cpus", 2, "--num-gpus", 0, "--port", port, "--include-dashboard", "false")
    worker = start_node("--address", address, "--num-cpus", 2, "--num-gpus", 0)
    out, log = tmp_path / "scores", tmp_path / "job.log"
    # Two actors of half a CPU each and a CPU for the tasks: the layout still fits on the head alone.
    cmd = [sys.executable, "-m", "jobs.score", "--address", address, "--manifest", str(tmp_path / "manifest.parquet"),
           "--image-root", str(images), "--output", str(out), "--model", "tiny-random", "--allow-untrained", "--batch-size", "4",
           "--rows-per-file", "4", "--quality-actors", "2", "--cpus-per-actor", "0.5", "--shared-filesystem"]
    jobs = []
    try:
        deadline = time.time() + 120
        while not _alive_nodes(address) == 2:
            assert time.time() < deadline, "the two-node cluster did not come up"
            time.sleep(1)
        # without --shared-filesystem a local output on two nodes is refused, before any row is scored
        refused = subprocess.run(cmd[:-1], cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "on a cluster of 2 nodes" in refused.stderr, refused.stderr[-3000:]
        assert not out.exists()
        with open(log, "w") as f:
            jobs.append(subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.time() + 300
        while not list(out.glob("part-*.parquet")):
            assert jobs[0].poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        raylets = [pid for pid in session_pids(worker.pid) if "raylet" in command_line(pid).split(" ")[0]]
        assert raylets, "no raylet in the worker node's session"
        for pid in raylets:
            os.kill(pid, signal.SIGKILL)
        try:
            first = jobs[0].wait(timeout=400)
        except subprocess.TimeoutExpired:
            first = None
            kill_session(jobs[0])
        if first != 0:  # at most one re-run, on the head alone
            with open(tmp_path / "rerun.log", "w") as f:
                jobs.append(subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
            assert jobs[1].wait(timeout=400) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    finally:
        for proc in [*jobs, worker, head]:
            kill_session(proc)
    table = read_scores(str(out))
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(names)
    assert set(table["status"].to_pylist()) == {"ok"}
    # the parts themselves hold each row once (a task retried after the loss rewrote its part, by name)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["table_rows"] == len(names), summary


def _alive_nodes(address: str) -> int:
    probe = subprocess.run([sys.executable, "-c", "import ray; ray.init(address=%r, logging_level='ERROR');"
                            "print(sum(n['Alive'] for n in ray.nodes()))" % address],
                           env=env(), capture_output=True, text=True, timeout=120)
    return int(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 and probe.stdout.strip() else 0
