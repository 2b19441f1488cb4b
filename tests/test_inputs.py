"""The scoring job's input kinds besides manifests (ma_agiqa.scoring.inputs): a folder or glob of images,
Parquet with image bytes, WebDataset tar shards; locally and on the moto S3 server, on a real local Ray with
tiny-random. Each kind keeps the job's contract: every row once (ok or error), repeats counted, resume."""
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, PngImagePlugin

from helpers import SAMPLE, read_table
from jobs import score
from ma_agiqa import locators
from ma_agiqa.manifests import ManifestError
from ma_agiqa.scoring.inputs import ParquetImages, WebDatasetShards, open_input
from ma_agiqa.scoring.plan import plan_input
from ma_agiqa.scoring.request import ScoreRequest
from ma_agiqa.sources import comfy_prompt, expand_braces, metadata_prompt, png_text

IMAGES = sorted((SAMPLE / "images").glob("*.jpg"))[:6]
BUCKET = "inputs-bucket"



@pytest.fixture(scope="module")
def bucket(s3_server):
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return BUCKET


def run_job(*argv) -> dict:
    return score.run(score.parse_args(["--model", "tiny-random", "--allow-untrained", "--batch-size", "4", *argv]))


def upload(local: Path, prefix: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(local), f"{BUCKET}/{prefix}", recursive=local.is_dir())
    return f"s3://{BUCKET}/{prefix}"


# -- making inputs -------------------------------------------------------------------------------------------
A1111 = "a red fox in the snow, highly detailed\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Seed: 1"
COMFY = {"3": {"class_type": "KSampler", "inputs": {"positive": ["6", 0], "negative": ["7", 0]}},
         "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse at dusk", "clip": ["4", 1]}},
         "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "watermark", "clip": ["4", 1]}}}


def png_with(path: Path, source: Path, **text) -> None:
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v, zip=(k == "prompt"))  # a zTXt chunk too
    Image.open(source).convert("RGB").resize((96, 96)).save(path, pnginfo=info)


def image_folder(root: Path) -> dict:
    """Images with a .txt sidecar, a .json sidecar, PNG metadata (Automatic1111, ComfyUI), no prompt, and a
    corrupt one; returns {id: expected prompt} (the corrupt one: None)."""
    (root / "sub").mkdir(parents=True)
    shutil.copy(IMAGES[0], root / "a.jpg")
    (root / "a.txt").write_text("a txt prompt\n")
    shutil.copy(IMAGES[1], root / "b.jpg")
    (root / "b.json").write_text(json.dumps({"caption": "a json caption", "seed": 3}))
    png_with(root / "sub" / "c.png", IMAGES[2], parameters=A1111)
    png_with(root / "sub" / "d.png", IMAGES[3], prompt=json.dumps(COMFY))
    shutil.copy(IMAGES[4], root / "e.jpg")
    (root / "bad.jpg").write_bytes(b"<html>not an image</html>")
    return {"a.jpg": "a txt prompt", "b.jpg": "a json caption", "sub/c.png": "a red fox in the snow, highly detailed",
            "sub/d.png": "a lighthouse at dusk", "e.jpg": None, "bad.jpg": None}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def shards(root: Path) -> dict:
    """Two good shards (a sample with a json key, one without an image, one with a corrupt image) and one
    truncated shard; returns {id: expected status}."""
    root.mkdir(parents=True)
    with tarfile.open(root / "00000.tar", "w") as tar:
        _add(tar, "s0.jpg", IMAGES[0].read_bytes())
        _add(tar, "s0.txt", b"a prompt from txt")
        _add(tar, "s1.jpg", IMAGES[1].read_bytes())
        _add(tar, "s1.json", json.dumps({"key": "uid-s1", "caption": "a caption from json"}).encode())
        _add(tar, "s2.txt", b"no image here")
    with tarfile.open(root / "00001.tar", "w") as tar:
        _add(tar, "t0.png", IMAGES[2].read_bytes()[:0] or _png(IMAGES[2]))
        _add(tar, "t1.jpg", b"\xff\xd8\xff garbage, not a jpeg")
        _add(tar, "t2.jpg", IMAGES[3].read_bytes())
    with tarfile.open(root / "00002.tar", "w") as tar:
        _add(tar, "u0.jpg", IMAGES[4].read_bytes())
        _add(tar, "u1.jpg", IMAGES[5].read_bytes())
    data = (root / "00002.tar").read_bytes()
    (root / "00002.tar").write_bytes(data[: 512 + len(IMAGES[4].read_bytes()) + 512 + 1000])  # u1 breaks off
    return {"00000/s0": "ok", "uid-s1": "ok", "00000/s2": "error", "00001/t0": "ok", "00001/t1": "error",
            "00001/t2": "ok", "00002/u0": "ok", "00002#unreadable": "error"}


def _png(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).save(buf, format="PNG")
    return buf.getvalue()


def hf_parquet(path: Path, binary: bool = False) -> list:
    """The Hugging Face layout (image: struct{bytes, path}), or a plain binary column; 2 rows a row group, one
    image twice, one row without bytes. Returns the rows' image bytes."""
    data = [p.read_bytes() for p in IMAGES[:4]] + [IMAGES[0].read_bytes(), None]
    cells = data if binary else [None if d is None else {"bytes": d, "path": f"{i}.jpg"} for i, d in enumerate(data)]
    table = pa.table({"image": cells, "prompt": [f"prompt {i}" for i in range(len(data))],
                      "name": [f"n{i}" for i in range(len(data))]})
    pq.write_table(table, path, row_group_size=2)
    return data


def digest(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()[:20]


# -- without Ray ---------------------------------------------------------------------------------------------
def test_prompts_from_png_metadata_and_brace_patterns(tmp_path):
    png_with(tmp_path / "a.png", IMAGES[0], parameters=A1111)
    png_with(tmp_path / "c.png", IMAGES[0], prompt=json.dumps(COMFY))
    with open(tmp_path / "a.png", "rb") as f:
        assert metadata_prompt(png_text(f)) == "a red fox in the snow, highly detailed"
    with open(tmp_path / "c.png", "rb") as f:  # a zTXt chunk, the positive branch of the sampler
        assert metadata_prompt(png_text(f)) == "a lighthouse at dusk"
    assert metadata_prompt({"parameters": "just a prompt\nSteps: 30, Seed: 2"}) == "just a prompt"
    assert metadata_prompt({"prompt": "plain text prompt"}) == "plain text prompt"
    linked = {**COMFY, "6": {"class_type": "CLIPTextEncode", "inputs": {"text": ["9", 0]}},
              "9": {"class_type": "String", "inputs": {"string": "from a string node"}}}
    assert comfy_prompt(linked) == "from a string node"
    with open(IMAGES[0], "rb") as f:
        assert png_text(f) == {}  # a JPEG: no chunks, no error
    assert expand_braces("s3://b/{00008..00011}.tar") == [f"s3://b/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("d/{a,b}/{1..2}.tar") == ["d/a/1.tar", "d/a/2.tar", "d/b/1.tar", "d/b/2.tar"]


def test_the_uri_picks_the_input_kind(tmp_path):
    def kind(uri, **kw):
        return type(open_input(ScoreRequest(manifest=str(uri), output=str(tmp_path / "o"), **kw))).__name__

    image_folder(tmp_path / "f")
    shards(tmp_path / "s")
    hf_parquet(tmp_path / "hf.parquet")
    assert kind(tmp_path / "f") == "ImageFolder"  # its .json is a sidecar, not a manifest
    assert kind(str(tmp_path / "f") + "/*.jpg") == "ImageFolder"
    (tmp_path / "f" / "manifest.jsonl").write_text('{"uri": "a.jpg"}\n')
    assert kind(tmp_path / "f") == "ManifestFiles"  # a manifest beside the images stays a manifest
    (tmp_path / "f" / "manifest.jsonl").unlink()
    assert kind(tmp_path / "s") == kind(tmp_path / "s" / "00000.tar") == kind(str(tmp_path / "s") + "/{00000..00001}.tar") \
        == "WebDatasetShards"
    assert kind(tmp_path / "hf.parquet", image_column="image") == "ParquetImages"
    (tmp_path / "f" / "captions.json").write_text(json.dumps({"a.jpg": "x"}))  # a dictionary is no sidecar
    with pytest.raises(ManifestError, match="not JSON Lines"):
        plan_input(open_input(ScoreRequest(manifest=str(tmp_path / "f"), output=str(tmp_path / "o"))), str(tmp_path / "o"))
    with pytest.raises(ManifestError, match="no column 'img'"):
        open_input(ScoreRequest(manifest=str(tmp_path / "hf.parquet"), output="o", image_column="img"))


def test_plans_give_ids_without_image_bytes_and_reads_give_the_same_rows(tmp_path):
    expected = shards(tmp_path / "s")
    source = WebDatasetShards.open(str(tmp_path / "s"))
    manifest = plan_input(source, str(tmp_path / "o"))
    assert manifest.ids.to_pylist() == list(expected)
    assert "_image_bytes" not in manifest.schema.names and source.in_tasks
    for unit, planned in zip(source.units, manifest.ids.chunks):
        read = source.read(unit)
        assert read["id"].to_pylist() == planned.to_pylist()
    data = hf_parquet(tmp_path / "hf.parquet")
    pq_source = ParquetImages.open(str(tmp_path / "hf.parquet"), "image", None)
    assert len(pq_source.units) == 3  # a read unit per row group
    pq_manifest = plan_input(pq_source, str(tmp_path / "o"))
    assert pq_manifest.ids.to_pylist()[:5] == [digest(d) for d in data[:5]] and pq_manifest.repeated == 1
    assert pq_manifest.tables is None  # the driver never holds these rows
    limited = plan_input(pq_source, str(tmp_path / "o"), limit=3)
    assert limited.rows == 3 and limited.file_rows() == [2, 1]


# -- on Ray --------------------------------------------------------------------------------------------------
def test_folder_parquet_and_shards_locally_with_resume(local_ray_s3, tmp_path):
    prompts = image_folder(tmp_path / "f")
    out = str(tmp_path / "folder-scores")
    summary = run_job("--images", str(tmp_path / "f"), "--prompt-from", "metadata", "--keep-columns", "prompt", "--output", out)
    assert summary["rows"] == summary["table_rows"] == len(prompts) and summary["errors"] == 1
    rows = {r["image_id"]: r for r in read_table(out).to_pylist()}
    assert {i: r["prompt"] for i, r in rows.items()} == prompts
    assert rows["bad.jpg"]["status"] == "error" and rows["bad.jpg"]["error"].startswith("not_image")
    assert rows["a.jpg"]["uri"] == str(tmp_path / "f" / "a.jpg")
    assert run_job("--images", str(tmp_path / "f"), "--prompt-from", "metadata", "--keep-columns", "prompt", "--output", out)["to_score"] == 0

    data = hf_parquet(tmp_path / "hf.parquet")
    pq_out = str(tmp_path / "pq-scores")
    args = ("--manifest", str(tmp_path / "hf.parquet"), "--image-column", "image", "--keep-columns", "prompt,name", "--output", pq_out)
    summary = run_job(*args)
    assert summary["manifest_rows"] == 6 and summary["repeated_ids"] == 1 and summary["rows"] == summary["table_rows"] == 5
    table = read_table(pq_out)
    assert not any(pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type) for f in table.schema)  # no bytes
    pq_rows = {r["name"]: r for r in table.to_pylist()}
    assert pq_rows["n0"]["image_id"] == digest(data[0]) and pq_rows["n0"]["uri"] == locators.parquet_cell(str(tmp_path / "hf.parquet"), "image", 0)
    assert pq_rows["n5"]["status"] == "error" and pq_rows["n5"]["error"].startswith("missing")
    # the same image scores the same from bytes in Parquet as from a file in a folder
    assert pq_rows["n0"]["score"] == pytest.approx(rows["a.jpg"]["score"], abs=1e-5)
    assert run_job(*args)["to_score"] == 0

    expected = shards(tmp_path / "s")
    wds_out = str(tmp_path / "wds-scores")
    args = ("--manifest", str(tmp_path / "s"), "--keep-columns", "prompt,caption,key", "--output", wds_out)
    summary = run_job(*args)
    assert summary["rows"] == summary["table_rows"] == len(expected)
    wds = {r["image_id"]: r for r in read_table(wds_out).to_pylist()}
    assert {i: r["status"] for i, r in wds.items()} == expected
    assert wds["00000/s2"]["error"].startswith("missing") and wds["00002#unreadable"]["error"].startswith("truncated")
    assert wds["00001/t1"]["error"].split(":")[0] in ("truncated", "not_image", "decode")
    assert wds["00000/s0"]["prompt"] == "a prompt from txt" and wds["uid-s1"]["caption"] == "a caption from json"
    assert wds["00000/s0"]["uri"] == locators.tar_member(str(tmp_path / "s" / "00000.tar"), "s0.jpg")
    assert wds["00000/s0"]["score"] == pytest.approx(rows["a.jpg"]["score"], abs=1e-5)
    again = run_job(*args)
    assert again["to_score"] == 0 and again["already_scored"] == len(expected)


def test_each_kind_on_s3(local_ray_s3, bucket, tmp_path):
    expected = shards(tmp_path / "s")
    prefix = upload(tmp_path / "s", "wds")
    out = f"s3://{BUCKET}/wds-scores"
    summary = run_job("--manifest", prefix + "/{00000..00002}.tar", "--output", out)
    assert summary["rows"] == summary["table_rows"] == len(expected)
    import s3fs

    fs = s3fs.S3FileSystem()
    scored = read_table(f"{BUCKET}/wds-scores", filesystem=fs)
    assert dict(zip(scored["image_id"].to_pylist(), scored["status"].to_pylist())) == expected
    assert locators.parse(scored.filter(pa.compute.equal(scored["image_id"], "uid-s1"))["uri"][0].as_py()).container == f"{prefix}/00000.tar"

    data = hf_parquet(tmp_path / "bin.parquet", binary=True)
    uri = upload(tmp_path / "bin.parquet", "hf/bin.parquet")
    args = ("--manifest", uri, "--image-column", "image", "--id-column", "name", "--output", f"s3://{BUCKET}/pq-scores")
    summary = run_job(*args)
    assert summary["rows"] == len(data) and summary["errors"] == 1 and summary["repeated_ids"] == 0
    assert run_job(*args)["to_score"] == 0

    image_folder(tmp_path / "f")
    folder = upload(tmp_path / "f", "folder")
    summary = run_job("--images", folder + "/*.jpg", "--keep-columns", "prompt", "--output", f"s3://{BUCKET}/folder-scores")
    assert summary["rows"] == 4  # a, b, e, bad (the glob leaves sub/ out)
    table = read_table(f"{BUCKET}/folder-scores", filesystem=fs)
    assert dict(zip(table["image_id"].to_pylist(), table["prompt"].to_pylist())) == {
        "a.jpg": "a txt prompt", "b.jpg": "a json caption", "e.jpg": None, "bad.jpg": None}


def test_a_samples_plain_image_member_wins_over_a_mask_whatever_the_tar_order(tmp_path):
    from ma_agiqa.sources import tar_samples

    def png(color):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), color).save(buf, "PNG")
        return buf.getvalue()

    noise = io.BytesIO()
    Image.frombytes("RGB", (64, 64), bytes(range(256)) * 48).save(noise, "PNG")  # a mask larger than the images
    members = [("a.mask.png", noise.getvalue()), ("a.jpg", png("red")), ("a.txt", b"a cat"),
               ("b.seg.png", png("blue")), ("c.png", png("green")), ("c.depth.png", png("white"))]
    shard = tmp_path / "000000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    samples = {s.key: s for s in tar_samples(str(shard), keep_images=True, max_bytes=1 << 20)}
    assert {k: s.image_member for k, s in samples.items()} == {"a": "a.jpg", "b": "b.seg.png", "c": "c.png"}
    assert samples["a"].image == dict(members)["a.jpg"] and samples["a"].txt == "a cat"
    assert samples["c"].image == dict(members)["c.png"] and not any(s.error for s in samples.values())
    # a too-large mask does not fail the sample whose plain image comes after it
    limit = len(png("red"))
    assert len(noise.getvalue()) > limit
    tight = {s.key: s for s in tar_samples(str(shard), keep_images=True, max_bytes=limit)}
    assert tight["a"].error is None and tight["a"].image_member == "a.jpg" and tight["a"].image == dict(members)["a.jpg"]
