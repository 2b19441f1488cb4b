"""The job on a long-lived, shared `ray start` cluster (4 CPUs, no GPU): it sizes against what is free now and
says what it waits for, its autoscaler request holds while it waits (even when another client wipes it) and
is gone when the wait ends, and after every way a job can end (done, exit 2, exit 3, exception, SIGINT,
SIGTERM as `ray job stop` sends) the cluster holds no actor, placement group or request of it. Two runs into
one table at once keep one current row per image and a summary each. One cluster for the whole module: its
start costs seconds, and the jobs' leftovers are exactly what is checked between them."""
import json
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import SAMPLE, copied_sample_images, sample_rows
from ma_agiqa.score_table import read_scores
from ray_clusters import REPO, connected, env, free_port, kill_session, start_node, wait_for_nothing_left, wait_for_text

NOTHING = {"actors": [], "placement_groups": [], "request": []}


@pytest.fixture(scope="module")
def cluster():
    port = free_port()
    head = start_node("--head", "--num-cpus", 4, "--num-gpus", 0, "--port", port, "--include-dashboard", "false")
    try:
        with connected(f"127.0.0.1:{port}"):
            yield f"127.0.0.1:{port}"
    finally:
        kill_session(head)


def job(address, log, *args, manifest=str(SAMPLE / "manifest.jsonl"), root=str(SAMPLE)):
    """`python -m jobs.score` against the cluster, its output in ``log``, in a process group of its own."""
    cmd = [sys.executable, "-m", "jobs.score", "--address", address, "--manifest", manifest, "--image-root", root,
           "--model", "tiny-random", "--allow-untrained", "--batch-size", "4", *map(str, args)]
    with open(log, "w") as f:
        return subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def test_fit_is_judged_against_free_resources_and_a_finished_job_leaves_nothing(cluster, tmp_path):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    # Another job holds 3 of the 4 CPUs: the layout (1 actor x 1 CPU + 1 CPU) fits the totals, not what is free.
    other = placement_group([{"CPU": 3}])
    ray.get(other.ready(), timeout=30)
    log, out = tmp_path / "job.log", tmp_path / "scores"
    proc = job(cluster, log, "--output", out, "--limit", 8, "--quality-actors", 1, "--cpus-per-actor", 1,
               "--wait-for-cluster", 300, "--semantic-actors", 2)  # fused on CPUs: no semantic stage to size
    try:
        wait_for_text(log, "waiting for the cluster", proc, timeout=120)
        assert "free now 1 CPUs and 0 GPUs on 1 nodes; other jobs hold 3 CPUs" in log.read_text()
        remove_placement_group(other)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_session(proc)
    assert "the cluster holds the job's actors" in log.read_text()
    assert wait_for_nothing_left() == NOTHING
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["ok"] == summary["table_rows"] == 8
    assert json.loads((out / "_runs" / f"{summary['run_id']}.json").read_text()) == summary
    assert f"score table: {out} (8 rows" in log.read_text()
    assert "warning: ignored --semantic-actors 2: the model stages are fused" in log.read_text()
    assert summary["ignored_options"] == ["--semantic-actors 2: the model stages are fused (--fuse)"]


def test_a_waiting_request_holds_until_the_wait_ends_by_timeout_or_sigterm(cluster, tmp_path):
    from ray.autoscaler.sdk import request_resources

    from ma_agiqa.scoring.layout import standing_request

    gpu_layout = ["--fuse", "off", "--gpus-per-actor", 1, "--semantic-actors", 1, "--quality-actors", 1]
    wanted = [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}]
    log = tmp_path / "wait.log"
    proc = job(cluster, log, "--output", tmp_path / "a", *gpu_layout, "--wait-for-cluster", 20)
    try:
        wait_for_text(log, "waiting for the cluster", proc, timeout=120)
        assert sorted(standing_request(), key=str) == sorted(wanted, key=str)
        request_resources(bundles=[])  # as Ray Data's autoscaling coordinator does every 20 s
        deadline = time.time() + 6
        while standing_request() != wanted and time.time() < deadline:
            time.sleep(0.2)
        assert sorted(standing_request(), key=str) == sorted(wanted, key=str), "the job did not repeat its request"
        assert proc.wait(timeout=120) == 2, log.read_text()[-3000:]
    finally:
        kill_session(proc)
    text = log.read_text()
    assert "error: the cluster did not give the job its actors within 20 s" in text and "Traceback" not in text
    assert wait_for_nothing_left() == NOTHING

    # SIGTERM (what `ray job stop` and Kubernetes send) while waiting: the request goes with the job.
    log = tmp_path / "term.log"
    proc = job(cluster, log, "--output", tmp_path / "b", *gpu_layout, "--wait-for-cluster", 300)
    try:
        wait_for_text(log, "waiting for the cluster", proc, timeout=120)
        assert standing_request()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 130, log.read_text()[-3000:]
    finally:
        kill_session(proc)
    assert "interrupted" in log.read_text()
    assert wait_for_nothing_left() == NOTHING


def test_two_runs_into_one_table_at_once_keep_one_current_row_each(cluster, tmp_path):
    rows = sample_rows()  # 40 images: run A scores the first 30, run B the last 30, 20 of them shared
    manifests = []
    for name, part in (("a", rows[:30]), ("b", rows[10:])):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"uri": [r["uri"] for r in part]}), path)
        manifests.append(path)
    out = tmp_path / "scores"
    procs = [job(cluster, tmp_path / f"{i}.log", "--output", out, "--quality-actors", 1, "--cpus-per-actor", 0.5,
                 "--rows-per-file", 4, manifest=str(m)) for i, m in enumerate(manifests)]
    try:
        for i, proc in enumerate(procs):
            assert proc.wait(timeout=400) == 0, (tmp_path / f"{i}.log").read_text()[-3000:]
    finally:
        for proc in procs:
            kill_session(proc)
    table = read_scores(str(out))
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == len(rows)
    runs = [json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")]
    assert len({r["run_id"] for r in runs}) == 2 and {r["manifest"] for r in runs} == set(map(str, manifests))
    latest = json.loads((out / "_summary.json").read_text())
    assert latest in runs and latest["finished_at"] == max(r["finished_at"] for r in runs)
    assert all(r["host"] and r["started_at"] <= r["finished_at"] for r in runs)
    assert wait_for_nothing_left() == NOTHING


def test_exit_3_an_exception_and_ctrl_c_leave_nothing_behind(cluster, tmp_path):
    # exit 3: every row an error (images missing)
    missing = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"uri": [f"nowhere_{i}.jpg" for i in range(8)]}), missing)
    log = tmp_path / "errors.log"
    proc = job(cluster, log, "--output", tmp_path / "errors", "--max-error-fraction", 0, "--quality-actors", 1,
               manifest=str(missing), root=str(tmp_path))
    try:
        assert proc.wait(timeout=300) == 3, log.read_text()[-3000:]
    finally:
        kill_session(proc)
    assert wait_for_nothing_left() == NOTHING

    # a store failing inside the pipeline: the output directory passes the driver's checks, then becomes a
    # file once the dataset runs, so writing the first part fails in a Ray task (an output under a file is
    # refused before Ray starts: tests/test_unusable_outputs.py); the part writer makes it the run's verdict, the
    # run stops, and the driver's own write of the summary there fails too: one line, the store's error
    vanishing = tmp_path / "vanishing"
    vanishing.mkdir()
    log = tmp_path / "raises.log"
    proc = job(cluster, log, "--output", vanishing, "--limit", 8, "--quality-actors", 1)
    try:
        wait_for_text(log, "Starting execution", proc, timeout=240)
        shutil.rmtree(vanishing)
        vanishing.write_text("")
        assert proc.wait(timeout=300) == 3, log.read_text()[-3000:]
    finally:
        kill_session(proc)
    said = [line for line in log.read_text().splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and re.match(r"error: storage failed: (FileExistsError|NotADirectoryError)", said[0]), said
    assert "Traceback" not in log.read_text()
    assert wait_for_nothing_left() == NOTHING

    # Ctrl-C mid-run, once the actors have written a part
    images = tmp_path / "images"
    names = copied_sample_images(images, 4)
    pq.write_table(pa.table({"uri": names}), tmp_path / "many.parquet")
    out, log = tmp_path / "interrupted", tmp_path / "sigint.log"
    proc = job(cluster, log, "--output", out, "--quality-actors", 2, "--rows-per-file", 4,
               manifest=str(tmp_path / "many.parquet"), root=str(images))
    try:
        deadline = time.time() + 300
        while not list(out.glob("part-*.parquet")):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        kill_session(proc)
    assert wait_for_nothing_left() == NOTHING
