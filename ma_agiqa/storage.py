"""Data access over fsspec: local paths, file://, s3://, gs://, http(s)://.

Credentials and endpoints come from each filesystem's own environment and config (AWS_* variables,
AWS_ENDPOINT_URL for S3-compatible stores, gcloud's application default credentials); nothing here prints them.
"""
from __future__ import annotations

import hashlib
import os
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


def resolve_image_uri(uri, image_root: str | None) -> str:
    """The absolute URI of a manifest's ``uri`` value, or an ImageError that says why it has none."""
    if uri is None or (isinstance(uri, float)) or not str(uri).strip():
        raise ImageError("missing_uri", "the row has no uri")
    uri = str(uri).strip()
    scheme = scheme_of(uri)
    if scheme and scheme not in REMOTE_SCHEMES | LOCAL_SCHEMES:
        raise ImageError("unsupported_scheme", f"unsupported URI scheme {scheme!r} in {uri!r}")
    if scheme in REMOTE_SCHEMES:
        return uri
    path = uri.split("://", 1)[1] if scheme else uri
    if image_root is None:
        return os.path.abspath(path) if not scheme_of(uri) else path
    root_scheme = scheme_of(image_root)
    root_path = image_root.split("://", 1)[1] if root_scheme else image_root
    join = posixpath if root_scheme in REMOTE_SCHEMES else os.path
    root_norm = join.normpath(root_path if root_scheme in REMOTE_SCHEMES else os.path.abspath(root_path))
    full = join.normpath(join.join(root_norm, path))
    if full != root_norm and not full.startswith(root_norm.rstrip("/") + "/"):
        raise ImageError("escapes_root", f"{uri!r} resolves outside the image root")
    return f"{root_scheme}://{full}" if root_scheme in REMOTE_SCHEMES else full


class Fetcher:
    """Reads whole objects, one filesystem instance per scheme+bucket (fsspec caches them too)."""

    def __init__(self):
        self._fs: dict[str, fsspec.AbstractFileSystem] = {}

    def _filesystem(self, uri: str):
        scheme = scheme_of(uri) or "file"
        if scheme not in self._fs:
            self._fs[scheme] = fsspec.filesystem("file" if scheme in LOCAL_SCHEMES else scheme)
        return self._fs[scheme]

    def fetch(self, uri: str) -> bytes:
        fs = self._filesystem(uri)
        try:
            return fs.cat_file(uri)
        except FileNotFoundError:
            raise ImageError("missing", f"no such object: {uri}") from None
        except IsADirectoryError:
            raise ImageError("missing", f"is a directory: {uri}") from None
        except PermissionError as e:
            raise ImageError("fetch", f"permission denied: {uri} ({type(e).__name__})") from None
        except Exception as e:  # noqa: BLE001 - network and store errors of every library
            raise ImageError("fetch", f"{type(e).__name__} reading {uri}: {str(e)[:200]}") from None


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


def read_manifest_schema(file_uri: str, fmt: str) -> pa.Schema:
    """The columns of one manifest file, read cheaply (Parquet footer, or the first rows)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    try:
        with fsspec.open(file_uri, "rb") as f:
            if fmt == "parquet":
                return pq.read_schema(f)
            head = f.read(1 << 20)
        if fmt == "csv":
            return pacsv.read_csv(pa.py_buffer(head[: head.rfind(b"\n") + 1] or head)).schema
        return pajson.read_json(pa.py_buffer(head[: head.rfind(b"\n") + 1] or head)).schema
    except Exception as e:  # noqa: BLE001
        raise ManifestError(f"cannot read manifest file {file_uri}: {type(e).__name__}: {str(e)[:300]}") from None


def total_bytes(files: list[str]) -> int:
    fs, _ = fsspec.core.url_to_fs(files[0])
    return sum(fs.size(f) for f in files)


def read_manifest_table(files: list[str], fmt: str) -> pa.Table:
    """Every manifest file read into one table (columns missing from a file are null there)."""
    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    tables = []
    for uri in files:
        try:
            with fsspec.open(uri, "rb") as f:
                if fmt == "parquet":
                    tables.append(pq.read_table(f))
                elif fmt == "csv":
                    tables.append(pacsv.read_csv(f))
                else:
                    tables.append(pajson.read_json(f))
        except Exception as e:  # noqa: BLE001
            raise ManifestError(f"cannot read manifest file {uri}: {type(e).__name__}: {str(e)[:300]}") from None
    return pa.concat_tables(tables, promote_options="permissive")


# -- output --------------------------------------------------------------------------------------------------
def list_parts(output_uri: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(output_uri)
    if not fs.exists(path):
        return []
    return sorted(
        p for p in fs.ls(path, detail=False)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_"))
    )


def read_column(output_uri: str, column: str) -> pa.ChunkedArray:
    """One column of every finished part file (the ids already scored, say)."""
    return read_columns(output_uri, [column])[column]


def read_columns(output_uri: str, columns: list[str]) -> pa.Table:
    """Some columns of every finished part file; an empty string table where there are none yet."""
    fs, _ = fsspec.core.url_to_fs(output_uri)
    parts = list_parts(output_uri)
    if not parts:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pq.ParquetDataset(parts, filesystem=fs).read(columns=columns)


def write_part_atomically(table: pa.Table, output_uri: str, name: str) -> str:
    """Write one Parquet part so that it is never visible half-written: a hidden temporary file renamed
    into place on local disks; an object store publishes an object only when its upload completes."""
    fs, path = fsspec.core.url_to_fs(output_uri)
    fs.makedirs(path, exist_ok=True)
    final = posixpath.join(path, name)
    if scheme_of(output_uri) in REMOTE_SCHEMES:
        with fs.open(final, "wb") as f:
            pq.write_table(table, f, compression="zstd")
    else:
        tmp = posixpath.join(path, f".tmp-{uuid.uuid4().hex}-{name}")
        pq.write_table(table, tmp, compression="zstd")
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
