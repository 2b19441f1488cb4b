"""The scoring job as users run it: a process killed mid-way then re-run, and `ray job submit` to a
`ray start --head` cluster. Each test starts its own Ray processes and kills all of them after."""
import json
import os
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq

from helpers import REPO, copied_sample_images, read_table, sample_rows
from ray_clusters import env, free_port, kill_session
from ma_agiqa.schema import validate_score_table


def test_killed_run_resumes_to_a_complete_table_without_duplicates(tmp_path):
    # 160 distinct images: four copies of each of the 40 sample images under names of their own (long enough a
    # run for the kill to land mid-way; copies, not links, so that every file lies inside the image root)
    images = tmp_path / "images"
    names = copied_sample_images(images, 4)
    assert len(names) == len(set(names)) == 160
    pq.write_table(pa.table({"uri": names}), tmp_path / "manifest.parquet")
    out = tmp_path / "scores"
    cmd = [sys.executable, "-m", "jobs.score", "--model", "tiny-random", "--allow-untrained", "--manifest", str(tmp_path / "manifest.parquet"),
           "--image-root", str(images), "--output", str(out), "--batch-size", "4", "--rows-per-file", "8"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(list(out.glob("part-*.parquet"))) < 2:
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.2)
        assert len(list(out.glob("part-*.parquet"))) >= 2, "no part file appeared in time"
    finally:
        kill_session(proc)  # SIGKILL to the job and its local Ray: no clean-up runs
    partial = read_table(str(out)).num_rows
    assert 0 < partial < len(names)
    # every visible part is a whole Parquet file (written to a hidden name, then renamed)
    for part in out.glob("part-*.parquet"):
        pq.read_table(part)

    done = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=400, start_new_session=True)
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_table(str(out))
    validate_score_table(table, ["coherence", "semantic", "quality"])
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(names)
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["already_scored"] == partial and summary["rows"] == len(names) - partial


def test_ray_job_submit_to_a_head_node(tmp_path):
    gcs_port, dash_port = free_port(), free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus", "2", "--port", str(gcs_port),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash_port), "--include-dashboard", "true",
         "--dashboard-agent-listen-port", str(free_port()),  # the default 52365 may be another cluster's here
         "--disable-usage-stats"],
        env=env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        address = f"http://127.0.0.1:{dash_port}"
        out = tmp_path / "scores"
        runtime_env = {"env_vars": {"MA_AGIQA_CACHE": os.environ["MA_AGIQA_CACHE"]}}
        submit = ["ray", "job", "submit", "--address", address, "--working-dir", ".",
                  "--runtime-env-json", json.dumps(runtime_env), "--",
                  "python", "-m", "jobs.score", "--model", "tiny-random", "--allow-untrained", "--manifest", "samples/agiqa3k/manifest.jsonl",
                  "--image-root", "samples/agiqa3k", "--output", str(out), "--keep-columns", "generator"]
        deadline = time.time() + 60
        while True:  # the dashboard's job API takes a few seconds to come up
            result = subprocess.run(submit, cwd=REPO, env=env(), capture_output=True, text=True, timeout=400)
            if result.returncode == 0 or time.time() > deadline or "Connection" not in result.stdout + result.stderr:
                break
            time.sleep(2)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        assert "score table:" in result.stdout
        table = read_table(str(out))
        assert table.num_rows == len(sample_rows())
        assert set(table["generator"].to_pylist()) == {r["generator"] for r in sample_rows()}
    finally:
        kill_session(head)
    # The killed head leaves /tmp/ray/ray_current_cluster naming a dead cluster: a job without --address
    # must still start its own local Ray rather than wait on that one.
    local = subprocess.run(
        [sys.executable, "-m", "jobs.score", "--model", "tiny-random", "--allow-untrained", "--manifest", "samples/agiqa3k/manifest.jsonl", "--image-root",
         "samples/agiqa3k", "--output", str(tmp_path / "local"), "--limit", "4"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=180, start_new_session=True,
    )
    assert local.returncode == 0, local.stderr[-3000:]
    assert read_table(str(tmp_path / "local")).num_rows == 4
