"""Manifests: one file, a directory or a glob of Parquet, CSV or JSONL files, read with ``id`` and ``uri``
as the text the file holds, and the one rule that gives each row its ``image_id`` (``image_ids``).

The scoring job and the curation jobs (``--metadata``, a manifest joined by its derived ids) read manifests
through ``read_manifest_file`` and derive ids with ``image_ids``: the key a score row has is the key its
manifest row gets when joined, whatever the file's format or the types its writer chose."""
from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .uris import LOCAL_SCHEMES, REMOTE_SCHEMES, redact, scheme_of

MANIFEST_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json"}


class ManifestError(ValueError):
    """A manifest that cannot be used: the job stops before any model is loaded."""


def stable_id(uri: str) -> str:
    """The id of a manifest row without one: a hash of its uri as written in the manifest."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:20]


def id_text(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """An id (or uri) column as text. Strings stay as written. Floats, which pandas writes for an integer
    column with a gap, are integers when integral (``3.0`` -> ``'3'``, as the same id reads from a CSV or
    JSON Lines file), else Python's shortest round-trip text (``1.5`` -> ``'1.5'``); NaN is no id (null).
    Any other type is Arrow's cast to string (``7`` -> ``'7'``)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_string(values.type):
        return values
    if pa.types.is_large_string(values.type) or pa.types.is_null(values.type):
        return values.cast(pa.string())
    if pa.types.is_floating(values.type):
        return pa.array([_float_text(v) for v in values.to_pylist()], pa.string())
    return values.cast(pa.string())


def _float_text(v: float | None) -> str | None:
    if v is None or math.isnan(v):
        return None
    if math.isfinite(v) and v == int(v) and abs(v) < 2 ** 53:
        return str(int(v))
    return repr(float(v))


def image_ids(table: pa.Table) -> pa.Array:
    """The ``image_id`` of each manifest row, the project's one rule: the row's ``id`` as text
    (``id_text``), else ``stable_id`` of its ``uri`` as written, else (a row with neither) ``stable_id`` of
    the row's content, so that each such row is still one row of the table, counted once. An empty id or
    uri is none (a CSV writes a missing value as an empty field)."""
    n = len(table)
    given = _blank_is_null(id_text(table["id"])) if "id" in table.column_names else pa.nulls(n, pa.string())
    if not given.null_count:  # a manifest with ids costs no hashing
        return given
    uris = _blank_is_null(id_text(table["uri"])).to_pylist() if "uri" in table.column_names else [None] * n
    ids = given.to_pylist()
    for i, value in enumerate(ids):
        if value is None:
            ids[i] = stable_id(uris[i]) if uris[i] is not None else stable_id(
                "row:" + json.dumps(table.slice(i, 1).to_pylist()[0], default=str, sort_keys=True))
    return pa.array(ids, pa.string())


def _blank_is_null(values: pa.Array) -> pa.Array:
    import pyarrow.compute as pc

    return pc.if_else(pc.equal(values, ""), pa.scalar(None, pa.string()), values)


def check_uris(table: pa.Table, where: str) -> None:
    """Refuses, before Ray starts, a manifest file none of whose uris the job can read: every uri with a
    scheme no filesystem of the job reads (``tar://member::file://shard.tar``, ``ftp://``), a manifest
    written for another reader. A few such rows among readable ones stay rows: each becomes an
    ``unsupported_scheme`` error row, as any bad row does."""
    if "uri" not in table.column_names or len(table) == 0:
        return
    import pyarrow.compute as pc

    uris = id_text(table["uri"])
    uris = uris.filter(pc.invert(pc.or_kleene(pc.is_null(uris), pc.equal(pc.utf8_trim_whitespace(uris), ""))))
    if len(uris) == 0:
        return
    with_scheme = uris.filter(pc.match_substring(uris, "://"))
    if len(with_scheme) < len(uris):
        return  # plain paths read as local files
    schemes = pc.utf8_lower(pc.list_element(pc.split_pattern(with_scheme, "://", max_splits=1), 0))
    known = pa.array(sorted(REMOTE_SCHEMES | LOCAL_SCHEMES), pa.string())
    if pc.any(pc.is_in(schemes, value_set=known)).as_py():
        return
    counts = {r["values"]: r["counts"] for r in pc.value_counts(schemes).to_pylist()}
    shown = ", ".join(f"{s}:// ({n} rows)" for s, n in sorted(counts.items(), key=lambda kv: -kv[1])[:5])
    raise ManifestError(
        f"manifest file {redact(where)}: no uri can be read: every one has an unsupported scheme ({shown}; "
        f"e.g. {redact(with_scheme[0].as_py())!r}); the job reads local paths, file://, "
        f"{', '.join(s + '://' for s in sorted(REMOTE_SCHEMES))}")


def manifest_format(path: str) -> str:
    for suffix, fmt in MANIFEST_SUFFIXES.items():
        if path.lower().endswith(suffix):
            return fmt
    raise ManifestError(f"{path}: unknown manifest format (use .parquet, .csv or .jsonl)")


def expand_manifest(uri: str) -> tuple[list[str], str]:
    """One file, a directory or a glob -> (file URIs, format). Directories are listed, never images."""
    fs, path = fsspec.core.url_to_fs(uri)
    try:  # a path that exists is that path, even with glob characters in its name (out?x, run[1])
        exists = fs.exists(path)
        if not exists and any(c in path for c in "*?["):
            files = sorted(fs.glob(path))
        elif exists and fs.isdir(path):
            files = sorted(
                p for p in fs.find(path)
                if not _hidden(p, path) and any(p.lower().endswith(s) for s in MANIFEST_SUFFIXES)
            )
        elif exists:
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
BOM = b"\xef\xbb\xbf"  # what Excel and Notepad put before a UTF-8 CSV's header


def read_manifest_file(file_uri: str, fmt: str, text_columns: tuple[str, ...] = ID_COLUMNS) -> pa.Table:
    """One manifest file as a table whose ``text_columns`` (``id`` and ``uri``, and a join key) are strings
    read as written (``001`` stays ``001``, ``1e3`` stays ``1e3``; Parquet numbers as ``id_text`` says). A
    UTF-8 byte order mark is skipped. A file that cannot be parsed, or a JSON document that is not JSON
    Lines of rows (a ``captions.json`` dictionary), raises ManifestError naming the file and, where there
    is one, the line."""
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
        for name in text_columns:
            if name in table.column_names and not pa.types.is_string(table.schema.field(name).type):
                table = table.set_column(table.column_names.index(name), name, id_text(table[name]))
        return table
    data = data.removeprefix(BOM)
    if fmt == "csv":
        return _read_csv(data, file_uri, text_columns)
    return _read_jsonl(data, file_uri, text_columns)


def _read_csv(data: bytes, file_uri: str, text_columns: tuple[str, ...]) -> pa.Table:
    import csv

    import pyarrow.csv as pacsv

    if not data.strip():  # zero bytes or blank lines: pyarrow's "Empty CSV file" would not say which
        raise ManifestError(f"manifest file {redact(file_uri)} is empty (no header and no rows)")
    header = data[: data.find(b"\n")] if b"\n" in data else data
    names = next(csv.reader([header.decode("utf-8", "replace").strip()]), [])
    types = {c: pa.string() for c in text_columns if c in names}
    try:
        return pacsv.read_csv(pa.py_buffer(data), convert_options=pacsv.ConvertOptions(column_types=types))
    except Exception as e:  # noqa: BLE001 - pyarrow does not say which line: find it with the csv module
        raise ManifestError(f"manifest file {redact(file_uri)}: {_csv_bad_line(data) or str(e)[:300]}") from None


def _csv_bad_line(data: bytes) -> str | None:
    import csv
    import io

    reader = csv.reader(io.StringIO(data.decode("utf-8", "replace"), newline=""))
    try:
        width = len(next(reader, []))
        for fields in reader:
            if fields and len(fields) != width:
                return f"line {reader.line_num}: expected {width} fields, got {len(fields)}"
    except csv.Error as e:
        return f"line {reader.line_num}: {e}"
    return None


def _not_rows(data: bytes, file_uri: str, keys: tuple[str, ...]) -> None:
    """Refuses a JSON file that is one document rather than JSON Lines of rows: an array, an object spread
    over lines, or one object without any of ``keys`` (``uri``, ``id``, a join key: a dictionary such as ``captions.json``
    mapping file names to captions, whose keys would become the manifest's columns). Reads the first line
    only, unless that line is not JSON by itself."""
    start = re.compile(rb"\S").search(data)
    if start is None:
        return
    end = data.find(b"\n", start.start())
    first = data[start.start():] if end < 0 else data[start.start():end]
    more = end >= 0 and re.compile(rb"\S").search(data, end) is not None
    what = None
    if first.startswith(b"["):
        what = "a JSON array"
    else:
        try:
            doc = json.loads(first)
        except ValueError:  # a pretty-printed document, or a malformed line the reader names
            try:
                doc = json.loads(data)
            except ValueError:
                return
            what = "one JSON document spread over lines" + (
                f" (a dictionary of {len(doc)} keys)" if isinstance(doc, dict) else "")
        else:
            if not more and isinstance(doc, dict) and not set(keys) & set(doc):
                what = f"one JSON object without {' or '.join(map(repr, keys))} (a dictionary of {len(doc)} keys)"
    if what:
        raise ManifestError(f"manifest file {redact(file_uri)} is {what}, not JSON Lines: a manifest holds one "
                            "object per line, each a row with its 'uri' (and 'id')")


def _read_jsonl(data: bytes, file_uri: str, text_columns: tuple[str, ...]) -> pa.Table:
    """JSON Lines through pyarrow's fast reader; ids that are JSON numbers, or a file pyarrow rejects, go
    through the json module, which keeps each number's text and names the line of a malformed object."""
    import pyarrow.json as pajson

    _not_rows(data, file_uri, text_columns)
    try:
        table = pajson.read_json(pa.py_buffer(data))
        if all(c not in table.column_names or pa.types.is_string(table.schema.field(c).type)
               or pa.types.is_null(table.schema.field(c).type) for c in text_columns):
            for c in text_columns:
                if c in table.column_names and pa.types.is_null(table.schema.field(c).type):
                    table = table.set_column(table.column_names.index(c), c, table[c].cast(pa.string()))
            return table
    except Exception:  # noqa: BLE001 - mixed id types or a malformed line: the slow path says which
        pass
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
        for c in text_columns:
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
    for c in text_columns:
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


def _hidden(path: str, root: str) -> bool:
    """A file the listing of ``root`` leaves out: it, or a folder between it and the root, is named ``.x`` or
    ``_x`` (temporary parts, a run's own ``_runs/`` summaries, ``_SUCCESS`` markers)."""
    relative = posixpath.relpath(path, root.rstrip("/") or "/")
    return any(part.startswith((".", "_")) for part in relative.split("/"))
