"""The GPU layout on a real two-node Ray cluster started here (`ray start --head` with no CPU and no GPU, as
a KubeRay head, then a second `ray start` declaring 2 GPUs): the job, asked for separate stages on half a GPU
each, asks the autoscaler for its actors, waits for the GPU node, scores there (the model falls back to the
CPU where no CUDA device exists; scheduling, sizing and resume are the real ones) and resumes to nothing."""
import json
import subprocess
import sys

from helpers import REPO, SAMPLE, read_table
from ray_clusters import env, free_port, kill_session, start_node, wait_for_port, wait_for_text
from ma_agiqa.schema import validate_score_table


def test_a_cluster_that_scales_from_zero_gets_the_gpu_layout(tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    logs = tmp_path / "job.log"
    started = [start_node("--head", "--num-cpus", 0, "--num-gpus", 0, "--port", port, "--include-dashboard", "false")]
    try:
        wait_for_port(port, started[0])
        out = tmp_path / "scores"
        cmd = [sys.executable, "-m", "jobs.score", "--manifest", str(SAMPLE / "manifest.jsonl"), "--image-root", str(SAMPLE),
               "--output", str(out), "--limit", "16", "--batch-size", "4", "--address", address, "--fuse", "off",
               "--gpus-per-actor", "0.5", "--cpus-per-actor", "0.5", "--model", "tiny-random", "--allow-untrained", "--semantic-actors", "1", "--quality-actors", "1",
               "--wait-for-cluster", "120", "--shared-filesystem",  # both nodes are this machine
               "--allow-cpu-fallback"]  # its GPUs are a resource, no CUDA device
        with open(logs, "w") as log:
            job = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            started.append(job)
            wait_for_text(logs, "waiting for the cluster", job, timeout=60)  # the head alone cannot hold it
            started.append(start_node("--address", address, "--num-cpus", 2, "--num-gpus", 2))  # the "autoscaler" adds a GPU node
            assert job.wait(timeout=400) == 0, logs.read_text()[-3000:]
        text = logs.read_text()
        assert "the cluster holds the job's actors" in text
        summary = json.loads((out / "_summary.json").read_text())
        assert (summary["model_stages"], summary["decode"]) == ("separate", "tasks")
        assert (summary["semantic_actors"], summary["quality_actors"], summary["gpus_per_actor"]) == (1, 1, 0.5)
        assert summary["ok"] == summary["rows"] == summary["table_rows"] == 16
        validate_score_table(read_table(str(out)), ["coherence", "semantic", "quality"])
        again = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
        assert again.returncode == 0 and "nothing to do" in again.stdout, again.stderr[-3000:]
    finally:
        for proc in reversed(started):
            kill_session(proc)
