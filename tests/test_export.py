"""jobs.export on a real local Ray: each format read back, container rows, an S3 round trip, a killed export
completed by a re-run, bad rows reported."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import REPO, SAMPLE, read_table, s3_bucket, sample_rows, write_scores
from jobs import export as export_job
from ma_agiqa import locators
from ma_agiqa.export import ExportError, image_extension, run_export, sample_key



ODD_ID = "gen/a b.c"  # an id that is no file name: its key is sanitised, with a digest suffix


def kept_set(tmp_path, n=9):
    """A filter output dir whose kept/ holds n sample images (one under an odd id) and one missing file."""
    rows = sample_rows()[:n]
    kept = [{"image_id": r["id"], "uri": r["uri"], "score": 0.5 + i / 100, "prompt": r["prompt"]} for i, r in enumerate(rows)]
    kept[0]["image_id"] = ODD_ID
    kept.append({"image_id": "gone", "uri": "images/nope.jpg", "score": 0.9, "prompt": "lost"})
    write_scores(tmp_path / "curated" / "kept", kept)
    expected = {r["image_id"]: (SAMPLE / r["uri"]).read_bytes() for r in kept[:-1]}
    return str(tmp_path / "curated"), expected


def read_webdataset(out) -> dict[str, tuple[bytes, dict]]:
    """{image_id: (image bytes, json)} from every shard; fails on a sample seen twice."""
    samples = {}
    for shard in sorted(p for p in os.listdir(out) if p.endswith(".tar")):
        members = {}
        with tarfile.open(os.path.join(out, shard)) as tar:
            for m in tar:
                members[m.name] = tar.extractfile(m).read()
        keys = {name.split(".", 1)[0] for name in members}
        for key in keys:
            doc = json.loads(members[f"{key}.json"])
            (image,) = [v for name, v in members.items() if name.startswith(key + ".") and not name.endswith(".json")]
            assert doc["image_id"] not in samples
            samples[doc["image_id"]] = (image, doc)
    return samples


def test_keys_are_safe_and_distinct():
    ids = ["a", "a.b", "a_b", "a/b", "a b", "a--b", "a-b", "", "x" * 300, "x" * 301, "ü", "_", "a_b--0123456789abcdef"]
    keys = [sample_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert all(k and "." not in k and "/" not in k and len(k) <= 120 for k in keys)
    assert sample_key("AttnGAN_normal_001") == "AttnGAN_normal_001"
    assert image_extension((SAMPLE / "images" / "AttnGAN_normal_001.jpg").read_bytes()) == "jpg"
    assert image_extension(b"\x00\x01", "x/y.PNG") == "png" and image_extension(b"\x00", "x") == "bin"


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "files"])
def test_each_format_holds_exactly_the_kept_images(local_ray_s3, tmp_path, fmt):
    kept, expected = kept_set(tmp_path)
    out = str(tmp_path / "export")
    summary = run_export(kept, out, fmt, shard_size=4, image_root=str(SAMPLE))
    assert summary["kept_rows"] == len(expected) + 1 and summary["exported"] == len(expected)
    assert summary["errors_by_kind"] == {"missing": 1} and summary["shards"] == 3
    errors = pq.read_table(f"{out}/_errors.parquet").to_pylist()
    assert [(e["image_id"], e["kind"]) for e in errors] == [("gone", "missing")]
    assert json.loads(open(f"{out}/_summary.json").read())["exported"] == len(expected)

    if fmt == "webdataset":
        samples = read_webdataset(out)
        assert {i: s[0] for i, s in samples.items()} == expected
        doc = samples["AttnGAN_normal_002"][1]
        assert doc["prompt"] == "man lost in space" and doc["score"] == 0.51 and doc["gate_quality"] == 0.4
        assert sorted(os.listdir(out)) == ["_errors.parquet", "_plan.json", "_shards", "_summary.json",
                                           "shard-00000.tar", "shard-00001.tar", "shard-00002.tar"]
        # Ray's own reader groups our members into the same samples
        import ray.data

        read = ray.data.read_webdataset(out).take_all()
        assert sorted(json.loads(r["json"])["image_id"] if isinstance(r["json"], (bytes, str)) else r["json"]["image_id"]
                      for r in read) == sorted(expected)
    elif fmt == "parquet":
        table = read_table(out)
        assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
        got = {r["image_id"]: r for r in table.to_pylist()}
        assert {i: r["image"]["bytes"] for i, r in got.items()} == expected
        assert got[ODD_ID]["image"]["path"] == sample_key(ODD_ID) + ".jpg" and got[ODD_ID]["prompt"] == "a tray of sushi"
        assert b"Image" in pq.read_schema(f"{out}/part-00000.parquet").metadata[b"huggingface"]
    else:
        meta = pq.read_table(f"{out}/metadata.parquet").to_pylist()
        assert {r["image_id"]: open(f"{out}/{r['file_name']}", "rb").read() for r in meta} == expected
        assert len(os.listdir(f"{out}/images")) == len(expected)

    # the same command again writes nothing and says the same
    again = run_export(kept, out, fmt, shard_size=4, image_root=str(SAMPLE))
    assert again["shards_written"] == 0 and again["exported"] == summary["exported"]


def test_container_rows_are_read_from_their_tar_and_parquet_files(local_ray_s3, tmp_path):
    images = sorted((SAMPLE / "images").glob("*.jpg"))[:6]
    shard = tmp_path / "in" / "000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for p in images[:3]:
            tar.add(p, arcname=f"{p.stem}.jpg")
            info = tarfile.TarInfo(f"{p.stem}.txt")
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    cells = pa.table({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in images[3:]], "prompt": ["p"] * 3},
                     schema=pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("prompt", pa.string())]))
    pq.write_table(cells, tmp_path / "in" / "hf.parquet", row_group_size=2)  # rows 0-1, then 2
    rows = [{"image_id": f"tar/{p.stem}", "uri": locators.tar_member(str(shard), f"{p.stem}.jpg"), "score": 0.5} for p in images[:3]]
    rows += [{"image_id": f"pq/{n}", "uri": locators.parquet_cell(str(tmp_path / "in" / "hf.parquet"), "image", n), "score": 0.5}
             for n in range(3)]
    rows += [{"image_id": "tar/none", "uri": locators.tar_member(str(shard), "none.jpg"), "score": 0.5},
             {"image_id": "pq/none", "uri": locators.parquet_cell(str(tmp_path / "in" / "hf.parquet"), "image", 7), "score": 0.5},
             {"image_id": "tar/noshard", "uri": locators.tar_member(str(tmp_path / "nope.tar"), "x.jpg"), "score": 0.5}]
    write_scores(tmp_path / "kept", rows, keep=())
    out = str(tmp_path / "export")
    summary = run_export(str(tmp_path / "kept"), out, "webdataset", shard_size=100)
    assert summary["exported"] == 6 and summary["errors_by_kind"] == {"missing": 3}
    samples = read_webdataset(out)
    assert {i: s[0] for i, s in samples.items()} == {
        **{f"tar/{p.stem}": p.read_bytes() for p in images[:3]},
        **{f"pq/{n}": p.read_bytes() for n, p in enumerate(images[3:])},
    }


def test_s3_round_trip(local_ray_s3, s3_server, tmp_path):
    rows = sample_rows()[:5]
    fs = s3_bucket(s3_server, "exports", {f"imgs/{r['id']}.jpg": (SAMPLE / r["uri"]).read_bytes() for r in rows})
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(SAMPLE / rows[0]["uri"], arcname="m.jpg")
    fs.pipe("exports/shards/0.tar", buf.getvalue())
    kept = [{"image_id": r["id"], "uri": f"s3://exports/imgs/{r['id']}.jpg", "score": 0.5, "prompt": r["prompt"]} for r in rows]
    kept.append({"image_id": "in-tar", "uri": locators.tar_member("s3://exports/shards/0.tar", "m.jpg"), "score": 0.1, "prompt": "t"})
    local = write_scores(tmp_path / "kept", kept)
    fs.put(f"{local}/part-0.parquet", "exports/run/kept/part-0.parquet")

    summary = run_export("s3://exports/run", "s3://exports/out", "parquet", shard_size=4)
    assert summary["exported"] == 6 and summary["errors"] == 0 and summary["shards"] == 2
    table = read_table("exports/out", filesystem=fs)
    got = {r["image_id"]: r["image"]["bytes"] for r in table.to_pylist()}
    assert got == {**{r["id"]: (SAMPLE / r["uri"]).read_bytes() for r in rows}, "in-tar": (SAMPLE / rows[0]["uri"]).read_bytes()}
    assert json.loads(fs.cat("exports/out/_summary.json"))["exported"] == 6
    assert "testing-secret" not in fs.cat("exports/out/_summary.json").decode()


def shard_bytes(out) -> dict[str, bytes]:
    return {p: open(os.path.join(out, p), "rb").read() for p in sorted(os.listdir(out)) if p.endswith(".tar")}


def test_a_killed_export_is_completed_by_a_rerun_without_duplicates(local_ray_s3, tmp_path):
    kept, expected = kept_set(tmp_path, n=12)
    reference = str(tmp_path / "reference")
    run_export(kept, reference, "webdataset", shard_size=1, image_root=str(SAMPLE))

    # A real kill: the CLI in its own process group (its local Ray with it), SIGKILLed once a shard is out.
    out = str(tmp_path / "export")
    argv = [sys.executable, "-m", "jobs.export", "--kept", kept, "--output", out, "--format", "webdataset",
            "--shard-size", "1", "--image-root", str(SAMPLE)]
    proc = subprocess.Popen(argv, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (os.path.isdir(f"{out}/_shards") and os.listdir(f"{out}/_shards")):
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert os.listdir(f"{out}/_shards"), "the export published no shard within 120 s"

    # What a kill can leave besides: a shard published without its record, a temp file, a shard never written.
    os.remove(f"{out}/_shards/shard-00003.tar.json") if os.path.exists(f"{out}/_shards/shard-00003.tar.json") else None
    open(f"{out}/.tmp-deadbeef-shard-00005.tar", "wb").write(b"half a shard")
    for name in ("shard-00007.tar", "_shards/shard-00007.tar.json"):
        if os.path.exists(f"{out}/{name}"):
            os.remove(f"{out}/{name}")

    summary = run_export(kept, out, "webdataset", shard_size=1, image_root=str(SAMPLE))
    assert summary["shards_written"] >= 2 and summary["exported"] == len(expected) == summary["kept_rows"] - 1
    assert shard_bytes(out) == shard_bytes(reference)  # same names, same bytes
    assert {i: s[0] for i, s in read_webdataset(out).items()} == expected
    assert not [p for p in os.listdir(out) if p.startswith(".tmp-")]


def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys):
    kept, _ = kept_set(tmp_path, n=2)
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["--kept", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), "--format", "files"], "does not exist"),
        (["--kept", kept, "--output", str(tmp_path / "o"), "--format", "zip"], "unknown export format"),
        (["--kept", kept, "--output", str(tmp_path / "a-file"), "--format", "files"], "is an existing file"),
        (["--kept", kept, "--output", str(tmp_path / "a-file" / "o"), "--format", "files"], "which is a file"),
        (["--kept", str(SAMPLE / "manifest.jsonl"), "--output", str(tmp_path / "o"), "--format", "files"], "must be Parquet"),
        (["--kept", kept, "--output", str(SAMPLE), "--format", "files"], "holds no export"),
    ]
    for argv, message in cases:
        assert export_job.main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    with pytest.raises(ExportError):
        run_export(kept, str(tmp_path / "o"), "parquet", shard_size=0)


def test_curate_exports_the_kept_images_after_the_filter(local_ray_s3, tmp_path):
    from jobs import curate

    rows = sample_rows()[:6]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, export_out = str(tmp_path / "curated"), str(tmp_path / "export")
    summary = curate.run(curate.parse_args([
        "--manifest", str(manifest), "--scores", str(tmp_path / "scores"), "--output", out, "--model", "tiny-random",
        "--allow-untrained", "--image-root", str(SAMPLE), "--top-k", "3", "--batch-size", "6",
        "--export-format", "parquet", "--export-output", export_out, "--shard-size", "2"]))
    kept = read_table(f"{out}/kept").to_pylist()
    assert summary["export"]["exported"] == summary["kept"] == len(kept) == 3
    exported = read_table(export_out).to_pylist()
    assert {r["image_id"]: r["image"]["bytes"] for r in exported} == {
        r["image_id"]: (SAMPLE / r["uri"]).read_bytes() for r in kept}
    assert {r["image_id"]: r["score"] for r in exported} == {r["image_id"]: r["score"] for r in kept}
    assert json.loads(open(f"{out}/_summary.json").read())["export"]["shards"] == 2


def test_rows_that_scoring_could_not_read_are_listed_not_exported():
    """A kept set filtered without --drop-errors holds error rows: a text file named .jpg must not come out as
    an image of the training set."""
    from ma_agiqa.export import plan_rows

    table = pa.table({"image_id": ["a", "b", "c"], "uri": ["a.jpg", "t.jpg", "c.jpg"],
                      "error": [None, "not_image: not an image (17 bytes)", None], "score": [3.1, None, 2.0]})
    rows, errors = plan_rows(table)
    assert rows["image_id"].to_pylist() == ["a", "c"]
    assert [(e["image_id"], e["kind"]) for e in errors] == [("b", "not_image")]
    assert plan_rows(table.drop_columns(["error"]))[0].num_rows == 3  # a kept set without the column: all rows


def test_a_store_failing_inside_the_export_is_one_line_and_exit_3(local_ray_s3, tmp_path, capsys):
    """A shard that cannot be written in its Ray task (here a directory stands where the shard goes) ends
    the export with one line naming the store's own error, exit 3; the shards written are kept, and once
    the store is right again the same command completes the export."""
    import shutil

    kept, expected = kept_set(tmp_path, n=4)
    out = str(tmp_path / "export")
    argv = ["--kept", kept, "--output", out, "--format", "webdataset", "--shard-size", "1", "--image-root", str(SAMPLE)]
    assert export_job.main(argv) == 0
    os.remove(f"{out}/shard-00001.tar")
    os.remove(f"{out}/_shards/shard-00001.tar.json")
    os.makedirs(f"{out}/shard-00001.tar/blocked")
    capsys.readouterr()
    assert export_job.main(argv) == 3
    err = capsys.readouterr().err
    said = [line for line in err.splitlines() if line.startswith("error: ")]  # beside Ray Data's INFO lines
    assert len(said) == 1 and said[0].startswith("error: storage failed: IsADirectoryError"), err
    assert "Traceback" not in err and "1 of 1 shards" in said[0] and os.path.exists(f"{out}/shard-00000.tar")
    shutil.rmtree(f"{out}/shard-00001.tar")
    assert export_job.main(argv) == 0
    assert {i: s[0] for i, s in read_webdataset(out).items()} == expected
