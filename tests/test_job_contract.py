"""What the scoring job promises a user and an adversary: nothing lost, nothing wrong, failures that heal,
boundaries kept, clear errors before any work. Steps run in process where the point is one row; the job
runs on a real local Ray where the point is the table."""
import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.csv  # noqa: F401 - pa.csv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from helpers import REPO, SAMPLE, read_table, sample_rows
import ma_agiqa
from jobs import score
from ma_agiqa.errors import ImageError
from ma_agiqa.schema import score_schema, validate_score_table
from ma_agiqa.scoring import plan as scoring_plan, run as scoring_run
from ma_agiqa.scoring.steps import FetchDecode, JobSpec, ScoreRows, WriteParts, summarise
from ma_agiqa.score_table import resume_plan
from ma_agiqa.fetch import Fetcher
from ma_agiqa.manifests import read_manifest_file
from ma_agiqa.table_files import write_part_atomically
from ma_agiqa.uris import resolve_image_uri

EXPERTS = ["coherence", "semantic", "quality"]


def run_job(*argv) -> dict:
    return score.run(score.parse_args(["--model", "tiny-random", "--allow-untrained", *argv]))  # tiny-random's heads are random


def sample_args(out, *extra):
    return ["--manifest", str(SAMPLE / "manifest.jsonl"), "--image-root", str(SAMPLE), "--output", str(out), *extra]


# -- ids and repeated rows -------------------------------------------------------------------------------
def test_manifest_ids_are_strings_as_written_in_every_format(tmp_path):
    (tmp_path / "m.csv").write_text("id,uri,seed\n001,a.jpg,1\n1,b.jpg,2\n01,c.jpg,3\n1e3,d.jpg,4\n")
    (tmp_path / "m.jsonl").write_text('{"id": "001", "uri": "a.jpg"}\n{"id": 1, "uri": "b.jpg"}\n{"id": 1e3, "uri": 7}\n')
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "uri": ["a.jpg", "b.jpg"]}), tmp_path / "m.parquet")
    assert read_manifest_file(str(tmp_path / "m.csv"), "csv")["id"].to_pylist() == ["001", "1", "01", "1e3"]
    assert read_manifest_file(str(tmp_path / "m.csv"), "csv")["seed"].to_pylist() == [1, 2, 3, 4]  # others typed as usual
    jsonl = read_manifest_file(str(tmp_path / "m.jsonl"), "json")
    assert jsonl["id"].to_pylist() == ["001", "1", "1e3"] and jsonl["uri"].to_pylist() == ["a.jpg", "b.jpg", "7"]
    assert read_manifest_file(str(tmp_path / "m.parquet"), "parquet")["id"].to_pylist() == ["1", "2"]
    manifest = scoring_plan.plan_input(scoring_plan.ManifestFiles.open(str(tmp_path / "m.csv")), str(tmp_path / "o"))
    assert manifest.repeated == 0 and manifest.rows == 4


def test_a_repeated_id_is_scored_once_and_the_summary_counts_the_table(local_ray, tmp_path):
    """The sample listed twice: one row per image_id in the table, the repeats counted, table_rows = rows."""
    rows = sample_rows()
    (tmp_path / "twice.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows + rows))
    out = tmp_path / "scores"
    summary = run_job("--manifest", str(tmp_path / "twice.jsonl"), "--image-root", str(SAMPLE), "--output", str(out),
                      "--rows-per-file", "40", "--batch-size", "8")
    table = read_table(str(out))
    assert summary["manifest_rows"] == 80 and summary["repeated_ids"] == 40
    assert summary["rows"] == summary["table_rows"] == table.num_rows == 40
    assert sorted(table["image_id"].to_pylist()) == sorted(r["id"] for r in rows)


def test_a_manifest_too_large_for_the_driver_is_read_by_ray_tasks_with_the_same_rules(local_ray, tmp_path, monkeypatch):
    """Past DRIVER_ROWS the driver keeps only ids and Ray tasks read the files again: repeats across files
    and --limit apply exactly as in the driver."""
    monkeypatch.setattr(scoring_plan, "DRIVER_ROWS", 5)
    rows = [{"id": r["id"], "uri": r["uri"], "prompt": r["prompt"]} for r in sample_rows()[:12]]
    d = tmp_path / "manifest"
    d.mkdir()
    for i in range(3):  # 3 files of 5 rows: the last repeats two ids of the first file
        chunk = rows[i * 4:(i + 1) * 4] + [rows[i]]
        pa.csv.write_csv(pa.Table.from_pylist(chunk), str(d / f"part-{i}.csv"))
    out = tmp_path / "scores"
    summary = run_job("--manifest", str(d), "--image-root", str(SAMPLE), "--output", str(out), "--limit", "14",
                      "--keep-columns", "prompt")
    assert summary["manifest_rows"] == 14 and summary["repeated_ids"] == 2
    table = read_table(str(out))
    assert sorted(table["image_id"].to_pylist()) == sorted(r["id"] for r in rows) and summary["table_rows"] == 12
    assert {r["image_id"]: r["prompt"] for r in table.to_pylist()} == {r["id"]: r["prompt"] for r in rows}


# -- failures that heal ----------------------------------------------------------------------------------
def _error_part(out, model_id, errors: dict[str, str], when=datetime(2026, 1, 1, tzinfo=timezone.utc)):
    schema = score_schema(EXPERTS)
    rows = [{"image_id": i, "uri": f"images/{i}.jpg", "score": None, "gate_coherence": None, "gate_semantic": None,
             "gate_quality": None, "status": "error", "error": e, "width": None, "height": None, "model": model_id,
             "scored_at": when} for i, e in errors.items()]
    write_part_atomically(pa.Table.from_pylist(rows, schema=schema), str(out), "part-earlier.parquet")


def test_transient_errors_heal_on_the_next_run_and_permanent_ones_on_request(local_ray, tmp_path, tiny_model):
    out = tmp_path / "scores"
    first = run_job(*sample_args(out, "--limit", "8", "--batch-size", "8"))
    assert first["ok"] == 8
    ids = [r["id"] for r in sample_rows()]
    # an earlier run's error rows for images that are fine: two transient kinds, one permanent
    _error_part(out, tiny_model.model_id, {ids[8]: "fetch: ConnectionError reading x", ids[9]: "model: quality: RuntimeError",
                                           ids[10]: "not_image: pretend"})
    assert resume_plan(str(out), tiny_model.model_id, pa.array(ids))[1] == 2
    second = run_job(*sample_args(out, "--batch-size", "8"))
    assert second["retried"] == 2 and second["to_score"] == 40 - 8 - 1
    current = ma_agiqa.read_scores(str(out)).to_pylist()
    by_id = {r["image_id"]: r for r in current}
    assert len(current) == len(by_id) == 40  # one current row per (image_id, model)
    assert by_id[ids[8]]["status"] == by_id[ids[9]]["status"] == "ok"
    assert by_id[ids[10]]["error"] == "not_image: pretend"
    assert run_job(*sample_args(out))["to_score"] == 0  # nothing transient left
    third = run_job(*sample_args(out, "--retry-errors"))
    assert third["to_score"] == 1 and third["retried"] == 1
    current = ma_agiqa.read_scores(str(out))
    validate_score_table(current, EXPERTS)
    assert current.num_rows == 40 and set(current["status"].to_pylist()) == {"ok"}
    assert third["table_rows"] == read_table(str(out)).num_rows == 43  # superseded rows stay until compaction


def test_too_many_errors_fail_the_run_with_its_summary_written(local_ray, tmp_path, capsys):
    rows = [{"id": r["id"], "uri": r["uri"]} for r in sample_rows()[:6]] + [{"id": f"gone-{i}", "uri": f"gone-{i}.jpg"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    args = ["--manifest", str(tmp_path / "m.parquet"), "--image-root", str(SAMPLE), "--batch-size", "8", "--model", "tiny-random", "--allow-untrained"]
    assert score.main(args + ["--output", str(tmp_path / "a")]) == 3
    assert "4 of 10 rows failed" in capsys.readouterr().err
    saved = json.loads((tmp_path / "a" / "_summary.json").read_text())
    assert saved["failed"] is True and saved["errors_by_kind"] == {"missing": 4}
    assert score.main(args + ["--output", str(tmp_path / "b"), "--max-error-fraction", "0.5"]) == 0


def _spec(**kw):
    from ma_agiqa.checkpoint import load_config

    return JobSpec(model="tiny-random", config=load_config("tiny-random"), **kw)


def _png(path, size):
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return str(path)


def test_no_row_can_break_the_batch_it_is_decoded_in(tmp_path, monkeypatch):
    import ma_agiqa.preprocess as images

    good = str(SAMPLE / "images" / "AttnGAN_normal_001.jpg")
    strip = _png(tmp_path / "strip.png", (4000, 3))
    poison = _png(tmp_path / "poison.png", (300, 200))
    real = images.quality_pixels

    def quality_pixels(img, views, *a, **kw):  # preprocessing that raises for one image only
        if img.size == (300, 200):
            raise RuntimeError("resize failed")
        return real(img, views, *a, **kw)

    monkeypatch.setattr(images, "quality_pixels", quality_pixels)
    out = FetchDecode(_spec())(pa.table({"image_id": ["g", "s", "p", "g2"], "uri": [good, strip, poison, good]}))
    status, errors = out["status"].to_pylist(), out["error"].to_pylist()
    assert status == ["ok", "error", "error", "ok"]
    assert errors[1].startswith("extreme_aspect:") and errors[2].startswith("decode: RuntimeError")


def test_objects_over_max_bytes_are_refused_before_they_are_read(tmp_path, monkeypatch):
    big = tmp_path / "big.jpg"
    big.write_bytes((SAMPLE / "images" / "AttnGAN_normal_001.jpg").read_bytes())
    fetcher = Fetcher(max_bytes=1000)
    opened = []
    fs = fetcher._filesystem(str(big))
    monkeypatch.setattr(fs, "open", lambda *a, **kw: opened.append(a) or (_ for _ in ()).throw(AssertionError("read")))
    with pytest.raises(ImageError) as e:
        fetcher.fetch(str(big))
    assert e.value.kind == "too_large" and "--max-bytes" in e.value.message and not opened
    out = FetchDecode(_spec(max_bytes=1000))(pa.table({"image_id": ["b"], "uri": [str(big)]}))
    assert out["error"][0].as_py().startswith("too_large:")
    assert _spec(max_bytes=1 << 20, max_pixels=1_000_000).decode_memory() == 8 * (1 << 20) + 2 * 4_000_000


def test_a_batch_that_breaks_the_model_is_scored_row_by_row_counted_and_non_finite_scores_are_errors(tmp_path):
    import torch

    stage = ScoreRows(_spec())
    batch = FetchDecode(_spec())(pa.table({"image_id": ["a", "b", "c"], "uri": [
        str(SAMPLE / "images" / n) for n in ("AttnGAN_normal_001.jpg", "DALLE2_normal_001.jpg", "glide_normal_000.jpg")]}))
    for name, dim in stage.spec.semantic_prompts.items():
        batch = batch.append_column(f"feature_{name}", pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(3 * dim, np.float32)), dim))
    real = stage._score

    def flaky(table, rows):  # the whole batch fails; row "b" fails alone too
        if len(rows) > 1 or table["image_id"][int(rows[0])].as_py() == "b":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory") if len(rows) == 1 else RuntimeError("batch broke")
        return real(table, rows)

    stage._score = flaky
    out = stage(batch)
    assert out["status"].to_pylist() == ["ok", "error", "ok"] and out["error"][1].as_py().startswith("oom: quality:")
    counts = WriteParts(str(tmp_path / "t"))(out)
    assert summarise(counts.to_pylist())["batches_scored_row_by_row"] == 1
    stage._score = real
    with torch.no_grad():
        stage.model.moe.regress.bias.fill_(float("nan"))
    out = stage(batch)
    assert set(out["status"].to_pylist()) == {"error"} and out["error"][0].as_py().startswith("nonfinite:")
    assert out["score"].null_count == 3


def test_a_failed_write_leaves_no_object_on_the_store(s3_server, monkeypatch):
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket="atomic")
    table = pa.table({"image_id": ["a"] * 5000, "score": np.arange(5000, dtype=np.float32)})
    real = pq.write_table

    def breaks_half_way(t, where, **kw):
        real(t.slice(0, 2500), where, **kw)  # bytes reach the sink, then the writer fails
        raise OSError("disk on fire")

    monkeypatch.setattr(pq, "write_table", breaks_half_way)
    with pytest.raises(OSError):
        write_part_atomically(table, "s3://atomic/scores", "part-x.parquet")
    monkeypatch.setattr(pq, "write_table", real)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["AWS_ENDPOINT_URL"]})
    assert not fs.exists("atomic/scores/part-x.parquet")
    write_part_atomically(table, "s3://atomic/scores", "part-x.parquet")
    fs.invalidate_cache()
    assert fs.exists("atomic/scores/part-x.parquet")


# -- boundaries ------------------------------------------------------------------------------------------
def test_the_image_root_confines_symlinks_and_remote_uris(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret"
    root.mkdir(), outside.mkdir()
    (outside / "key.jpg").write_bytes(b"x")
    (root / "link.jpg").symlink_to(outside / "key.jpg")
    (root / "dir").symlink_to(outside)
    (root / "ok.jpg").write_bytes(b"x")
    for uri in ("link.jpg", "dir/key.jpg", str(outside / "key.jpg"), "../secret/key.jpg"):
        with pytest.raises(ImageError) as e:
            resolve_image_uri(uri, str(root))
        assert e.value.kind == "escapes_root", uri
    assert resolve_image_uri("ok.jpg", str(root)) == str((root / "ok.jpg").resolve())
    for uri in ("s3://other/x.jpg", "s3://corpus/imgs-evil/x.jpg", "s3://corpus/imgs/../secret.jpg", "gs://corpus/imgs/x.jpg"):
        with pytest.raises(ImageError) as e:
            resolve_image_uri(uri, "s3://corpus/imgs")
        assert e.value.kind == "escapes_root", uri
    assert resolve_image_uri("s3://corpus/imgs/a/x.jpg", "s3://corpus/imgs/") == "s3://corpus/imgs/a/x.jpg"
    assert resolve_image_uri("a/x.jpg", "s3://corpus/imgs") == "s3://corpus/imgs/a/x.jpg"
    assert resolve_image_uri("s3://other/x.jpg", "s3://corpus/imgs", allow_outside_root=True) == "s3://other/x.jpg"


def test_errors_never_carry_a_query_string(tmp_path):
    """A URL's query string (a pre-signed URL's credentials) never reaches an error; a local path is shown
    whole: ``?`` and ``#`` are characters of its file names."""
    out = FetchDecode(_spec(image_root=str(tmp_path)))(pa.table({"image_id": ["a", "b", "c"], "uri": [
        "missing?#1.jpg",
        "http://127.0.0.1:9/x.jpg?X-Amz-Credential=SECRET2&sig=SECRET3",
        "ftp://user:SECRET4@host/x.jpg?token=SECRET5",
    ]}))
    text = json.dumps(out.select(["error"]).to_pylist())
    assert "SECRET" not in text and out["status"].to_pylist() == ["error"] * 3
    assert out["error"][0].as_py().endswith("missing?#1.jpg")


# -- clear errors, before work ---------------------------------------------------------------------------
def _fails_before_ray(argv, capsys, *expected):
    assert score.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def test_unusable_settings_and_manifests_stop_before_ray_with_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scoring_run, "init_ray", lambda *a, **kw: pytest.fail("Ray was started"))
    m = str(SAMPLE / "manifest.jsonl")
    (tmp_path / "file").write_text("x")
    _fails_before_ray(["--manifest", m, "--output", str(tmp_path / "file")], capsys, "existing file")
    _fails_before_ray(["--manifest", m, "--output", str(SAMPLE)], capsys, "holds the manifest")
    _fails_before_ray(["--manifest", m, "--output", m], capsys, "existing file")
    _fails_before_ray(["--manifest", m, "--output", str(tmp_path / "o"), "--keep-columns", "uri"], capsys, "uri")
    _fails_before_ray(["--manifest", m, "--output", str(tmp_path / "o"), "--model", "tiny-random-prompt",
                       "--prompt-column", "caption"], capsys, "'caption'")
    _fails_before_ray(["--manifest", m, "--output", str(tmp_path / "o"), "--prompt-column", "caption"], capsys, "'caption'")
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.csv").write_text("uri\nx.jpg\n")
    (d / "b.csv").write_text("path\ny.jpg\n")
    _fails_before_ray(["--manifest", str(d), "--output", str(tmp_path / "o")], capsys, "b.csv", "no 'uri' column")
    lines = [json.dumps({"uri": f"{i}.jpg"}) for i in range(5)]
    lines[2] = '{"uri": "2.jpg",'
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    _fails_before_ray(["--manifest", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o")], capsys, "line 3")
    (tmp_path / "bad.csv").write_text("uri,prompt\na.jpg,x\nb.jpg,y\nc.jpg,z,extra\n")
    _fails_before_ray(["--manifest", str(tmp_path / "bad.csv"), "--output", str(tmp_path / "o")], capsys, "line 4")
    (tmp_path / "header.csv").write_text("uri,prompt\n")
    _fails_before_ray(["--manifest", str(tmp_path / "header.csv"), "--output", str(tmp_path / "o")], capsys, "empty")
    pq.write_table(pa.table({"uri": pa.array([], pa.string())}), tmp_path / "zero.parquet")
    _fails_before_ray(["--manifest", str(tmp_path / "zero.parquet"), "--output", str(tmp_path / "o")], capsys, "empty")
    assert not (tmp_path / "o").exists()


def test_ctrl_c_ends_with_one_line_and_the_resume_hint(tmp_path):
    rows = sample_rows() * 1
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({**r, "id": f"{r['id']}-{k}"}) + "\n" for k in range(5) for r in rows))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.score", "--model", "tiny-random", "--allow-untrained", "--manifest", str(tmp_path / "m.jsonl"), "--image-root",
                             str(SAMPLE), "--output", str(tmp_path / "o"), "--batch-size", "4", "--rows-per-file", "4"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any((tmp_path / "o").glob("part-*.parquet")):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "run the same command again to resume" in err


@pytest.mark.parametrize("job", ["score", "filter", "report", "train"])
def test_a_job_run_without_the_project_installed_says_so_in_one_line(job):
    """-S: an interpreter without site-packages, as a user's system Python without `pip install -e .`."""
    proc = subprocess.run([sys.executable, "-S", "-m", f"jobs.{job}", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "lacks" in lines[0] and "ray" in lines[0] and "pip install -e ." in lines[0]
