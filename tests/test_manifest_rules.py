"""Rules the scoring job and the curation jobs share, held against each other on the same edge cases: a
manifest row's image_id (``manifests.image_ids``: the scorer's rule; the SQL join of ``--metadata``), and a
score table's current row (``read_scores``; the job's resume). Plus inputs as other tools write them."""
import json
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import SAMPLE, T0, read_table
from jobs import filter as filter_job
from jobs import report as report_job
from ma_agiqa.curation import load_metadata
from ma_agiqa.manifests import ManifestError, check_uris, expand_manifest, image_ids, read_manifest_file, stable_id
from ma_agiqa.schema import score_schema
from ma_agiqa.score_table import read_scores, resume_plan
from ma_agiqa.table_files import count_rows, duckdb_connection, write_part_atomically
from ma_agiqa.uris import redact, redact_text, resolve_image_uri

EXPERTS = ["quality"]


def score_rows(rows, model="m@1"):
    """A score table's rows from (image_id, status, error or None, scored_at, uri) tuples."""
    out = []
    for image_id, status, error, at, uri in rows:
        ok = status == "ok"
        out.append({"image_id": image_id, "uri": uri, "score": 2.0 if ok else None, "gate_quality": 1.0 if ok else None,
                    "status": status, "error": error, "width": None, "height": None, "model": model, "scored_at": at})
    return pa.Table.from_pylist(out, schema=score_schema(EXPERTS))


def write_table(path, *parts):
    for i, rows in enumerate(parts):
        write_part_atomically(score_rows(rows), str(path), f"part-{i}.parquet")
    return str(path)


# -- image_id: one rule ---------------------------------------------------------------------------------------
# The same manifest in every format, as its writers write it: ids 001/1/1e3/1.50 as JSON numbers or text, a row
# without an id (its uri's hash), a row with neither (its content's hash; the job makes it a missing_uri row).
def edge_manifests(root: Path) -> dict[str, tuple[str, list]]:
    root.mkdir()
    (root / "m.jsonl").write_text(
        '{"id": "001", "uri": "a.jpg", "tag": "a"}\n{"id": 1, "uri": "b.jpg", "tag": "b"}\n'
        '{"id": 1e3, "uri": "c.jpg", "tag": "c"}\n{"id": 1.50, "uri": "d.jpg", "tag": "d"}\n'
        '{"uri": "e.jpg", "tag": "e"}\n{"id": null, "uri": null, "tag": "f"}\n')
    (root / "m.csv").write_text("id,uri,tag\n001,a.jpg,a\n1,b.jpg,b\n1e3,c.jpg,c\n1.50,d.jpg,d\n,e.jpg,e\n,,f\n")
    tags = list("abcdef")
    pq.write_table(pa.table({"id": ["001", "1", "1e3", "1.50", None, None], "uri": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", None],
                             "tag": tags}), root / "strings.parquet")
    pq.write_table(pa.table({"id": pa.array([1, 1000, None], pa.int64()), "uri": ["b.jpg", "c.jpg", "e.jpg"], "tag": list("bce")}),
                   root / "ints.parquet")
    # pandas writes an integer column with a gap as float64: the gap as null, or as NaN
    pq.write_table(pa.table({"id": pa.array([1.0, 1000.0, 1.5, None, float("nan")], pa.float64()),
                             "uri": ["b.jpg", "c.jpg", "d.jpg", "e.jpg", "g.jpg"], "tag": list("bcdeg")}), root / "floats.parquet")
    e = stable_id("e.jpg")
    return {
        "m.jsonl": ("json", ["001", "1", "1e3", "1.50", e, None]),
        "m.csv": ("csv", ["001", "1", "1e3", "1.50", e, None]),
        "strings.parquet": ("parquet", ["001", "1", "1e3", "1.50", e, None]),
        "ints.parquet": ("parquet", ["1", "1000", e]),
        "floats.parquet": ("parquet", ["1", "1000", "1.5", e, stable_id("g.jpg")]),
    }


def test_image_ids_are_the_text_the_file_holds(tmp_path):
    for name, (fmt, expected) in edge_manifests(tmp_path / "m").items():
        ids = image_ids(read_manifest_file(str(tmp_path / "m" / name), fmt)).to_pylist()
        assert len(ids) == len(expected) and len(set(ids)) == len(ids), name
        for got, want in zip(ids, expected):  # None: the row without id or uri, which still gets its own id
            assert got == want if want is not None else got is not None and got not in expected, name


def test_the_sql_join_derives_the_scorers_ids_in_every_format(tmp_path):
    """jobs.filter --metadata MANIFEST keys each manifest row by the same id the scorer gave it, including
    the rows whose id is a number in the file and the row with neither id nor uri."""
    manifests = edge_manifests(tmp_path / "m")
    for name, (fmt, _) in manifests.items():
        path = str(tmp_path / "m" / name)
        scorer = image_ids(read_manifest_file(path, fmt)).to_pylist()  # what AssignIds writes
        con = duckdb_connection()
        load_metadata(con, [path], fmt, "image_id", derive=True)
        sql = con.execute("SELECT _image_id FROM _metadata ORDER BY _row").fetchall()
        assert [r[0] for r in sql] == scorer, name

        at = [T0] * len(scorer)
        rows = [(i, "ok", None, t, None) for i, t in zip(scorer, at)]
        scores = write_table(tmp_path / f"scores-{name}", rows)
        out = tmp_path / f"out-{name}"
        assert filter_job.main(["--scores", scores, "--output", str(out), "--metadata", path]) == 0
        summary = json.loads((out / "_summary.json").read_text())
        assert summary["kept"] == len(scorer) and summary["rejected"] == 0, (name, summary)
        assert sorted(r["tag"] for r in read_table(str(out / "kept")).to_pylist()) == sorted(
            read_manifest_file(path, fmt)["tag"].to_pylist())


def test_numeric_ids_in_jsonl_join_on_an_explicit_id_column(tmp_path):
    """--on image_id=id reads the key column as written too: 1.50 is not 1.5, 1e3 is not 1000.0."""
    (tmp_path / "m.jsonl").write_text('{"id": 1.50, "g": "x"}\n{"id": 1e3, "g": "y"}\n{"id": 1, "g": "z"}\n')
    scores = write_table(tmp_path / "s", [(i, "ok", None, T0, None) for i in ("1.50", "1e3", "1")])
    out = tmp_path / "out"
    assert filter_job.main(["--scores", scores, "--output", str(out), "--metadata", str(tmp_path / "m.jsonl"),
                            "--on", "image_id=id"]) == 0
    assert {r["image_id"]: r["g"] for r in read_table(str(out / "kept")).to_pylist()} == {"1.50": "x", "1e3": "y", "1": "z"}


def test_curate_scores_and_keeps_every_row_of_a_numeric_id_manifest(local_ray, tmp_path):
    """The issue's reproduction end to end: a JSON Lines manifest with ids 1, 1e3, 1.50 (and rows without
    an id, and without a uri) is scored, then joined back by jobs.curate: every row kept, none orphaned."""
    from ma_agiqa import create_model
    from jobs import curate

    ckpt = tmp_path / "ckpt"
    create_model("tiny-random").save_pretrained(ckpt)
    images = sorted((SAMPLE / "images").glob("*.jpg"))[:4]
    lines = ['{"id": 1, "uri": "%s", "prompt": "a"}', '{"id": 1e3, "uri": "%s", "prompt": "b"}',
             '{"id": 1.50, "uri": "%s", "prompt": "c"}', '{"uri": "%s", "prompt": "d"}']
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(line % p.as_uri() + "\n" for line, p in zip(lines, images))
                        + '{"uri": null, "prompt": "e"}\n')
    summary = curate.run(curate.parse_args([
        "--manifest", str(manifest), "--scores", str(tmp_path / "s"), "--output", str(tmp_path / "c"),
        "--model", str(ckpt), "--allow-untrained", "--batch-size", "4"]))
    assert summary["scoring"]["errors"] == 1  # the row without a uri, kept as an error row
    assert summary["kept"] == 5 and summary["rejected"] == 0, summary
    kept = {r["prompt"]: r["image_id"] for r in read_table(str(tmp_path / "c" / "kept")).to_pylist()}
    assert [kept[p] for p in "abc"] == ["1", "1e3", "1.50"] and kept["d"] == stable_id(images[3].as_uri())


# -- the current row: one rule --------------------------------------------------------------------------------
def test_resume_decides_by_the_row_read_scores_returns(tmp_path):
    """Ties in scored_at between an id's rows: resume retries exactly the ids whose current row (the one the
    readers take) is a transient error."""
    t1 = T0 + timedelta(seconds=1)
    cases = {  # image_id -> its rows, spread over two parts
        "ok_and_error_same_time": [("ok", None, T0), ("error", "fetch: reset", T0)],
        "ok_then_later_error": [("ok", None, T0), ("error", "fetch: reset", t1)],
        "two_errors_same_time": [("error", "fetch: reset", T0), ("error", "missing: gone", T0)],
        "two_errors_same_time_b": [("error", "missing: gone", T0), ("error", "timeout: slow", T0)],
        "later_transient": [("error", "missing: gone", T0), ("error", "fetch: reset", t1)],
        "later_permanent": [("error", "fetch: reset", T0), ("error", "missing: gone", t1)],
        "copies": [("error", "oom: x", T0), ("error", "oom: x", T0)],
        "one_transient": [("error", "model: nan", T0)],
    }
    first = [(i, *rows[0], "u.jpg") for i, rows in cases.items()]
    second = [(i, *rows[1], "u.jpg") for i, rows in cases.items() if len(rows) > 1]
    for order in ((first, second), (second, first)):  # which part holds which row must not matter
        out = write_table(tmp_path / f"t{len(list(tmp_path.iterdir()))}", *order)
        current = {r["image_id"]: r for r in read_scores(out, "m@1").to_pylist()}
        ids = pa.array(list(cases))
        done, retried = resume_plan(out, "m@1", ids)
        for image_id, is_done in zip(cases, done):
            row = current[image_id]
            transient = row["status"] == "error" and row["error"].split(":")[0] in ("fetch", "timeout", "model", "oom")
            assert is_done == (not transient), (image_id, row)
        assert retried == int((~done).sum())
        assert {i for i, d in zip(cases, done) if not d} == {
            "two_errors_same_time", "later_transient", "copies", "one_transient"}
        all_again, _ = resume_plan(out, "m@1", ids, retry_errors=True)
        assert [i for i, d in zip(cases, all_again) if d] == ["ok_and_error_same_time", "ok_then_later_error"]


# -- inputs as other tools write them -------------------------------------------------------------------------
def test_an_excel_csv_with_a_byte_order_mark_keeps_its_ids_as_written(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbfid,uri,tag\r\n001,a.jpg,x\r\n1,b.jpg,y\r\n")
    table = read_manifest_file(str(path), "csv")
    assert table.column_names == ["id", "uri", "tag"]
    assert image_ids(table).to_pylist() == ["001", "1"]
    scores = write_table(tmp_path / "s", [("001", "ok", None, T0, "a.jpg"), ("1", "ok", None, T0, "b.jpg")])
    assert filter_job.main(["--scores", scores, "--output", str(tmp_path / "o"), "--metadata", str(path)]) == 0
    assert {r["image_id"]: r["tag"] for r in read_table(str(tmp_path / "o" / "kept")).to_pylist()} == {"001": "x", "1": "y"}
    (tmp_path / "excel.jsonl").write_bytes(b'\xef\xbb\xbf{"id": "7", "uri": "a.jpg"}\n')
    assert read_manifest_file(str(tmp_path / "excel.jsonl"), "json")["id"].to_pylist() == ["7"]


def test_file_uris_are_percent_decoded(tmp_path):
    from ma_agiqa.fetch import Fetcher

    image = tmp_path / "my images" / "a b#1.jpg"
    image.parent.mkdir()
    image.write_bytes((SAMPLE / "images" / "AttnGAN_normal_001.jpg").read_bytes())
    uri = image.as_uri()
    assert "%20" in uri and "%23" in uri
    for root in (None, str(tmp_path), tmp_path.as_uri()):
        path = resolve_image_uri(uri, root)
        assert path == str(image), root
        assert Fetcher().fetch(path) == image.read_bytes()
    # a plain path is a name as written: %20 is three characters of it
    assert resolve_image_uri("a%20b.jpg", str(tmp_path)) == str(tmp_path / "a%20b.jpg")


def test_tables_at_paths_with_glob_characters_are_read_literally(tmp_path):
    """A table at out?x[1]/ is read, compacted, filtered and reported by its own path, never as a pattern
    (a sibling out?x1/ that the pattern would match is left alone); local paths are shown whole."""
    from ma_agiqa.compaction import compact

    base = tmp_path / "run#2"
    decoy = write_table(base / "outqx1", [("z", "ok", None, T0, "z.jpg")])
    table = write_table(base / "out?x[1]", [("a", "ok", None, T0, "a.jpg"), ("b", "error", "missing: x", T0, "b.jpg")],
                        [("b", "ok", None, T0 + timedelta(seconds=1), "b.jpg")])
    assert expand_manifest(table)[0] == sorted(str(p) for p in Path(table).glob("*.parquet"))
    assert count_rows(table) == 3 and count_rows(decoy) == 1
    done, _ = resume_plan(table, "m@1", pa.array(["a", "b", "z"]))
    assert done.tolist() == [True, True, False]
    out = base / "curated[1]"
    assert filter_job.main(["--scores", table, "--output", str(out), "--min-score", "0"]) == 0
    assert sorted(r["image_id"] for r in read_table(str(out / "kept")).to_pylist()) == ["a", "b"]
    assert report_job.main(["--scores", table, "--output", str(base / "r?.html")]) == 0
    assert (base / "r?.html").stat().st_size > 0
    assert compact(table)["rows_after"] == 2 and count_rows(decoy) == 1
    assert redact(table) == table and redact(f"file://{table}") == f"file://{table}"
    assert redact("s3://u:p@bucket/k?X-Amz-Signature=s#f") == "s3://bucket/k"
    assert redact_text(f"at {table} and https://h/k?sig=1") == f"at {table} and https://h/k"


def test_a_table_with_glob_characters_on_s3(tmp_path, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("globs")
    fs.pipe("globs/t1/part-0.parquet", b"")  # what the pattern t[1] would match instead: not a table
    local = write_table(tmp_path / "t", [("a", "ok", None, T0, "a.jpg"), ("b", "ok", None, T0, "b.jpg")])
    fs.put(f"{local}/part-0.parquet", "globs/t[1]/part-0.parquet")
    assert count_rows("s3://globs/t[1]") == 2
    summary = filter_job.run(filter_job.parse_args(["--scores", "s3://globs/t[1]", "--output", "s3://globs/o[1]",
                                                    "--min-score", "0"]))
    assert summary["kept"] == 2


def test_a_json_dictionary_is_not_a_manifest(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "captions.json").write_text(json.dumps({"a.jpg": "a cat", "b.jpg": "a dog"}))
    files, fmt = expand_manifest(str(folder))
    with pytest.raises(ManifestError, match="captions.json is one JSON object without 'id' or 'uri'"):
        read_manifest_file(files[0], fmt)
    (folder / "captions.json").write_text(json.dumps({"a.jpg": "a cat", "b.jpg": "a dog"}, indent=2))
    with pytest.raises(ManifestError, match="spread over lines .a dictionary of 2 keys.*not JSON Lines"):
        read_manifest_file(files[0], fmt)
    (folder / "captions.json").write_text(json.dumps([{"uri": "a.jpg"}]))
    with pytest.raises(ManifestError, match="a JSON array"):
        read_manifest_file(files[0], fmt)
    (folder / "captions.json").write_text('{"uri": "a.jpg"}')  # one row is a manifest of one row
    assert read_manifest_file(files[0], fmt)["uri"].to_pylist() == ["a.jpg"]
    (folder / "captions.json").write_text('{"uri": "a.jpg"}\n{"uri": "b.jpg"\n')  # a malformed line is named
    with pytest.raises(ManifestError, match="line 2: malformed JSON"):
        read_manifest_file(files[0], fmt)


def test_a_manifest_the_job_cannot_read_is_refused_before_ray(tmp_path):
    tar = pa.table({"uri": [f"tar://{i:04d}.jpg::file:///shards/000.tar" for i in range(3)] + [None]})
    with pytest.raises(ManifestError, match=r"tar:// \(3 rows\)"):
        check_uris(tar, "shards.jsonl")
    check_uris(pa.table({"uri": ["ftp://h/x.jpg", "a.jpg", "s3://b/k.jpg"]}), "m")  # a bad row among good: an error row
    check_uris(pa.table({"uri": ["FILE:///a.jpg", "HTTPS://h/x.jpg"]}), "m")
    check_uris(pa.table({"uri": pa.array([None, None], pa.string())}), "m")  # missing_uri rows, as before


def test_count_rows_reads_every_footer_on_s3(tmp_path, s3_server):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("counts")
    sizes = [1, 5, 0, 17, 3, 2, 8, 1, 4, 6, 9, 2, 7, 1, 3, 5, 2, 1, 4, 2]  # more parts than threads
    for i, n in enumerate(sizes):
        write_part_atomically(score_rows([(f"{i}-{j}", "ok", None, T0, None) for j in range(n)]), "s3://counts/t", f"part-{i:02d}.parquet")
    fs.pipe("counts/t/_summary.json", b"{}")
    assert count_rows("s3://counts/t", threads=4) == sum(sizes)
    assert count_rows("s3://counts/none") == 0


def test_metadata_files_unify_their_columns_as_the_scorer_does(tmp_path):
    """Metadata in several files is joined whole: a column one file lacks or holds only nulls in is null
    there, an int column another file writes as float becomes float (1 stays 1.0, 2.5 is not rounded)."""
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "a.jsonl").write_text('{"id": "a", "uri": "a.jpg", "note": null, "w": 1}\n')
    (meta / "b.jsonl").write_text('{"id": "b", "uri": "b.jpg", "w": 2.5, "extra": "e"}\n{"id": "c", "uri": "c.jpg", "note": "n"}\n')
    scores = write_table(tmp_path / "s", [(i, "ok", None, T0, f"{i}.jpg") for i in "abc"])
    assert filter_job.main(["--scores", scores, "--output", str(tmp_path / "o"), "--metadata", str(meta)]) == 0
    kept = {r["image_id"]: (r["w"], r["note"], r["extra"]) for r in read_table(str(tmp_path / "o" / "kept")).to_pylist()}
    assert kept == {"a": (1.0, None, None), "b": (2.5, None, "e"), "c": (None, "n", None)}
    (meta / "c.jsonl").write_text('{"id": "d", "uri": "d.jpg", "w": "heavy"}\n')
    assert filter_job.main(["--scores", scores, "--output", str(tmp_path / "o"), "--metadata", str(meta)]) == 2
