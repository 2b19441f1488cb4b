"""jobs.compact: exactly the current row per (image_id, model), the same rows for readers before, during
and after, on a table of many parts."""
from datetime import timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from helpers import T0, read_table, write_scores
from jobs import compact as compact_cli
from ma_agiqa import compaction as compact
from ma_agiqa.score_table import read_scores


def many_parts(root):
    """Six parts: two models, a retried error row superseded by its ok row, a part written twice (a copy),
    an error row that stays current, and float16 features that must survive the copy."""
    write_scores(root, [("a", 3.0, "cat"), ("b", None, "dog"), ("c", None, "owl")])
    (root / "part-0.parquet").rename(root / "part-run1.parquet")
    write_scores(root, [{"image_id": "b", "score": 2.0, "scored_at": T0 + timedelta(hours=1)}])
    (root / "part-0.parquet").rename(root / "part-run2.parquet")
    write_scores(root, [("a", 1.0, "cat"), ("d", 4.0, "fox")], model="other@1")
    (root / "part-0.parquet").rename(root / "part-other.parquet")
    (root / "part-copy.parquet").write_bytes((root / "part-other.parquet").read_bytes())
    for i in range(2):
        write_scores(root, [(f"e{i}", 1.5 + i, "eel")])
        (root / "part-0.parquet").rename(root / f"part-e{i}.parquet")
    feats = pa.table({"image_id": ["f"], "uri": ["images/f.jpg"], "score": pa.array([2.5], pa.float32()),
                      "status": ["ok"], "error": pa.array([None], pa.string()), "model": ["tiny@1"],
                      "scored_at": pa.array([T0], pa.timestamp("us", tz="UTC")),
                      "feature_coherence": pa.FixedSizeListArray.from_arrays(pa.array([0.5, -1.0], pa.float16()), 2)})
    pq.write_table(feats, root / "part-feat.parquet")
    return root


def test_compaction_keeps_exactly_the_current_rows(tmp_path):
    root = many_parts(tmp_path / "scores")
    before = read_scores(str(root))
    summary = compact.compact(str(root), target_rows=4)
    after_raw = read_table(str(root))
    assert summary["parts_before"] == 7 and summary["rows_before"] == 11
    assert summary["rows_after"] == after_raw.num_rows == before.num_rows == 8 and summary["superseded_removed"] == 3
    assert summary["parts_after"] == len(list(root.glob("part-*.parquet"))) == 2
    keys = list(zip(after_raw["image_id"].to_pylist(), after_raw["model"].to_pylist()))
    assert len(keys) == len(set(keys))  # one row per (image_id, model), physically
    assert read_scores(str(root)).to_pylist() == before.to_pylist()
    b = [r for r in after_raw.to_pylist() if r["image_id"] == "b"][0]
    assert b["status"] == "ok" and b["score"] == 2.0 and [r["error"] for r in before.to_pylist() if r["image_id"] == "c"][0]
    assert after_raw.schema.field("feature_coherence").type == pa.list_(pa.float16(), 2)
    assert compact.compact(str(root), target_rows=100)["parts_after"] == 1  # again: everything in one part
    assert compact.compact(str(root))["note"] == "already compact"


def test_a_compaction_that_dies_changes_nothing_readers_see(tmp_path, monkeypatch):
    root = many_parts(tmp_path / "scores")
    before = read_scores(str(root)).to_pylist()
    import fsspec.implementations.local as local

    def dies(self, path, *a, **kw):
        raise OSError("killed")

    monkeypatch.setattr(local.LocalFileSystem, "rm", dies)
    with pytest.raises(OSError):
        compact.compact(str(root), target_rows=3)
    assert list(root.glob("part-compact-*.parquet")) and (root / "part-run1.parquet").exists()  # new parts and old
    assert read_scores(str(root)).to_pylist() == before
    monkeypatch.undo()
    compact.compact(str(root))
    assert read_scores(str(root)).to_pylist() == before and read_table(str(root)).num_rows == len(before)


def test_the_command_line(tmp_path, capsys):
    root = many_parts(tmp_path / "scores")
    assert compact_cli.main(["--table", str(root), "--target-rows-per-file", "100"]) == 0
    assert "-> 1 parts, 8 rows" in capsys.readouterr().out
    assert compact_cli.main(["--table", str(root), "--target-rows-per-file", "0"]) == 2


def test_compaction_streams_into_parts_of_a_byte_target(tmp_path):
    """Row groups streamed into parts closed at a byte target: a small target gives several parts, the current
    rows unchanged, each part near the target (one row group past it at most)."""
    import numpy as np

    root = tmp_path / "scores"
    for p in range(4):  # four parts of 500 rows, each source part in row groups of 100
        ids = [f"i{p}-{k}" for k in range(500)]
        write_scores(root, [(i, float(k % 7), "x" * 40) for k, i in enumerate(ids)])
        table = pq.read_table(root / "part-0.parquet")
        (root / "part-0.parquet").unlink()
        pq.write_table(table, root / f"part-r{p}.parquet", row_group_size=100)
    write_scores(root, [{"image_id": "i0-1", "score": 6.5, "prompt": "x", "scored_at": T0 + timedelta(hours=1)}])  # supersedes one row
    (root / "part-0.parquet").rename(root / "part-9.parquet")
    before = read_scores(str(root))
    summary = compact.compact(str(root), target_rows=10**6, target_bytes=8_000)
    parts = sorted(root.glob("part-*.parquet"))
    assert summary["rows_after"] == before.num_rows == 2000 and summary["superseded_removed"] == 1
    assert summary["parts_after"] == len(parts) > 2
    assert read_scores(str(root)).to_pylist() == before.to_pylist()
    assert read_table(str(root)).num_rows == before.num_rows
    sizes = np.array([p.stat().st_size for p in parts])
    assert (sizes[:-1] >= 8_000).all()  # closed at the target, not before
    assert compact_cli.main(["--table", str(root), "--target-bytes-per-file", "1GB", "--target-rows-per-file", "5000"]) == 0
    assert len(list(root.glob("part-*.parquet"))) == 1 and read_scores(str(root)).to_pylist() == before.to_pylist()
    assert compact_cli.parse_bytes("2MiB") == 2 << 20 and compact_cli.parse_bytes("512MB") == 512 * 10**6
