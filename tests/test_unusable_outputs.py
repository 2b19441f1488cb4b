"""Outputs and clusters that cannot be used are one line and exit 2 before any work, in every job: an
endpoint that does not answer, a path under a file, a file where a directory goes (or the reverse), a filter
output that is the score table, a table that is not there, a Ray address nothing answers on. Subprocesses, so
that what a user sees (stderr, the exit code, no traceback) is what is checked."""
import os
import socket
import subprocess
import sys

import pytest

from helpers import REPO, SAMPLE

MANIFEST = ["--manifest", str(SAMPLE / "manifest.jsonl"), "--image-root", str(SAMPLE), "--limit", "2"]


def closed_port() -> int:
    """A port nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job(*argv, env=None, timeout=120):
    run = subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                         env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    return run.returncode, run.stderr.strip()


def one_line(code, err, pattern):
    import re

    assert code == 2, (code, err[-2000:])
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error: "), err[-2000:]
    assert re.search(pattern, err), err


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """A small score table of the sample images (tiny-random), made once."""
    out = tmp_path_factory.mktemp("t") / "scores"
    code, err = job("jobs.score", *MANIFEST, "--output", str(out), "--model", "tiny-random", "--allow-untrained",
                    timeout=600)
    assert code == 0, err[-2000:]
    return out


def test_outputs_that_cannot_be_written_are_refused_before_any_work(table, tmp_path):
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    dead = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}", "AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"}
    # jobs.score: under a file (found before Ray starts: no model loads), an object store that does not answer
    one_line(*job("jobs.score", *MANIFEST, "--output", str(a_file / "sub"), "--model", "tiny-random",
                  "--allow-untrained"), r"lies under .*afile, which is a file")
    one_line(*job("jobs.score", *MANIFEST, "--output", "s3://bucket/out", "--model", "tiny-random", "--allow-untrained",
                  env=dead), r"--output s3://bucket/out cannot be reached")
    # jobs.filter: the score table itself, a folder of other things, under a file, an unreachable store
    one_line(*job("jobs.filter", "--scores", str(table), "--output", str(table), "--top-k", "1"), "the score table")
    one_line(*job("jobs.filter", "--scores", str(table), "--output", str(SAMPLE), "--top-k", "1"), "holds no filter output")
    one_line(*job("jobs.filter", "--scores", str(table), "--output", str(a_file), "--top-k", "1"), "existing file")
    one_line(*job("jobs.filter", "--scores", str(table), "--output", "s3://b/cur", "--top-k", "1", env=dead), "cannot be reached")
    assert sorted(p.name for p in SAMPLE.iterdir() if p.name in ("kept", "rejected")) == []  # nothing written there
    # jobs.report: a directory, under a file
    one_line(*job("jobs.report", "--scores", str(table), "--output", str(tmp_path)), "is a directory")
    one_line(*job("jobs.report", "--scores", str(table), "--output", str(a_file / "r.html")), "which is a file")
    # jobs.export: an unreachable --kept or --output
    one_line(*job("jobs.export", "--kept", "s3://b/kept", "--output", str(tmp_path / "x"), "--format", "parquet",
                  env=dead), r"--kept s3://b/kept cannot be reached")
    # jobs.compact: no table there (a typo in a schedule), a file
    one_line(*job("jobs.compact", "--table", str(tmp_path / "no-such-table")), "holds no score table")
    one_line(*job("jobs.compact", "--table", str(a_file)), "holds no score table")


def test_a_ray_address_nothing_answers_on_is_one_line_not_a_wait(tmp_path):
    import time

    started = time.time()
    one_line(*job("jobs.score", *MANIFEST, "--output", str(tmp_path / "o"), "--model", "tiny-random",
                  "--allow-untrained", "--address", f"127.0.0.1:{closed_port()}"), "no Ray cluster answers")
    assert time.time() - started < 60
    one_line(*job("jobs.score", *MANIFEST, "--output", str(tmp_path / "o"), "--model", "tiny-random",
                  "--allow-untrained", "--address", "http://127.0.0.1:8265"), "is a URL")


@pytest.mark.parametrize("name, content", [("zero.csv", ""), ("blank.csv", "\n \n"), ("blank.jsonl", "\n\n")])
def test_an_empty_manifest_says_it_is_empty(tmp_path, name, content):
    (tmp_path / name).write_text(content)
    one_line(*job("jobs.score", "--manifest", str(tmp_path / name), "--output", str(tmp_path / "o"), "--model",
                  "tiny-random", "--allow-untrained"), r"is empty \(no header and no rows\)")


def test_a_missing_score_table_is_called_a_score_table(tmp_path):
    for argv in (["jobs.filter", "--output", str(tmp_path / "f"), "--top-k", "1"], ["jobs.report", "--output", str(tmp_path / "r.html")]):
        one_line(*job(*argv, "--scores", str(tmp_path / "no-table")), r"score table .*no-table does not exist")


def test_a_storage_error_is_found_however_ray_wrapped_it():
    """Inside the pipeline a store's error reaches the driver as Ray wraps it: a RayTaskError that is also the
    cause's class, inside Ray Data's UserCodeException chain. Each is unwrapped to the store's own error (the
    one line the jobs print, exit 3); an error that is no store's is left to be raised."""
    from botocore.exceptions import EndpointConnectionError
    from ray.exceptions import RayTaskError, UserCodeException

    from jobs.cli import storage_cause

    for error in (NotADirectoryError(20, "Not a directory", "/out/part-0.parquet"),
                  EndpointConnectionError(endpoint_url="http://127.0.0.1:1")):
        task = RayTaskError("write_parts", "Traceback (most recent call last): ...", error).as_instanceof_cause()
        try:
            try:
                raise task
            except Exception as inner:
                raise UserCodeException("a map task failed") from inner
        except UserCodeException as wrapped:
            assert storage_cause(wrapped) is error
        assert storage_cause(task) is error and storage_cause(error) is error
    bug = RayTaskError("f", "...", ZeroDivisionError("x")).as_instanceof_cause()
    assert storage_cause(bug) is None and storage_cause(UserCodeException("y")) is None
