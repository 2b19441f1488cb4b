"""Rewrite a score table's small parts into large ones, keeping exactly the current row per (image_id, model).

    python -m jobs.compact --table URI [--target-rows-per-file N] [--memory-limit 2GB]

Every scoring run adds parts, and retried rows leave superseded error rows behind; nightly runs would grow
the table into thousands of small files. Compaction writes the current rows (``schema.CURRENT_ROW_ORDER``)
into new parts, then deletes the parts it read. Each new part is published whole, and until the old ones are
gone a reader sees copies that the current-row rule collapses, so readers see the same current rows before,
during and after; a compaction that dies half-way changes nothing that readers see, and the next one
finishes the job. Parts a scoring run writes meanwhile are not touched.
"""
from __future__ import annotations

import argparse
import sys
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.cli import USER_ERRORS, run_and_report
from ma_agiqa.curation import scan
from ma_agiqa.score_table import current_rows_sql
from ma_agiqa.table_files import count_rows, duckdb_connection, part_uris, write_part_atomically


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.compact", description=__doc__.split("\n")[0])
    p.add_argument("--table", required=True, help="directory URI of the score table")
    p.add_argument("--target-rows-per-file", type=int, default=1_000_000, help="rows per new part")
    p.add_argument("--memory-limit", default=None, help="DuckDB's memory limit while ranking rows, e.g. 2GB")
    return p.parse_args(argv)


def current_positions(parts: list[str], memory_limit: str | None = None) -> pa.Table:
    """(_file, _row) of each current row. Only the key and ordering columns are read here; the rows
    themselves are copied by pyarrow, so every column keeps its exact type (float16 features included)."""
    relation = scan(parts, row_order=True)
    sql = current_rows_sql(relation, columns="_file, _row", tiebreak="_file, _row") + " ORDER BY _file, _row"
    return duckdb_connection(parts, memory_limit=memory_limit).execute(sql).to_arrow_table()


def rows_by_file(keep: pa.Table) -> dict[str, np.ndarray]:
    """{part: its current rows' positions, ascending}, from positions sorted by file then row."""
    files = keep["_file"].to_numpy(zero_copy_only=False)
    rows = keep["_row"].to_numpy()
    names, starts = np.unique(files, return_index=True)
    ends = list(starts[1:]) + [len(files)]
    return {str(name): rows[a:b] for name, a, b in zip(names, starts, ends)}


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order, nulls where it lacks one."""
    return pa.table({f.name: table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                     for f in schema}, schema=schema)


def compact(table_uri: str, target_rows: int = 1_000_000, memory_limit: str | None = None) -> dict:
    if target_rows < 1:
        raise ValueError(f"--target-rows-per-file must be at least 1, got {target_rows}")
    parts = part_uris(table_uri)
    rows_before = count_rows(table_uri)
    summary = {"table": table_uri, "parts_before": len(parts), "rows_before": rows_before}
    if not parts:
        return {**summary, "parts_after": 0, "rows_after": 0, "superseded_removed": 0}
    keep = current_positions(parts, memory_limit)
    if len(parts) == 1 and len(keep) == rows_before:
        return {**summary, "parts_after": 1, "rows_after": rows_before, "superseded_removed": 0, "note": "already compact"}
    by_file = rows_by_file(keep)
    run = uuid.uuid4().hex[:12]
    pending: list[pa.Table] = []
    written, n_pending = [], 0

    fs, _ = fsspec.core.url_to_fs(table_uri)
    schemas = []
    for part in by_file:
        with fs.open(part, "rb") as f:
            schemas.append(pq.read_schema(f))
    schema = pa.unify_schemas(schemas, promote_options="permissive")  # every new part gets every column

    def flush():
        nonlocal pending, n_pending
        if pending:
            out = conform(pa.concat_tables(pending, promote_options="permissive"), schema)
            for start in range(0, len(out), target_rows):
                name = f"part-compact-{run}-{len(written):05d}.parquet"
                write_part_atomically(out.slice(start, target_rows), table_uri, name)
                written.append(name)
        pending, n_pending = [], 0

    for part in parts:
        rows = by_file.get(part)
        if rows is None or not len(rows):
            continue
        with fs.open(part, "rb") as f:
            pending.append(pq.read_table(f).take(pa.array(rows)))
        n_pending += len(rows)
        if n_pending >= target_rows:
            flush()
    flush()
    for part in parts:  # only now: until here a reader sees the old parts (and copies it collapses)
        fs.rm(part)
    return {**summary, "parts_after": len(written), "rows_after": len(keep), "superseded_removed": rows_before - len(keep)}


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_and_report(
        args, lambda a: compact(a.table, a.target_rows_per_file, a.memory_limit),
        lambda s, a: f"compacted {a.table}: {s['parts_before']} parts, {s['rows_before']} rows -> {s['parts_after']} parts, "
                     f"{s['rows_after']} rows", errors=(*USER_ERRORS, ValueError))


if __name__ == "__main__":
    sys.exit(main())
