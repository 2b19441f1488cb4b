"""Shared by the job tests: manifests with bad rows, an S3-compatible server on 127.0.0.1."""
from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.dataset as pads
from PIL import Image

from ma_agiqa.schema import score_schema

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
