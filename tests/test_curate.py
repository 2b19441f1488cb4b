"""jobs.curate on a real local Ray: the second run in a row scores nothing; a grown manifest scores only its
new rows."""
import json
import os
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from helpers import SAMPLE, read_table, sample_rows
from jobs import curate


def write_manifest(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_curate_twice_scores_nothing_then_only_new_rows(local_ray, tmp_path):
    from ma_agiqa import create_model

    ckpt = tmp_path / "ckpt"
    create_model("tiny-random").save_pretrained(ckpt)
    rows = sample_rows()
    first = rows[:10] + [{"id": "broken", "uri": "images/nope.jpg", "prompt": "x", "generator": "AttnGAN_normal"}]
    manifest = tmp_path / "manifest.jsonl"
    scores, out = str(tmp_path / "scores"), str(tmp_path / "curated")
    argv = ["--manifest", str(manifest), "--scores", scores, "--output", out, "--model", str(ckpt), "--allow-untrained",
            "--image-root", str(SAMPLE), "--drop-errors", "--top-k", "2", "--per", "generator", "--batch-size", "4"]

    write_manifest(manifest, first)
    s1 = curate.run(curate.parse_args(argv))
    assert s1["scoring"]["to_score"] == 11 and s1["scoring"]["errors"] == 1
    table = read_table(scores).to_pylist()
    best = {}
    for r in sorted((r for r in table if r["status"] == "ok"), key=lambda r: (-r["score"], r["image_id"])):
        best.setdefault(r["uri"].split("/")[-1].rsplit("_", 1)[0], []).append(r["image_id"])
    expected = sorted(i for ids in best.values() for i in ids[:2])
    kept = read_table(f"{out}/kept").to_pylist()
    assert sorted(r["image_id"] for r in kept) == expected
    assert {r["prompt"] for r in kept} <= {r["prompt"] for r in first}  # the manifest's metadata is joined
    assert s1["rejected_by"]["error"] == 1 and s1["kept"] + s1["rejected"] == 11

    # Second run: the MLLM's weights are unreadable (zeroed in place, their mtime kept: the model id, which
    # covers their content as hashed once per node, cached by path, size and mtime, is unchanged), so any model
    # load would fail the job; nothing is scored.
    for f in (ckpt / "semantic").glob("*.safetensors"):
        st = f.stat()
        f.write_bytes(b"\0" * st.st_size)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    s2 = curate.run(curate.parse_args(argv))
    assert s2["scoring"]["to_score"] == 0 and s2["scoring"]["already_scored"] == 11
    assert sorted(r["image_id"] for r in read_table(f"{out}/kept").to_pylist()) == expected
    assert len(read_table(scores)) == 11

    # A grown manifest: only its three new rows are scored, then the whole manifest is curated again.
    shutil.rmtree(ckpt)
    create_model("tiny-random").save_pretrained(ckpt)
    write_manifest(manifest, first + rows[10:13])
    s3 = curate.run(curate.parse_args(argv + ["--compact"]))
    assert s3["scoring"]["to_score"] == 3 and len(read_table(scores)) == 14
    assert s3["compaction"]["parts_after"] == 1 and s3["compaction"]["rows_after"] == 14
    assert s3["kept"] + s3["rejected"] == 14


def test_resume_counts_only_the_same_models_rows(tmp_path):
    """Rows another model scored do not count as done: the table collects both models' scores."""
    from datetime import datetime, timezone

    from ma_agiqa.score_table import resume_plan

    out = tmp_path / "scores"
    out.mkdir()
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    pq.write_table(pa.table({"image_id": ["a", "b", "a"], "model": ["m@1", "m@1", "n@2"], "status": ["ok", "ok", "ok"],
                             "error": pa.array([None] * 3, pa.string()), "scored_at": [t] * 3,
                             "uri": pa.array([None] * 3, pa.string())}), out / "part-x.parquet")
    ids = pa.array(["a", "b", "c"])
    assert resume_plan(str(out), "m@1", ids)[0].tolist() == [True, True, False]
    assert resume_plan(str(out), "n@2", ids)[0].tolist() == [True, False, False]
    assert resume_plan(str(tmp_path / "none"), "m@1", ids)[0].tolist() == [False] * 3
