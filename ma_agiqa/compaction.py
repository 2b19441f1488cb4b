"""Compaction of a score table: its small parts rewritten into large ones holding exactly the current row per
(image_id, model) (``jobs.compact`` is its command line).

Every scoring run adds parts, and retried rows leave superseded error rows behind; nightly runs would grow
the table into thousands of small files. Compaction writes the current rows (``schema.CURRENT_ROW_ORDER``)
into new parts, then deletes the parts it read. Each new part is published whole, and until the old ones are
gone a reader sees copies that the current-row rule collapses, so readers see the same current rows before,
during and after; a compaction that dies half-way changes nothing that readers see, and the next one
finishes the job. Parts a scoring run writes meanwhile are not touched. It streams: DuckDB ranks the rows by
their key columns alone (spilling to disk past ``memory_limit``), and the current rows are copied a source row
group at a time into new parts closed at a byte target, so memory stays bounded whatever the table's size.
"""
from __future__ import annotations

import os
import posixpath
import tempfile
import uuid

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .curation import scan
from .score_table import current_rows_sql
from .table_files import count_rows, duckdb_connection, part_uris
from .uris import is_remote, redact, redact_text

DEFAULT_TARGET_BYTES = 512 << 20
POSITIONS_BATCH = 1 << 20  # (_file, _row) pairs handed over by DuckDB at a time


def current_positions(parts: list[str], memory_limit: str | None = None):
    """(part, positions of its current rows, ascending) for each part holding any, in part order, streamed
    from DuckDB (which ranks them, spilling past ``memory_limit``): only the key and ordering columns are
    read here, and one part's positions are held at a time. The rows themselves are copied by pyarrow, so
    every column keeps its exact type (float16 features included)."""
    relation = scan(parts, row_order=True)
    sql = current_rows_sql(relation, columns="_file, _row", tiebreak="_file, _row") + " ORDER BY _file, _row"
    con = duckdb_connection(parts, memory_limit=memory_limit)
    reader = con.sql(sql).to_arrow_reader(POSITIONS_BATCH)
    current, rows = None, []
    for batch in reader:
        files = batch.column("_file").to_numpy(zero_copy_only=False)
        positions = batch.column("_row").to_numpy()
        bounds = [0, *(np.flatnonzero(files[1:] != files[:-1]) + 1), len(files)]  # sorted: one run per part
        for a, b in zip(bounds[:-1], bounds[1:]):
            name = str(files[a])
            if name != current:
                if current is not None:
                    yield current, np.concatenate(rows)
                current, rows = name, []
            rows.append(positions[a:b])
    if current is not None:
        yield current, np.concatenate(rows)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order, nulls where it lacks one."""
    return pa.table({f.name: table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
                     for f in schema}, schema=schema)


class PartWriter:
    """New parts written as a stream of row groups, each published whole once it holds ``target_bytes`` (or
    ``target_rows``): on a local disk a hidden file renamed into place, on an object store a local temporary
    file uploaded in one go (published when the upload completes). Memory: one row group."""

    def __init__(self, table_uri: str, schema: pa.Schema, target_rows: int, target_bytes: int):
        self.fs, self.root = fsspec.core.url_to_fs(table_uri)
        self.remote = is_remote(table_uri)
        self.schema, self.target_rows, self.target_bytes = schema, target_rows, target_bytes
        self.run = uuid.uuid4().hex[:12]
        self.written: list[str] = []
        self.writer = self.file = self.path = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        while len(table):
            if self.writer is None:
                self._open()
            take = table.slice(0, self.target_rows - self.rows)
            self.writer.write_table(conform(take, self.schema))
            self.rows += len(take)
            table = table.slice(len(take))
            if self.rows >= self.target_rows or self.file.tell() >= self.target_bytes:
                self._publish()

    def close(self) -> list[str]:
        if self.writer is not None:
            self._publish()
        return self.written

    def _open(self):
        name = f"part-compact-{self.run}-{len(self.written):05d}.parquet"
        if self.remote:
            self.path = tempfile.mkstemp(prefix=".compact-", suffix=".parquet")[1]
        else:
            self.fs.makedirs(self.root, exist_ok=True)
            self.path = posixpath.join(self.root, f".tmp-{uuid.uuid4().hex}-{name}")
        self.name, self.file = name, open(self.path, "wb")
        self.writer = pq.ParquetWriter(self.file, self.schema, compression="zstd")
        self.rows = 0

    def _publish(self):
        self.writer.close()
        self.file.close()
        final = posixpath.join(self.root, self.name)
        try:
            if self.remote:
                self.fs.put_file(self.path, final)
            else:
                os.replace(self.path, final)
        finally:
            if os.path.exists(self.path):
                os.remove(self.path)
        self.written.append(self.name)
        self.writer = self.file = None


def compact(table_uri: str, target_rows: int = 1_000_000, memory_limit: str | None = None,
            target_bytes: int = DEFAULT_TARGET_BYTES) -> dict:
    if target_rows < 1:
        raise ValueError(f"--target-rows-per-file must be at least 1, got {target_rows}")
    if target_bytes < 1:
        raise ValueError(f"--target-bytes-per-file must be at least 1, got {target_bytes}")
    fs, path = fsspec.core.url_to_fs(table_uri)
    try:
        is_dir = fs.isdir(path)
    except Exception as e:  # noqa: BLE001 - an endpoint that does not answer
        raise ValueError(f"--table {redact(table_uri)} cannot be reached: {type(e).__name__}: {redact_text(str(e))[:200]}") from None
    parts = part_uris(table_uri) if is_dir else []
    if not parts:  # a typo in a scheduled compaction must not pass for a compacted table
        raise ValueError(f"--table {redact(table_uri)} holds no score table (no part files"
                         f"{'' if is_dir else '; no such directory'})")
    rows_before = count_rows(table_uri)
    summary = {"table": table_uri, "parts_before": len(parts), "rows_before": rows_before}
    if len(parts) == 1:
        current = duckdb_connection(parts, memory_limit=memory_limit).execute(
            f"SELECT count(*) FROM ({current_rows_sql(scan(parts))})").fetchone()[0]
        if current == rows_before:
            return {**summary, "parts_after": 1, "rows_after": rows_before, "superseded_removed": 0, "note": "already compact"}

    fs, _ = fsspec.core.url_to_fs(table_uri)
    schemas = []
    for part in parts:
        with fs.open(part, "rb") as f:
            schemas.append(pq.read_schema(f))
    schema = pa.unify_schemas(schemas, promote_options="permissive")  # every new part gets every column

    out, kept = PartWriter(table_uri, schema, target_rows, target_bytes), 0
    for part, rows in current_positions(parts, memory_limit):
        with fs.open(part, "rb") as f:
            source, start = pq.ParquetFile(f), 0
            for group in range(source.num_row_groups):  # a row group at a time: a large part never whole in memory
                n = source.metadata.row_group(group).num_rows
                lo, hi = np.searchsorted(rows, [start, start + n])
                if hi > lo:
                    out.write(source.read_row_group(group).take(pa.array(rows[lo:hi] - start)))
                start += n
        kept += len(rows)
    written = out.close()
    for part in parts:  # only now: until here a reader sees the old parts (and copies it collapses)
        fs.rm(part)
    return {**summary, "parts_after": len(written), "rows_after": kept, "superseded_removed": rows_before - kept}
