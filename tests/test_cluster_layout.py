"""The GPU layout on a real two-node Ray cluster started here (`ray start --head` with no CPU and no GPU, as
a KubeRay head, then a second `ray start` declaring 2 GPUs): the job, asked for separate stages on half a GPU
each, asks the autoscaler for its actors, waits for the GPU node, scores there (the model falls back to the
CPU where no CUDA device exists; scheduling, sizing and resume are the real ones) and resumes to nothing."""
import json
import os
import socket
import subprocess
import sys
import time

from helpers import REPO, SAMPLE, read_table
from ma_agiqa.schema import validate_score_table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the ray of this interpreter, venv activated or not
if not os.path.exists(RAY):
    RAY = "ray"


def _env():
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    return env


def test_a_cluster_that_scales_from_zero_gets_the_gpu_layout(tmp_path):
    port = _free_port()
    address = f"127.0.0.1:{port}"
    logs = tmp_path / "job.log"
    started = []
    try:
        started.append(subprocess.Popen(
            [RAY, "start", "--head", "--block", "--num-cpus", "0", "--num-gpus", "0", "--port", str(port),
             "--include-dashboard", "false", "--disable-usage-stats"],
            env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        out = tmp_path / "scores"
        cmd = [sys.executable, "-m", "jobs.score", "--manifest", str(SAMPLE / "manifest.jsonl"), "--image-root", str(SAMPLE),
               "--output", str(out), "--limit", "16", "--batch-size", "4", "--address", address, "--fuse", "off",
               "--gpus-per-actor", "0.5", "--cpus-per-actor", "0.5", "--model", "tiny-random", "--allow-untrained", "--semantic-actors", "1", "--quality-actors", "1",
               "--wait-for-cluster", "120", "--shared-filesystem",  # both nodes are this machine
               "--allow-cpu-fallback"]  # its GPUs are a resource, no CUDA device
        deadline = time.time() + 60
        with open(logs, "w") as log:
            job = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            started.append(job)
            while "waiting for the cluster" not in logs.read_text():  # the head alone cannot hold it
                assert job.poll() is None, logs.read_text()[-3000:]
                assert time.time() < deadline, logs.read_text()[-3000:]
                time.sleep(0.5)
            started.append(subprocess.Popen(  # the "autoscaler" adds a GPU node
                [RAY, "start", "--address", address, "--block", "--num-cpus", "2", "--num-gpus", "2", "--disable-usage-stats"],
                env=_env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            assert job.wait(timeout=400) == 0, logs.read_text()[-3000:]
        text = logs.read_text()
        assert "the cluster holds the job's actors" in text
        summary = json.loads((out / "_summary.json").read_text())
        assert (summary["model_stages"], summary["decode"]) == ("separate", "tasks")
        assert (summary["semantic_actors"], summary["quality_actors"], summary["gpus_per_actor"]) == (1, 1, 0.5)
        assert summary["ok"] == summary["rows"] == summary["table_rows"] == 16
        validate_score_table(read_table(str(out)), ["coherence", "semantic", "quality"])
        again = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-3000:]
    finally:
        for proc in reversed(started):
            try:
                os.killpg(proc.pid, 9)
            except ProcessLookupError:
                pass
            proc.wait(timeout=30)
