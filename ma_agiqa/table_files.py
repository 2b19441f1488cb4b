"""A score table's files: finished Parquet parts, listed, counted, read and published whole; the summary
JSON beside them; DuckDB reading them through fsspec."""
from __future__ import annotations

import os
import posixpath
import uuid
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import OutputError
from .uris import LOCAL_SCHEMES, is_remote, redact, redact_text, scheme_of

def list_parts(output_uri: str) -> list[str]:
    """The finished part files of a table, listed afresh (an object store's listing cached by fsspec at the
    start of a run would miss what the run wrote)."""
    return sorted(_part_sizes(output_uri))


def _part_sizes(output_uri: str) -> dict[str, int]:
    """{part path: its size in bytes}, from one listing."""
    fs, path = fsspec.core.url_to_fs(output_uri)
    fs.invalidate_cache(path)
    if not fs.exists(path) or not fs.isdir(path):
        return {}
    return {
        e["name"]: e["size"] for e in fs.ls(path, detail=True, refresh=True)
        if e["name"].endswith(".parquet") and not posixpath.basename(e["name"]).startswith((".", "_"))
    }


def part_uris(output_uri: str) -> list[str]:
    """The finished parts as full URIs (with their scheme), for readers outside fsspec such as DuckDB."""
    scheme = scheme_of(output_uri)
    return [f"{scheme}://{p}" if is_remote(output_uri) else p for p in list_parts(output_uri)]


FOOTER_READ = 1 << 16  # bytes read from a part's end: its footer, in one ranged request on an object store


def count_rows(output_uri: str, threads: int = 16) -> int:
    """Rows in every finished part, from the Parquet footers alone: one listing, which gives each part's
    size, then the footers read ``threads`` at a time (on an object store a ranged read each, no HEAD)."""
    fs, _ = fsspec.core.url_to_fs(output_uri)
    options = {"block_size": FOOTER_READ, "cache_type": "readahead"} if is_remote(output_uri) else {}

    def rows(part: tuple[str, int]) -> int:
        name, size = part
        with fs.open(name, "rb", **({"size": size, **options} if options else {})) as f:
            return pq.read_metadata(f).num_rows

    parts = sorted(_part_sizes(output_uri).items())
    if len(parts) <= 1:
        return sum(map(rows, parts))
    with ThreadPoolExecutor(min(threads, len(parts))) as pool:
        return sum(pool.map(rows, parts))


def read_column(output_uri: str, column: str) -> pa.ChunkedArray:
    """One column of every finished part file (the ids already scored, say)."""
    return read_columns(output_uri, [column])[column]


def read_columns(output_uri: str, columns: list[str], filters=None) -> pa.Table:
    """Some columns of every finished part file; an empty string table where there are none yet."""
    fs, _ = fsspec.core.url_to_fs(output_uri)
    parts = list_parts(output_uri)
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pq.ParquetDataset(parts, filesystem=fs, filters=filters).read(columns=columns)


def write_part_atomically(table: pa.Table, output_uri: str, name: str) -> str:
    """Write one Parquet part so that it is never visible half-written. The file is serialised in memory
    first, so a failure while writing it reaches no store; then a hidden temporary file is renamed into place
    on local disks, and an object store gets one upload, which it publishes only when it completes."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    fs, path = fsspec.core.url_to_fs(output_uri)
    final = posixpath.join(path, name)
    if is_remote(output_uri):
        fs.pipe_file(final, data)
    else:
        fs.makedirs(path, exist_ok=True)
        tmp = posixpath.join(path, f".tmp-{uuid.uuid4().hex}-{name}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, final)
    return final


def write_json(obj_text: str, uri: str) -> None:
    with fsspec.open(uri, "w") as f:
        f.write(obj_text)


def remove_tree(uri: str) -> None:
    """Removes a file or a directory tree if it exists (a re-run's previous output)."""
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def duckdb_connection(uris=(), memory_limit: str | None = None, temp_dir: str | None = None,
                      threads: int | None = None):
    """A DuckDB connection that reads ``uris`` (and any other URI of their schemes) through fsspec, as the
    scoring job reads them; ``memory_limit`` etc. as DuckDB's settings."""
    import duckdb

    con = duckdb.connect()
    for setting, value in (("memory_limit", memory_limit), ("temp_directory", temp_dir), ("threads", threads)):
        if value is not None:
            con.execute(f"SET {setting} = " + ("'" + value.replace("'", "''") + "'" if isinstance(value, str) else str(int(value))))
    register_filesystems(con, uris)
    return con


def duckdb_path(path: str) -> str:
    """A file's path for DuckDB's readers, which expand glob patterns in every path they are given: a name
    holding ``*``, ``?`` or ``[`` (a table at ``out[1]/``) is escaped as a one-character class, so the
    path names that file and nothing else."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in path)


def register_filesystems(con, uris) -> None:
    """Registers the fsspec filesystem of each remote scheme in ``uris`` with a DuckDB connection, once."""
    registered = set(con.list_filesystems())
    for scheme in sorted({scheme_of(u) for u in uris} - LOCAL_SCHEMES):
        fs = fsspec.filesystem(scheme)
        name = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        if name not in registered:
            con.register_filesystem(fs)
            registered.add(name)


def check_output_location(uri: str, option: str = "--output", kind: str = "directory") -> bool:
    """Refuses, before any work, an output ``kind`` ("directory" or "file") that cannot be written there: an
    endpoint that does not answer (one line, not the storage library's traceback), a file where a directory
    must go or the reverse, a local path under a file or in a folder this process cannot write. Returns
    whether it exists."""
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        exists = fs.exists(path)
        is_dir = exists and fs.isdir(path)
    except Exception as e:  # noqa: BLE001 - an endpoint that does not answer, credentials refused, a bad URL
        raise OutputError(f"{option} {redact(uri)} cannot be reached: {type(e).__name__}: {redact_text(str(e))[:200]}") from None
    if exists and kind == "directory" and not is_dir:
        raise OutputError(f"{option} {redact(uri)} is an existing file; it must be a directory")
    if is_dir and kind == "file":
        raise OutputError(f"{option} {redact(uri)} is a directory; it must be a file")
    if not is_remote(uri):
        parent = os.path.abspath(path if is_dir else os.path.dirname(path) or ".")
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise OutputError(f"{option} {redact(uri)} lies under {parent}, which is a file")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise OutputError(f"{option} {redact(uri)}: {parent} is not writable by this user")
    return exists
