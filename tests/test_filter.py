"""jobs.filter on hand-made score tables: each rule, their composition, ties, and the join's edge cases."""
import json
from datetime import timedelta

import pytest

from helpers import T0, read_table, write_scores
from jobs import filter as filter_job
from ma_agiqa.curation import CurationError
from ma_agiqa.manifests import stable_id

def run(tmp_path, scores, *options, expect_rc=0):
    out = tmp_path / "out"
    rc = filter_job.main(["--scores", scores, "--output", str(out), *options])
    assert rc == expect_rc
    if rc:
        return None
    kept = read_table(str(out / "kept")).to_pylist()
    rejected = read_table(str(out / "rejected")).to_pylist()
    summary = json.loads((out / "_summary.json").read_text())
    return kept, {r["image_id"]: r for r in rejected}, summary


def ids(rows):
    return sorted(r["image_id"] for r in rows)


ROWS = [
    ("a1", 4.0, "cat"), ("a2", 3.0, "cat"), ("a3", 2.0, "cat"), ("a4", 1.0, "cat"),
    ("b1", 3.5, "dog"), ("b2", 2.5, "dog"), ("b3", None, "dog"),
    ("c1", 0.5, "owl"),
]


def test_min_score_rejects_lower_scores_and_error_rows(tmp_path):
    kept, rejected, summary = run(tmp_path, write_scores(tmp_path / "s", ROWS), "--min-score", "2.5")
    assert ids(kept) == ["a1", "a2", "b1", "b2"]
    assert set(rejected) == {"a3", "a4", "b3", "c1"}
    assert {r["rejected_by"] for r in rejected.values()} == {"min_score"}
    assert rejected["a3"]["reason"] == "score 2.0000 < 2.5"
    assert rejected["b3"]["reason"] == "no score (error row)"
    assert summary["kept"] == 4 and summary["rejected_by"] == {"min_score": 4} and summary["rows"] == 8
    assert kept[0]["prompt"] and "score" in kept[0] and "uri" in kept[0]


def test_drop_errors_comes_first_and_names_the_error(tmp_path):
    kept, rejected, summary = run(tmp_path, write_scores(tmp_path / "s", ROWS), "--drop-errors", "--min-score", "2.5")
    assert rejected["b3"]["rejected_by"] == "error" and rejected["b3"]["reason"] == "missing: no such object"
    assert summary["rejected_by"] == {"error": 1, "min_score": 3}
    # no rule: error rows are kept, as every other row
    kept, rejected, _ = run(tmp_path, write_scores(tmp_path / "s", ROWS))
    assert len(kept) == 8 and not rejected


def test_max_gate_quality(tmp_path):
    rows = [{"image_id": "x", "score": 3.0, "gate_quality": 0.9}, {"image_id": "y", "score": 2.0, "gate_quality": 0.2}]
    kept, rejected, _ = run(tmp_path, write_scores(tmp_path / "s", rows), "--max-gate-quality", "0.5")
    assert ids(kept) == ["y"] and rejected["x"]["rejected_by"] == "max_gate_quality"


def test_top_k_per_group_and_globally(tmp_path):
    scores = write_scores(tmp_path / "s", ROWS)
    kept, rejected, summary = run(tmp_path, scores, "--top-k", "2", "--per", "prompt")
    assert ids(kept) == ["a1", "a2", "b1", "b2", "c1"]
    assert rejected["a3"]["reason"] == "rank 3 of 4 in prompt = cat, keeping 2"
    assert rejected["b3"]["rejected_by"] == "top_k" and rejected["b3"]["reason"] == "no score (error row)"
    assert summary["per_group"]["cat"] == {"rows": 4, "kept": 2, "rejected_top_k": 2}
    assert summary["per_group"]["dog"]["kept"] == 2 and summary["groups"] == 3
    kept, _, _ = run(tmp_path, scores, "--top-k", "3")
    assert ids(kept) == ["a1", "a2", "b1"]


def test_top_k_ties_are_broken_by_image_id_or_kept(tmp_path):
    rows = [("t3", 2.0, "p"), ("t1", 2.0, "p"), ("t2", 2.0, "p"), ("t0", 5.0, "p"), ("t4", 1.0, "p")]
    scores = write_scores(tmp_path / "s", rows)
    kept, rejected, _ = run(tmp_path, scores, "--top-k", "2", "--per", "prompt")
    assert ids(kept) == ["t0", "t1"]  # exactly k: the tie at the cut goes to the smallest image_id
    kept, _, _ = run(tmp_path, scores, "--top-k", "2", "--per", "prompt", "--keep-ties")
    assert ids(kept) == ["t0", "t1", "t2", "t3"]


def test_top_fraction_rounds_up_and_counts_only_scored_rows(tmp_path):
    rows = [(f"g{i:02d}", float(i), "ten") for i in range(10)] + [("h1", 1.0, "four"), ("h2", 2.0, "four"),
            ("h3", 3.0, "four"), ("h4", 4.0, "four"), ("h5", None, "four"), ("s1", 1.0, "one")]
    kept, rejected, summary = run(tmp_path, write_scores(tmp_path / "s", rows), "--top-fraction", "0.3", "--per", "prompt")
    # 0.3 x 10 is 3 (not 4 from floating-point), 0.3 x 4 -> 2, a group of one keeps its image
    assert ids(kept) == ["g07", "g08", "g09", "h3", "h4", "s1"]
    assert rejected["h5"]["reason"] == "no score (error row)"
    assert summary["per_group"]["four"] == {"rows": 5, "kept": 2, "rejected_top_fraction": 3}


def test_rules_compose_in_order(tmp_path):
    scores = write_scores(tmp_path / "s", ROWS)
    # min-score first: top-2 per prompt then ranks only what is left (dog keeps b1 only; owl's c1 is gone)
    kept, rejected, summary = run(tmp_path, scores, "--min-score", "3", "--top-k", "1", "--per", "prompt")
    assert ids(kept) == ["a1", "b1"]
    assert rejected["a2"]["rejected_by"] == "top_k" and rejected["a3"]["rejected_by"] == "min_score"
    assert summary["rejected_by"] == {"min_score": 5, "top_k": 1}
    # a fraction, then a count: the best half of each prompt, at most one
    kept, rejected, _ = run(tmp_path, scores, "--top-fraction", "0.5", "--top-k", "1", "--per", "prompt")
    assert ids(kept) == ["a1", "b1", "c1"]
    assert rejected["a2"]["rejected_by"] == "top_k" and rejected["a3"]["rejected_by"] == "top_fraction"


def test_join_edge_cases_are_reported_never_dropped(tmp_path):
    t1 = T0 + timedelta(hours=1)
    rows = [
        ("a", 3.0, "cat"), ("b", 2.0, "cat"), ("orphan", 4.0, "cat"),
        {"image_id": "d", "score": 1.0, "scored_at": T0}, {"image_id": "d", "score": 2.0, "scored_at": t1},
        {"image_id": "e", "score": None, "scored_at": t1}, {"image_id": "e", "score": 1.5, "scored_at": T0},
    ]
    scores = write_scores(tmp_path / "s", rows)
    meta = tmp_path / "meta.csv"
    meta.write_text("id,prompt,generator\na,a cat,sd\nb,a cat,dalle\nd,a dog,sd\ne,an owl,sd\nnoscore,x,sd\n"
                    "a,a cat again,mj\n")
    kept, rejected, summary = run(tmp_path, scores, "--metadata", str(meta), "--on", "image_id=id")
    assert ids(kept) == ["a", "b", "d", "e"]
    by_id = {r["image_id"]: r for r in kept}
    assert by_id["a"]["generator"] == "sd" and by_id["a"]["meta_prompt"] == "a cat"  # first metadata row; clash renamed
    assert by_id["d"]["score"] == 2.0  # the latest of two ok rows
    assert by_id["e"]["score"] == 1.5  # an ok row wins over a later error row
    assert rejected["orphan"]["rejected_by"] == "no_metadata"
    assert rejected["noscore"]["rejected_by"] == "no_score" and rejected["noscore"]["score"] is None
    rej = read_table(str(tmp_path / "out" / "rejected")).to_pylist()
    assert sorted(r["rejected_by"] for r in rej) == sorted(
        ["no_metadata", "no_score", "duplicate_score", "duplicate_score", "duplicate_metadata"])
    assert next(r for r in rej if r["rejected_by"] == "duplicate_metadata")["generator"] == "mj"
    join = summary["join"]
    assert join["scores_without_metadata"] == 1 and join["metadata_without_score"] == 1
    assert join["duplicate_score_rows"] == 2 and join["duplicate_metadata_rows"] == 1
    assert join["renamed_metadata_columns"] == {"prompt": "meta_prompt"} and join["metadata_rows"] == 6
    assert summary["kept"] + summary["rejected"] == 9


def test_a_manifest_joins_as_metadata_by_the_scoring_jobs_ids(tmp_path):
    uris = ["images/x.jpg", "images/y.jpg"]
    scores = write_scores(tmp_path / "s", [
        {"image_id": stable_id(uris[0]), "uri": uris[0], "score": 3.0},
        {"image_id": "given-id", "uri": uris[1], "score": 2.0},
    ], keep=())
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"uri": uris[0], "prompt": "x"}) + "\n"
                        + json.dumps({"uri": uris[1], "id": "given-id", "prompt": "y"}) + "\n")
    kept, rejected, summary = run(tmp_path, scores, "--metadata", str(manifest), "--top-k", "1", "--per", "prompt")
    assert sorted(r["prompt"] for r in kept) == ["x", "y"] and not rejected
    assert summary["join"]["key"].startswith("derived")


def test_bad_options_fail_before_writing(tmp_path, capsys):
    scores = write_scores(tmp_path / "s", ROWS)
    assert run(tmp_path, scores, "--top-k", "1", "--per", "generator", expect_rc=2) is None
    assert "generator" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert run(tmp_path, scores, "--top-fraction", "1.5", expect_rc=2) is None
    meta = tmp_path / "meta.csv"
    meta.write_text("key,prompt\na1,x\n")
    assert run(tmp_path, scores, "--metadata", str(meta), expect_rc=2) is None
    assert "no column 'image_id'" in capsys.readouterr().err


def test_several_models_need_a_choice(tmp_path):
    rows = [{"image_id": "a", "score": 1.0, "model": "m1@aaa"}, {"image_id": "a", "score": 4.0, "model": "m2@bbb"},
            {"image_id": "b", "score": 2.0, "model": "m1@aaa"}]
    scores = write_scores(tmp_path / "s", rows)
    assert run(tmp_path, scores, "--min-score", "0", expect_rc=2) is None
    kept, rejected, summary = run(tmp_path, scores, "--model", "m1", "--top-k", "1")
    assert [(r["image_id"], r["score"]) for r in kept] == [("b", 2.0)] and set(rejected) == {"a"}
    assert summary["model"] == "m1@aaa" and summary["models_in_table"] == {"m1@aaa": 2, "m2@bbb": 1}


def test_a_rerun_replaces_the_previous_result(tmp_path):
    scores = write_scores(tmp_path / "s", ROWS)
    run(tmp_path, scores, "--min-score", "3", "--rows-per-file", "1")
    assert len(list((tmp_path / "out" / "kept").glob("*.parquet"))) == 3
    kept, rejected, _ = run(tmp_path, scores, "--min-score", "1")
    assert len(kept) == 6 and len(rejected) == 2
    with pytest.raises(CurationError):
        filter_job.run(filter_job.parse_args(["--scores", scores, "--output", str(tmp_path / "o"), "--per", "prompt"]))


def test_scores_and_metadata_on_s3(tmp_path, s3_server):
    """The filter reads and writes object storage through the same fsspec filesystems as the scoring job."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir("curation")
    local = write_scores(tmp_path / "s", ROWS)
    fs.put(f"{local}/part-0.parquet", "curation/scores/part-0.parquet")
    fs.pipe("curation/meta.jsonl", b"".join(
        json.dumps({"image_id": i, "generator": g}).encode() + b"\n" for i, g in [("a1", "sd"), ("b1", "mj"), ("c1", "sd")]))
    summary = filter_job.run(filter_job.parse_args([
        "--scores", "s3://curation/scores/", "--metadata", "s3://curation/meta.jsonl", "--output", "s3://curation/out",
        "--top-k", "1", "--per", "generator"]))
    kept = read_table("curation/out/kept", filesystem=fs).to_pylist()
    assert [(r["image_id"], r["generator"]) for r in sorted(kept, key=lambda r: r["image_id"])] == [("a1", "sd"), ("b1", "mj")]
    assert summary["rejected_by"] == {"no_metadata": 5, "top_k": 1}
    assert json.loads(fs.cat("curation/out/_summary.json"))["kept"] == 2
    assert not [p for p in fs.find("curation/out") if "/." in p]  # no temporary object left behind


def test_csv_metadata_ids_join_as_written(tmp_path):
    """A CSV manifest's ids 001, 1 and 01 stay three ids, each joined with its own score."""
    scores = write_scores(tmp_path / "s", [("001", 3.0, None), ("1", 2.0, None), ("01", 1.0, None)])
    (tmp_path / "m.csv").write_text("id,uri,tag\n001,a.jpg,x\n1,b.jpg,y\n01,c.jpg,z\n")
    kept, rejected, summary = run(tmp_path, scores, "--metadata", str(tmp_path / "m.csv"))
    assert {r["image_id"]: r["tag"] for r in kept} == {"001": "x", "1": "y", "01": "z"} and not rejected
