"""The scoring job on a real local Ray (2 CPUs) with tiny-random: local files and an S3-compatible server."""
import json
import shutil
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import REPO, SAMPLE, bad_files, read_table, s3_bucket, sample_rows
from jobs import score
from ma_agiqa.images import decode_image
from ma_agiqa.scoring import JobConfigError
from ma_agiqa.scoring.layout import fits, plan_layout, wait_for_cluster
from ma_agiqa.scoring.run import ROWS_PER_BLOCK, rows_per_block
from ma_agiqa.schema import validate_score_table

EXPERTS = ["coherence", "semantic", "quality"]



def run_job(*argv) -> dict:
    return score.run(score.parse_args(["--model", "tiny-random", "--allow-untrained", *argv]))  # tiny-random's heads are random


def test_sample_manifest_scores_every_row_like_the_library(local_ray_s3, tmp_path, tiny_model):
    out = str(tmp_path / "scores")
    summary = run_job("--manifest", str(SAMPLE / "manifest.jsonl"), "--image-root", str(SAMPLE), "--output", out,
                      "--keep-columns", "prompt,generator", "--keep-features", "--batch-size", "8")
    rows = sample_rows()
    assert summary["rows"] == summary["ok"] == len(rows) == summary["table_rows"]
    table = read_table(out)
    validate_score_table(table, EXPERTS)
    assert sorted(table["image_id"].to_pylist()) == sorted(r["id"] for r in rows)
    assert table.schema.field("feature_coherence").type == pa.list_(pa.float16(), 64)
    assert table["model"][0].as_py() == tiny_model.model_id
    by_id = {r["image_id"]: r for r in table.to_pylist()}
    assert by_id["AttnGAN_normal_001"]["prompt"] == "a tray of sushi"
    # the job's scores are the library's scores for the same images
    names = ["AttnGAN_normal_001", "midjourney_normal_001", "sd1.5_normal_001"]
    images = [decode_image((SAMPLE / "images" / f"{n}.jpg").read_bytes()) for n in names]
    expected = tiny_model.score_images(images)
    for n, s, g in zip(names, expected["score"], expected["gates"]):
        assert by_id[n]["score"] == pytest.approx(float(s), abs=1e-4)
        assert by_id[n]["gate_quality"] == pytest.approx(float(g[2]), abs=1e-4)
    saved = json.loads((tmp_path / "scores" / "_summary.json").read_text())
    assert saved["rows"] == len(rows) and saved["images_per_s"] > 0


def test_bad_rows_become_error_rows_and_nothing_is_lost(local_ray_s3, tmp_path):
    root = tmp_path / "images"
    shutil.copytree(SAMPLE / "images", root)
    expected_bad = bad_files(root)
    good = [{"id": r["id"], "uri": r["uri"].removeprefix("images/"), "prompt": r["prompt"]} for r in sample_rows()]
    bad = [{"id": f"bad-{i}", "uri": uri, "prompt": None} for i, uri in enumerate(expected_bad)]
    bad.append({"id": "bad-null", "uri": None, "prompt": "no uri at all"})
    rows = good[:30] + bad + good[30:]  # ~20 % bad, in the middle of the manifest
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    out = str(tmp_path / "scores")
    summary = run_job("--manifest", str(tmp_path / "manifest.parquet"), "--image-root", str(root), "--output", out, "--batch-size", "8")
    table = read_table(out)
    validate_score_table(table, EXPERTS)
    assert table.num_rows == len(rows) and len(set(table["image_id"].to_pylist())) == len(rows)
    by_id = {r["image_id"]: r for r in table.to_pylist()}
    for i, (uri, kind) in enumerate(expected_bad.items()):
        row = by_id[f"bad-{i}"]
        assert row["status"] == "error" and row["error"].startswith(kind + ":"), (uri, row["error"])
        assert row["score"] is None and row["gate_quality"] is None
    assert by_id["bad-null"]["error"].startswith("missing_uri:")
    assert all(by_id[r["id"]]["status"] == "ok" for r in good)
    assert summary["errors"] == len(bad) and summary["ok"] == len(good)
    assert summary["errors_by_kind"] == {**{k: 1 for k in expected_bad.values()}, "missing_uri": 1}


def test_rerun_scores_only_what_is_missing(local_ray_s3, tmp_path):
    args = ["--manifest", str(SAMPLE / "manifest.jsonl"), "--image-root", str(SAMPLE), "--output", str(tmp_path / "s"), "--batch-size", "8"]
    first = run_job(*args, "--limit", "12")
    assert first["rows"] == 12
    second = run_job(*args)
    assert second["already_scored"] == 12 and second["rows"] == 28
    third = run_job(*args)
    assert third["to_score"] == 0 and third["rows"] == 0
    table = read_table(str(tmp_path / "s"))
    ids = table["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 40
    # a first run names its model from the rows it wrote, a resume works the id out before scoring: the same
    assert first["model_id"] == second["model_id"] == third["model_id"] == table["model"][0].as_py()


def test_the_driver_plans_a_job_without_torch(tmp_path):
    """Planning a job (manifest, model config) and a checkpoint's model id read files only: torch, timm and
    transformers stay out of the driver, whose seconds of imports would slow Ray's start on the same cores."""
    from ma_agiqa.model import create_model

    model = create_model("tiny-random", with_semantic=False)
    model.save_pretrained(tmp_path / "ckpt")
    code = (
        "import json, sys\n"
        "from jobs import score\n"
        "from ma_agiqa.scoring.plan import plan_request\n"
        f"args = score.parse_args(['--manifest', {str(SAMPLE / 'manifest.jsonl')!r}, '--output', 'unused', '--model', {str(tmp_path / 'ckpt')!r},\n"
        "                          '--allow-untrained'])\n"
        "model, manifest, spec = plan_request(score.request_from(args, args.manifest, args.output))\n"
        "print(json.dumps({'experts': spec.experts, 'id': model.model_id,\n"
        "                  'heavy': [m for m in ('torch', 'timm', 'transformers') if m in sys.modules]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    planned = json.loads(out.stdout)
    assert planned == {"experts": EXPERTS, "id": model.model_id, "heavy": []}


def test_separate_stages_score_like_the_fused_default(local_ray_s3, tmp_path):
    """--fuse off is the layout a GPU cluster gets (decode tasks, then one actor pool per model stage); on
    this CPU-only cluster the default runs decoding and both model stages in one pool. Same rows, same scores."""
    args = ["--manifest", str(SAMPLE / "manifest.jsonl"), "--image-root", str(SAMPLE), "--batch-size", "8", "--limit", "16"]
    fused = run_job(*args, "--output", str(tmp_path / "fused"))
    separate = run_job(*args, "--output", str(tmp_path / "separate"), "--fuse", "off", "--quality-actors", "1")
    assert (fused["model_stages"], fused["decode"]) == ("fused", "in the model actors")
    assert (separate["model_stages"], separate["decode"]) == ("separate", "tasks")
    scores = [{r["image_id"]: r["score"] for r in read_table(str(tmp_path / d)).to_pylist()} for d in ("fused", "separate")]
    assert len(scores[0]) == 16 and scores[0].keys() == scores[1].keys()
    for image_id, value in scores[0].items():
        assert scores[1][image_id] == pytest.approx(value, abs=1e-4)


def test_a_bad_manifest_fails_before_any_model_work(tmp_path, capsys):
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "m.parquet")
    assert score.main(["--manifest", str(tmp_path / "m.parquet"), "--output", str(tmp_path / "o")]) == 2
    assert "no 'uri' column" in capsys.readouterr().err
    assert score.main(["--manifest", str(tmp_path / "nope.csv"), "--output", str(tmp_path / "o")]) == 2
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert score.main(["--manifest", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o")]) == 2
    assert "line 1: malformed JSON" in capsys.readouterr().err
    args = ["--manifest", str(SAMPLE / "manifest.jsonl"), "--output", str(tmp_path / "o"), "--keep-columns", "seed"]
    assert score.main(args) == 2
    assert "lacks" in capsys.readouterr().err
    args = ["--manifest", str(SAMPLE / "manifest.jsonl"), "--output", str(tmp_path / "o"), "--model", "no-such-model"]
    assert score.main(args) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_s3_manifest_and_images(local_ray_s3, s3_server, tmp_path):
    rows = sample_rows()[:10]
    fs = s3_bucket(s3_server, "corpus", {f"imgs/{r['uri'].removeprefix('images/')}": (SAMPLE / r["uri"]).read_bytes()
                                         for r in rows})
    manifest = pa.Table.from_pylist(
        [{"uri": f"s3://corpus/imgs/{r['uri'].removeprefix('images/')}", "prompt": r["prompt"]} for r in rows]
        + [{"uri": "s3://corpus/imgs/missing.jpg", "prompt": "gone"}]
    )
    with fs.open("corpus/manifests/part-0.parquet", "wb") as f:
        pq.write_table(manifest, f)
    first = run_job("--manifest", "s3://corpus/manifests/", "--output", "s3://corpus/scores", "--keep-columns", "prompt",
                    "--limit", "4", "--rows-per-file", "2")
    assert first["table_rows"] == 4
    # the resumed run lists the table at its start; its count comes from what is there at its end
    summary = run_job("--manifest", "s3://corpus/manifests/", "--output", "s3://corpus/scores", "--keep-columns", "prompt",
                      "--rows-per-file", "2")
    assert summary["rows"] == 7 and summary["ok"] == 6 and summary["errors_by_kind"] == {"missing": 1}
    assert summary["table_rows"] == 11
    table = read_table("corpus/scores", filesystem=fs)
    validate_score_table(table, EXPERTS)
    assert table.num_rows == 11
    assert fs.exists("corpus/scores/_summary.json")
    # credentials never reach the outputs
    assert "testing-secret" not in fs.cat("corpus/scores/_summary.json").decode()


def test_layouts_leave_room_for_decoding_and_follow_the_cluster(local_ray_s3):
    def layout(argv, resources):
        args = score.parse_args(["--manifest", "m", "--output", "o", *argv])
        return plan_layout(score.request_from(args, args.manifest, args.output), True, resources)

    cpu2 = layout(["--quality-actors", "2", "--fuse", "off"], {"CPU": 2})
    assert (cpu2.semantic_actors, cpu2.quality_actors, cpu2.cpus) == (1, 2, pytest.approx(1 / 3))  # 1 CPU left for tasks
    assert fits(cpu2.bundles(), [{"CPU": 2}]) and not fits(cpu2.bundles(), [{"CPU": 1.5}])
    fused = layout([], {"CPU": 2})  # no GPU: the MLLM lives in the quality actors, one per CPU
    assert (fused.fused, fused.semantic_actors, fused.quality_actors, fused.cpus) == (True, 0, 2, 0.5)
    assert layout([], {"CPU": 64}).quality_actors == 8
    gpu8 = layout([], {"CPU": 64, "GPU": 8})  # GPUs: separate stages, 3/4 of the GPUs to the MLLM
    assert (gpu8.fused, gpu8.gpus, gpu8.semantic_actors, gpu8.quality_actors, gpu8.cpus) == (False, 1.0, 6, 2, 1.0)
    gpu1 = layout([], {"CPU": 8, "GPU": 1})
    assert (gpu1.gpus, gpu1.semantic_actors, gpu1.quality_actors) == (0.5, 1, 1) and fits(gpu1.bundles(), [{"CPU": 8, "GPU": 1}])
    # a cluster that scales from zero: explicit settings are taken as given, not sized to what is there now
    zero = layout(["--gpus-per-actor", "0.5", "--semantic-actors", "3", "--quality-actors", "1"], {"CPU": 0})
    assert (zero.gpus, zero.semantic_actors, zero.quality_actors, zero.fused) == (0.5, 3, 1, False)
    assert not fits(zero.bundles(), [{"CPU": 0}])
    assert fits(zero.bundles(), [{"CPU": 0}, {"CPU": 8, "GPU": 2}])
    explicit = layout(["--cpus-per-actor", "1"], {"CPU": 2})  # 2 actors x 1 CPU + 1 for tasks on a 2-CPU Ray
    with pytest.raises(JobConfigError, match="do not fit"):
        wait_for_cluster(explicit, local=True, timeout_s=1)


def test_blocks_hold_thousands_of_rows_but_feed_every_actor():
    """10 million rows are ~2,500 blocks (tasks per stage), not 625,000 batches of 16; a small manifest still
    gives each model actor several blocks."""
    for rows in (10_000_000, 1_000_000, 100_000):
        block = rows_per_block(rows, 16, 4)
        assert block == ROWS_PER_BLOCK == 4096 and -(-rows // block) <= rows // 4000
    assert rows_per_block(40, 16, 2) == 16  # 3 blocks for 2 actors
    assert rows_per_block(10_000, 16, 2) == 1250  # 8 blocks: four per actor
    assert rows_per_block(5, 16, 2) == 16  # never below a model batch
