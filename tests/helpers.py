"""Shared by the job tests: manifests with bad rows, an S3-compatible server on 127.0.0.1."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "agiqa3k"


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
