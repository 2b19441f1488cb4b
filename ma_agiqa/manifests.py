"""Manifests: one file, a directory or a glob of Parquet, CSV or JSONL files, read with ``id`` and ``uri``
as the text the file holds."""
from __future__ import annotations

import hashlib
import posixpath

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .uris import LOCAL_SCHEMES, redact, scheme_of

MANIFEST_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json"}


class ManifestError(ValueError):
    """A manifest that cannot be used: the job stops before any model is loaded."""


def stable_id(uri: str) -> str:
    """The id of a manifest row without one: a hash of its uri as written in the manifest."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:20]


def manifest_format(path: str) -> str:
    for suffix, fmt in MANIFEST_SUFFIXES.items():
        if path.lower().endswith(suffix):
            return fmt
    raise ManifestError(f"{path}: unknown manifest format (use .parquet, .csv or .jsonl)")


def expand_manifest(uri: str) -> tuple[list[str], str]:
    """One file, a directory or a glob -> (file URIs, format). Directories are listed, never images."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:
        if any(c in path for c in "*?["):
            files = sorted(fs.glob(path))
        elif fs.isdir(path):
            files = sorted(
                p for p in fs.find(path)
                if not posixpath.basename(p).startswith((".", "_")) and any(p.lower().endswith(s) for s in MANIFEST_SUFFIXES)
            )
        elif fs.exists(path):
            files = [path]
        else:
            raise ManifestError(f"manifest {uri} does not exist")
    except ManifestError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ManifestError(f"cannot list manifest {uri}: {type(e).__name__}: {e}") from None
    if not files:
        raise ManifestError(f"manifest {uri} matches no .parquet/.csv/.jsonl file")
    formats = {manifest_format(f) for f in files}
    if len(formats) > 1:
        raise ManifestError(f"manifest {uri} mixes formats {sorted(formats)}")
    protocol = scheme_of(uri)
    full = [f if not protocol or protocol in LOCAL_SCHEMES else f"{protocol}://{f}" for f in files]
    return full, formats.pop()


ID_COLUMNS = ("id", "uri")  # always read as the text the manifest holds, never inferred as numbers


def read_manifest_file(file_uri: str, fmt: str) -> pa.Table:
    """One manifest file as a table whose ``id`` and ``uri`` columns are strings read as written (``001``
    stays ``001``, ``1e3`` stays ``1e3``). A file that cannot be parsed raises ManifestError naming the file
    and, for CSV and JSONL, the line."""
    try:
        with fsspec.open(file_uri, "rb") as f:
            data = f.read()
    except Exception as e:  # noqa: BLE001
        raise ManifestError(f"cannot read manifest file {redact(file_uri)}: {type(e).__name__}: {str(e)[:300]}") from None
    if fmt == "parquet":
        try:
            table = pq.read_table(pa.py_buffer(data))
        except Exception as e:  # noqa: BLE001
            raise ManifestError(f"cannot read manifest file {redact(file_uri)}: {type(e).__name__}: {str(e)[:300]}") from None
        for name in ID_COLUMNS:
            if name in table.column_names and not pa.types.is_string(table.schema.field(name).type):
                table = table.set_column(table.column_names.index(name), name, table[name].cast(pa.string()))
        return table
    if fmt == "csv":
        return _read_csv(data, file_uri)
    return _read_jsonl(data, file_uri)


def _read_csv(data: bytes, file_uri: str) -> pa.Table:
    import pyarrow.csv as pacsv

    header = data[: data.find(b"\n")] if b"\n" in data else data
    import csv

    names = next(csv.reader([header.decode("utf-8", "replace").strip()]), [])
    types = {c: pa.string() for c in ID_COLUMNS if c in names}
    try:
        return pacsv.read_csv(pa.py_buffer(data), convert_options=pacsv.ConvertOptions(column_types=types))
    except Exception as e:  # noqa: BLE001 - pyarrow does not say which line: find it with the csv module
        raise ManifestError(f"manifest file {redact(file_uri)}: {_csv_bad_line(data) or str(e)[:300]}") from None


def _csv_bad_line(data: bytes) -> str | None:
    import csv
    import io

    reader = csv.reader(io.StringIO(data.decode("utf-8", "replace"), newline=""))
    try:
        width = len(next(reader))
        for fields in reader:
            if fields and len(fields) != width:
                return f"line {reader.line_num}: expected {width} fields, got {len(fields)}"
    except csv.Error as e:
        return f"line {reader.line_num}: {e}"
    return None


def _read_jsonl(data: bytes, file_uri: str) -> pa.Table:
    """JSON Lines through pyarrow's fast reader; ids that are JSON numbers, or a file pyarrow rejects, go
    through the json module, which keeps each number's text and names the line of a malformed object."""
    import pyarrow.json as pajson

    try:
        table = pajson.read_json(pa.py_buffer(data))
        if all(c not in table.column_names or pa.types.is_string(table.schema.field(c).type)
               or pa.types.is_null(table.schema.field(c).type) for c in ID_COLUMNS):
            for c in ID_COLUMNS:
                if c in table.column_names and pa.types.is_null(table.schema.field(c).type):
                    table = table.set_column(table.column_names.index(c), c, table[c].cast(pa.string()))
            return table
    except Exception:  # noqa: BLE001 - mixed id types or a malformed line: the slow path says which
        pass
    import json

    rows = []
    for number, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ManifestError(f"manifest file {redact(file_uri)}: line {number}: malformed JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"manifest file {redact(file_uri)}: line {number}: not a JSON object")
        for c in ID_COLUMNS:
            value = row.get(c)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                row[c] = json.loads(line, parse_int=str, parse_float=str)[c]  # the number as written
            elif value is not None and not isinstance(value, str):
                row[c] = json.dumps(value)
        rows.append(row)
    try:
        table = pa.Table.from_pylist(rows)
    except Exception as e:  # noqa: BLE001 - a column whose values mix types pyarrow cannot unify
        raise ManifestError(f"manifest file {redact(file_uri)}: {type(e).__name__}: {str(e)[:300]}") from None
    for c in ID_COLUMNS:
        if c in table.column_names:
            table = table.set_column(table.column_names.index(c), c, table[c].cast(pa.string()))
    return table


def total_bytes(files: list[str]) -> int:
    fs, _ = fsspec.core.url_to_fs(files[0])
    return sum(fs.size(f) for f in files)


def read_manifest_table(files: list[str], fmt: str) -> pa.Table:
    """Every manifest file read into one table (columns missing from a file are null there)."""
    tables = [read_manifest_file(uri, fmt) for uri in files]
    try:
        return pa.concat_tables(tables, promote_options="permissive")
    except Exception as e:  # noqa: BLE001
        raise ManifestError(f"manifest files disagree on their columns' types: {str(e)[:300]}") from None
