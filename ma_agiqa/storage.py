"""Data access over fsspec: local paths, file://, s3://, gs://, http(s)://.

Credentials and endpoints come from each filesystem's own environment and config (AWS_* variables,
AWS_ENDPOINT_URL for S3-compatible stores, gcloud's application default credentials); nothing here prints them.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import posixpath
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ImageError

REMOTE_SCHEMES = {"s3", "s3a", "gs", "gcs", "http", "https"}
LOCAL_SCHEMES = {"", "file", "local"}
MANIFEST_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json"}


class ManifestError(ValueError):
    """A manifest that cannot be used: the job stops before any model is loaded."""


def scheme_of(uri: str) -> str:
    if "://" not in uri:
        return ""
    return uri.split("://", 1)[0].lower()


def stable_id(uri: str) -> str:
    """The id of a manifest row without one: a hash of its uri as written in the manifest."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:20]


def redact(uri) -> str:
    """A URI fit for logs and error messages: without its query string and fragment, where pre-signed URLs
    carry their credentials, and without a user:password@ part."""
    text = str(uri)
    for sep in ("?", "#"):
        text = text.split(sep, 1)[0]
    if "://" in text:
        scheme, rest = text.split("://", 1)
        host, slash, path = rest.partition("/")
        text = f"{scheme}://{host.rsplit('@', 1)[-1]}{slash}{path}"
    return text


def resolve_image_uri(uri, image_root: str | None, allow_outside_root: bool = False) -> str:
    """The absolute URI of a manifest's ``uri`` value, or an ImageError that says why it has none.

    With an ``image_root`` every URI must lie inside it (``escapes_root`` otherwise), remote ones included,
    and a local path is judged after its symlinks are followed, so a link inside the root that points out of
    it is refused too; ``allow_outside_root`` lifts the confinement of absolute URIs."""
    if uri is None or (isinstance(uri, float)) or not str(uri).strip():
        raise ImageError("missing_uri", "the row has no uri")
    uri = str(uri).strip()
    scheme = scheme_of(uri)
    if scheme and scheme not in REMOTE_SCHEMES | LOCAL_SCHEMES:
        raise ImageError("unsupported_scheme", f"unsupported URI scheme {scheme!r} in {redact(uri)!r}")
    if image_root is None:
        if scheme in REMOTE_SCHEMES:
            return uri
        path = uri.split("://", 1)[1] if scheme else uri
        return os.path.abspath(path)
    root_scheme = scheme_of(image_root)
    root_remote = root_scheme in REMOTE_SCHEMES
    absolute = bool(scheme) or uri.startswith("/")
    if absolute and allow_outside_root:
        return uri if scheme in REMOTE_SCHEMES else os.path.abspath(uri.split("://", 1)[1] if scheme else uri)
    if scheme in REMOTE_SCHEMES:
        if not root_remote or scheme != root_scheme or not _under(_key(uri), _key(image_root)):
            raise ImageError("escapes_root", f"{redact(uri)!r} lies outside the image root")
        return uri
    path = uri.split("://", 1)[1] if scheme else uri
    if root_remote:
        if absolute:
            raise ImageError("escapes_root", f"{redact(uri)!r} lies outside the image root")
        full = posixpath.normpath(posixpath.join(_key(image_root), path))
        if not _under(full, _key(image_root)):
            raise ImageError("escapes_root", f"{redact(uri)!r} resolves outside the image root")
        return f"{root_scheme}://{full}"
    root_path = _real_dir(image_root.split("://", 1)[1] if root_scheme else image_root)
    full = os.path.normpath(os.path.join(root_path, path))
    if _under(full, root_path):  # then follow symlinks: the directory's (cached), then the file's own
        parent, name = os.path.split(full)
        full = os.path.join(_real_dir(parent), name)
        if os.path.islink(full):
            full = os.path.realpath(full)
    if not _under(full, root_path):
        raise ImageError("escapes_root", f"{redact(uri)!r} resolves outside the image root")
    return full


@functools.lru_cache(maxsize=65536)
def _real_dir(path: str) -> str:
    """A directory's real path. Cached: a manifest's rows share few directories, and realpath costs a
    system call per path component."""
    return os.path.realpath(path)


def _key(uri: str) -> str:
    """bucket/key of a remote URI, with any '..' collapsed."""
    return posixpath.normpath(uri.split("://", 1)[1])


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


_QUERY = re.compile(r"(\w+://[^\s?#'\"]*)[?#][^\s'\"]*")


def redact_text(text: str) -> str:
    """Every URL inside a message without its query string (a store's error may quote the URL it was given)."""
    return _QUERY.sub(r"\1", text)


DEFAULT_MAX_BYTES = 64 << 20  # an object larger than this is refused before it is read


class Fetcher:
    """Reads whole objects, one filesystem instance per scheme (fsspec caches them too). An object over
    ``max_bytes`` is refused from its size, before a byte of it is read."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES):
        self.max_bytes = max_bytes
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}

    def _filesystem(self, uri: str):
        scheme = scheme_of(uri) or "file"
        if scheme not in self._fs:
            self._fs[scheme] = fsspec.filesystem("file" if scheme in LOCAL_SCHEMES else scheme)
        return self._fs[scheme]

    def check_local(self, path: str) -> None:
        """A local file's existence and size, from one stat: the errors ``fetch`` would raise, sooner."""
        try:
            size = os.stat(path.split("://", 1)[1] if "://" in path else path).st_size
        except (FileNotFoundError, NotADirectoryError):
            raise ImageError("missing", f"no such object: {redact(path)}") from None
        except PermissionError as e:
            raise ImageError("fetch", f"permission denied: {redact(path)} ({type(e).__name__})") from None
        self._refuse_over_limit(path, size)

    def _refuse_over_limit(self, uri: str, size: int | None) -> None:
        if size is not None and size > self.max_bytes:
            raise ImageError("too_large", f"{redact(uri)} is {size} bytes, over the limit of {self.max_bytes} (--max-bytes)")

    def fetch(self, uri: str) -> bytes:
        fs = self._filesystem(uri)
        shown = redact(uri)
        try:
            self._refuse_over_limit(uri, fs.size(uri))
            with fs.open(uri, "rb") as f:
                data = f.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:  # a store that did not know the size in advance
                raise ImageError("too_large", f"{shown} is over the limit of {self.max_bytes} bytes (--max-bytes)")
            return data
        except ImageError:
            raise
        except FileNotFoundError:
            raise ImageError("missing", f"no such object: {shown}") from None
        except IsADirectoryError:
            raise ImageError("missing", f"is a directory: {shown}") from None
        except PermissionError as e:
            raise ImageError("fetch", f"permission denied: {shown} ({type(e).__name__})") from None
        except Exception as e:  # noqa: BLE001 - network and store errors of every library
            kind = "timeout" if "timeout" in type(e).__name__.lower() or "timed out" in str(e).lower() else "fetch"
            raise ImageError(kind, f"{type(e).__name__} reading {shown}: {redact_text(str(e))[:200]}") from None


# -- manifests ------------------------------------------------------------------------------------------------
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


# -- output --------------------------------------------------------------------------------------------------
def list_parts(output_uri: str) -> list[str]:
    """The finished part files of a table, listed afresh (an object store's listing cached by fsspec at the
    start of a run would miss what the run wrote)."""
    fs, path = fsspec.core.url_to_fs(output_uri)
    fs.invalidate_cache(path)
    if not fs.exists(path):
        return []
    return sorted(
        p for p in fs.ls(path, detail=False, refresh=True) if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_"))
    ) if fs.isdir(path) else []


def part_uris(output_uri: str) -> list[str]:
    """The finished parts as full URIs (with their scheme), for readers outside fsspec such as DuckDB."""
    scheme = scheme_of(output_uri)
    remote = scheme and scheme not in LOCAL_SCHEMES
    return [f"{scheme}://{p}" if remote else p for p in list_parts(output_uri)]


def count_rows(output_uri: str) -> int:
    """Rows in every finished part, from the Parquet footers alone."""
    fs, _ = fsspec.core.url_to_fs(output_uri)
    total = 0
    for part in list_parts(output_uri):
        with fs.open(part, "rb") as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


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
    if scheme_of(output_uri) in REMOTE_SCHEMES:
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


def join_uri(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


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


def register_filesystems(con, uris) -> None:
    """Registers the fsspec filesystem of each remote scheme in ``uris`` with a DuckDB connection, once."""
    registered = set(con.list_filesystems())
    for scheme in sorted({scheme_of(u) for u in uris} - {"", "file", "local"}):
        fs = fsspec.filesystem(scheme)
        name = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
        if name not in registered:
            con.register_filesystem(fs)
            registered.add(name)
