"""Runs that cannot succeed stop early (issue 29): fetch timeouts against a store that never answers, the
error fraction judged while the job runs, a model stage failing on every batch, GPU actors without CUDA.
Real Ray (local, with one GPU resource that no CUDA device backs), tiny-random, real sockets."""
import json
import os
import socket
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import SAMPLE, read_table
from jobs import score
from ma_agiqa.errors import ImageError
from ma_agiqa.fetch import Fetcher
from ma_agiqa.schema import validate_score_table
from ma_agiqa.scoring.monitor import ERROR_FRACTION, FAILED_BATCHES, Judge, RunStopped, Watch, min_rows_for_error_fraction

EXPERTS = ["coherence", "semantic", "quality"]


@pytest.fixture(scope="module")
def silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection and never sends a byte: a stalled store."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture(scope="module")
def gpu_ray():
    """A local Ray that offers one GPU on a machine whose torch sees none (a node with a broken driver)."""
    import ray

    ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False,
             runtime_env={"env_vars": {"MA_AGIQA_CACHE": os.environ["MA_AGIQA_CACHE"]}})
    yield
    ray.shutdown()


def test_error_fraction_is_judged_over_the_rows_done_once_enough_are_done():
    judge = Judge(max_error_fraction=0.1, min_rows=100)
    assert judge.batch(60, 60) is None  # every row failed, but too few rows to judge
    verdict = judge.batch(40, 0)  # 60 of 100 failed
    assert verdict["kind"] == ERROR_FRACTION and verdict["after_rows"] == 100
    assert judge.stop(FAILED_BATCHES, "later")["kind"] == ERROR_FRACTION  # the first reason stays
    healthy = Judge(max_error_fraction=0.1, min_rows=10)
    assert healthy.batch(100, 10) is None  # 10 % is not over 10 %
    assert min_rows_for_error_fraction(None, 16, 2) == 200
    assert min_rows_for_error_fraction(None, 64, 4) == 512  # two batches per actor
    assert min_rows_for_error_fraction(0, 64, 4) == 0


def test_a_store_that_never_answers_costs_a_row_its_timeout(silent_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_server)
    for name, value in {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    fetcher = Fetcher(connect_timeout=1, read_timeout=0.5, fetch_timeout=1.5)
    for uri in (f"{silent_server}/images/a.jpg", "s3://bucket/images/a.jpg"):
        started = time.monotonic()
        with pytest.raises(ImageError) as raised:
            fetcher.fetch(uri)
        took = time.monotonic() - started
        assert raised.value.kind == "timeout", (uri, str(raised.value))
        assert 0.4 < took < 3.5, (uri, took)  # about the timeout, not aiohttp's 300 s


def test_a_model_stage_failing_on_every_batch_stops_the_run(tiny_model):
    """ScoreRows on batches that break the model for every row (pixels of the wrong size): after
    --max-failed-batches such batches in a row it stops instead of writing `model` error rows forever."""
    from ma_agiqa.scoring.plan import plan_request
    from ma_agiqa.scoring.request import ScoreRequest
    from ma_agiqa.scoring.steps import FALLBACK, PIXELS, ScoreRows

    _, _, spec = plan_request(ScoreRequest(manifest=str(SAMPLE / "manifest.jsonl"), output="unused", model="tiny-random", allow_untrained=True))
    spec.semantic_prompts = {}  # the quality stage alone
    stage = ScoreRows(spec, watch=Watch(max_failed_batches=3))
    n = 4
    batch = pa.table({
        "image_id": [f"i{k}" for k in range(n)], "uri": [f"u{k}" for k in range(n)], "status": ["ok"] * n,
        "error": pa.nulls(n, pa.string()), "width": pa.array([8] * n, pa.int32()), "height": pa.array([8] * n, pa.int32()),
        PIXELS: pa.array([b"\0" * 7] * n, pa.large_binary()), FALLBACK: pa.array(np.zeros(n, np.int8)),
    })
    for _ in range(2):  # below the limit: the rows become model errors and flow on
        out = stage(batch)
        assert set(out["status"].to_pylist()) == {"error"} and out["error"][0].as_py().startswith("model: quality:")
    with pytest.raises(RunStopped, match="failed on every row of 3 batches"):
        stage(batch)


def stalled_manifest(tmp_path, base: str, n: int) -> str:
    rows = [{"id": f"stalled-{i}", "uri": f"{base}/images/{i}.jpg"} for i in range(n)]
    path = tmp_path / "stalled.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def test_a_stalled_store_stops_the_job_early_and_a_rerun_resumes(gpu_ray, silent_server, tmp_path, capsys):
    out = str(tmp_path / "scores")
    n = 64
    args = ["--manifest", stalled_manifest(tmp_path, silent_server, n), "--output", out, "--model", "tiny-random", "--allow-untrained",
            "--gpus-per-actor", "0", "--fuse", "on", "--quality-actors", "1", "--batch-size", "4", "--rows-per-file", "4",
            "--connect-timeout", "1", "--read-timeout", "0.3", "--fetch-timeout", "0.8"]
    code = score.main([*args, "--min-rows-for-error-fraction", "16"])
    assert code == 3
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: stopped early") and "--max-error-fraction" in err
    summary = json.loads((tmp_path / "scores" / "_summary.json").read_text())
    assert summary["stopped_early"]["kind"] == ERROR_FRACTION and summary["failed"]
    assert summary["rows"] == summary["errors"] and set(summary["errors_by_kind"]) <= {"timeout"}
    assert summary["devices"] == {"quality": {"cpu float32": 1}, "semantic": {"cpu float32": 1}}
    # what was written is whole (parts in flight when the dataset stopped are not there: the re-run scores them)
    written = [p for p in os.listdir(out) if p.endswith(".parquet")]
    assert summary["rows"] <= summary["table_rows"] < n
    if written:
        table = read_table(out)
        validate_score_table(table, EXPERTS)
        assert table.num_rows == summary["table_rows"]
        assert {e.split(":")[0] for e in table["error"].to_pylist()} == {"timeout"}
    # a timeout is transient: the same command, told not to stop, goes on with every row, each once
    code = score.main([*args, "--max-error-fraction", "1"])
    assert code == 0
    table = read_table(out)
    assert sorted(set(table["image_id"].to_pylist())) == sorted(f"stalled-{i}" for i in range(n))


def test_gpu_actors_without_cuda_refuse_with_one_line_unless_cpu_fallback(gpu_ray, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal needs a GPU resource without a device")
    args = ["--manifest", str(SAMPLE / "manifest.jsonl"), "--image-root", str(SAMPLE), "--limit", "8", "--model", "tiny-random", "--allow-untrained",
            "--gpus-per-actor", "0.5", "--fuse", "on", "--quality-actors", "1", "--cpus-per-actor", "0.5", "--batch-size", "4"]
    code = score.main([*args, "--output", str(tmp_path / "refused")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: a ") and "torch sees no CUDA device" in err[-1]
    assert socket.gethostname() in err[-1] and "--allow-cpu-fallback" in err[-1]
    summary = score.run(score.parse_args([*args, "--output", str(tmp_path / "cpu"), "--allow-cpu-fallback"]))
    assert summary["ok"] == 8 and summary["stopped_early"] is None
    assert summary["devices"] == {"quality": {"cpu float32": 1}, "semantic": {"cpu float32": 1}}
