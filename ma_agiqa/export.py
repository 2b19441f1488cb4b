"""Export: the kept images of a curation run, out as a dataset to train on.

A kept table (jobs.filter's ``OUTPUT/kept/``, or any Parquet manifest with ``image_id`` and ``uri``) becomes
- ``webdataset``: tar shards ``OUTPUT/shard-00000.tar`` ..., each sample ``<key>.<ext>`` (the image's original
  bytes) and ``<key>.json`` (every column of its kept row);
- ``parquet``: the Hugging Face datasets layout, ``OUTPUT/part-00000.parquet`` ... with an ``image`` column of
  struct {bytes, path} beside the kept row's columns;
- ``files``: ``OUTPUT/images/<key>.<ext>`` and one ``OUTPUT/metadata.parquet`` (the rows, with ``file_name``,
  as the datasets library's imagefolder reads it);
plus ``OUTPUT/_errors.parquet`` (the rows whose image could not be read, each with its error kind) and
``OUTPUT/_summary.json``, written last.

Shards are deterministic: the kept rows sorted by image_id, shard i holds rows [i*N, (i+1)*N). Each shard is
written by one Ray Data task into a local temporary file and published whole (a rename on local disks, one
upload on object stores), then a small record ``OUTPUT/_shards/<shard>.json`` (its counts and errors) is
written: a re-run skips the shards that have a record and rewrites the others under the same names with the
same bytes (tar members carry no time stamps), so an export killed half-way completes without duplicates.
``OUTPUT/_plan.json`` (format, shard size, a digest of the kept rows) is written first; an output holding a
different plan is replaced, so a nightly ``jobs.curate --export-output`` holds the latest kept set.

Images are read by their ``uri``: a plain object (local, file://, s3://, ... via Fetcher), or a container
locator (ma_agiqa.locators): a tar member is found by streaming the shard once per export shard that needs
it, stopping at the last member wanted; a Parquet cell is read by row group, only the image column and only
the row groups holding wanted rows. Rows are grouped by container within each export shard; ids of the form
``<shard>/<key>`` (as WebDataset inputs get) sort a container's rows together, so a container is read by one
or two export tasks. Container members are spilled to the task's temporary directory and plain objects are
fetched at most 2 x FETCH_THREADS ahead, so a task holds a few images in memory whatever the shard size; the
driver holds the kept rows' metadata, never image bytes.

Where Ray Data's own readers and writers did not fit (Ray 2.60, read in ray/data/datasource/file_datasink.py):
``write_webdataset`` / ``write_parquet`` name files ``{write_uuid}_{task_index}`` with a new uuid per run
and a task index that depends on the block layout, open the final path directly (a killed task leaves a
half-written file under its final name on local disks), skip or replace a whole directory but never one
file, and the WebDataset writer stamps each member with the current time; so neither deterministic names
nor a resume without duplicates is possible with them, and the shards are written by our own tasks
(``map_batches`` over the shard indices). ``read_parquet`` is not used for the kept table: the exact row
ranges need a global sort with row positions, which the driver does on the metadata alone.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
import re
import tarfile
import tempfile
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import locators
from .curation import CurationError
from .errors import ImageError, OutputError, StorageFailure, storage_errors
from .fetch import DEFAULT_MAX_BYTES, Fetcher
from .manifests import ManifestError, expand_manifest
from .table_files import check_output_location, write_part_atomically
from .uris import is_remote, join_uri, redact, redact_text, resolve_image_uri

FORMATS = ("webdataset", "parquet", "files")
SUMMARY_FILE, ERRORS_FILE, PLAN_FILE, RECORDS_DIR = "_summary.json", "_errors.parquet", "_plan.json", "_shards"
IMAGES_DIR, METADATA_FILE = "images", "metadata.parquet"
DEFAULT_SHARD_SIZE = 1000
PARQUET_ROW_GROUP = 100  # rows per row group of an image Parquet shard, as the datasets library writes them
FETCH_THREADS = 8  # plain objects fetched at once by one shard task (object stores answer in tens of ms)
ERROR_FIELDS = ("image_id", "uri", "kind", "message", "shard")


class ExportError(CurationError):
    """Options or inputs that cannot be exported: nothing is written (a user error, as the curation jobs'
    are: one line and exit code 2)."""


# -- names ---------------------------------------------------------------------------------------------------
_SAFE = re.compile(r"[A-Za-z0-9_-]{1,120}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def sample_key(image_id) -> str:
    """A file-name-safe key for an image_id, distinct for distinct ids: an id of letters, digits, ``_`` and
    single ``-`` is its own key; any other id is sanitised and suffixed ``--`` + 16 hex digits of its SHA-1.
    Only suffixed keys contain ``--``, so the two kinds never meet, and two suffixed keys meet only where
    64-bit digest prefixes collide, which the export checks for anyway. No key holds a ``.``, which WebDataset
    readers take as the start of the extension."""
    text = str(image_id)
    if _SAFE.fullmatch(text) and "--" not in text:
        return text
    clean = re.sub(r"-{2,}", "-", _UNSAFE.sub("_", text))[:80].strip("-")
    return f"{clean}--{hashlib.sha1(text.encode('utf-8')).hexdigest()[:16]}"


def shard_name(fmt: str, index: int) -> str:
    return {"webdataset": f"shard-{index:05d}.tar", "parquet": f"part-{index:05d}.parquet"}.get(fmt, f"shard-{index:05d}")


_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"GIF87a", "gif"), (b"GIF89a", "gif"),
          (b"BM", "bmp"), (b"II*\x00", "tiff"), (b"MM\x00*", "tiff"))
_SUFFIXES = {"jpg", "jpeg", "png", "gif", "bmp", "tif", "tiff", "webp", "avif", "heic", "jxl"}


def image_extension(data: bytes, name: str | None = None) -> str:
    """The extension of an image's own format, from its first bytes; else from its name; else ``bin``."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "avif"
        if brand in (b"heic", b"heix", b"mif1", b"msf1"):
            return "heic"
    suffix = posixpath.splitext(str(name or "").split("?", 1)[0])[1].lower().lstrip(".")
    return ("jpg" if suffix == "jpeg" else "tiff" if suffix == "tif" else suffix) if suffix in _SUFFIXES else "bin"


# -- the kept table ------------------------------------------------------------------------------------------
def kept_files(kept: str) -> list[str]:
    """The Parquet files of a kept set: a filter output directory (its ``kept/``), a kept directory, a file
    or a glob."""
    fs, path = fsspec.core.url_to_fs(kept)
    try:
        if fs.isfile(path):
            pass
        elif fs.isdir(posixpath.join(path, "kept")):
            kept = join_uri(kept, "kept")
        files, fmt = expand_manifest(kept)
    except ManifestError as e:
        raise ExportError(f"--kept: {e}") from None
    except Exception as e:  # noqa: BLE001 - an endpoint that does not answer, credentials refused
        raise ExportError(f"--kept {redact(kept)} cannot be reached: {type(e).__name__}: {redact_text(str(e))[:200]}") from None
    if fmt != "parquet":
        raise ExportError(f"--kept {redact(kept)} must be Parquet (it holds {fmt} files)")
    return files


def read_kept(kept: str) -> pa.Table:
    """The kept rows (metadata only: no image bytes), sorted by image_id, internal ``_`` columns dropped."""
    files = kept_files(kept)
    fs, _ = fsspec.core.url_to_fs(files[0])
    try:
        table = pq.ParquetDataset(files, filesystem=fs).read()
    except Exception as e:  # noqa: BLE001 - a corrupt or unreadable file is the user's to fix
        raise ExportError(f"cannot read --kept {redact(kept)}: {type(e).__name__}: {redact_text(str(e))[:300]}") from None
    missing = [c for c in ("image_id", "uri") if c not in table.column_names]
    if missing:
        raise ExportError(f"--kept {redact(kept)} has no column {', '.join(missing)} (columns: {', '.join(table.column_names)})")
    table = table.select([c for c in table.column_names if not c.startswith("_")])
    table = table.set_column(table.column_names.index("image_id"), "image_id", table["image_id"].cast(pa.string()))
    table = table.set_column(table.column_names.index("uri"), "uri", table["uri"].cast(pa.string()))
    return table.sort_by([("image_id", "ascending")]).combine_chunks()


def table_digest(table: pa.Table) -> str:
    """A digest of a table's schema and values: the same kept rows give the same digest."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return hashlib.sha256(sink.getvalue()).hexdigest()[:24]


@dataclass
class ExportJob:
    """What every shard task needs: travels to the tasks, with the rows in the object store."""

    output: str
    fmt: str
    shard_size: int
    rows: list  # [ObjectRef of the exported rows' table], in a list so that Ray does not resolve it
    image_root: str | None = None
    allow_outside_root: bool = False
    max_bytes: int = DEFAULT_MAX_BYTES
    names: list[str] = field(default_factory=list)


def plan_rows(table: pa.Table) -> tuple[pa.Table, list[dict]]:
    """The rows to export, each with its ``__key__``, and the error entries of the rows that cannot be: a
    repeated image_id (its first row is exported), a row without a uri, or a row that scoring could not read
    (its ``error``, e.g. ``not_image``: a kept set filtered without --drop-errors keeps them, but they are no
    training images: the export never copies a file that is no image under an image's name)."""
    ids, uris = table["image_id"].to_pylist(), table["uri"].to_pylist()
    scored_errors = table["error"].to_pylist() if "error" in table.column_names else [None] * len(ids)
    keep, errors, seen_ids, seen_keys, keys = [], [], set(), {}, []
    for i, (image_id, uri, scored_error) in enumerate(zip(ids, uris, scored_errors)):
        if image_id is None:
            errors.append(_error(image_id, uri, "missing_id", "the row has no image_id"))
            continue
        if scored_error:
            errors.append(_error(image_id, uri, scored_error.split(":", 1)[0], f"scoring could not read it: {scored_error}"))
            continue
        if image_id in seen_ids:
            errors.append(_error(image_id, uri, "duplicate_id", "image_id seen before in the kept set; its first row is exported"))
            continue
        if not uri:
            errors.append(_error(image_id, uri, "missing_uri", "the row has no uri"))
            continue
        key = sample_key(image_id)
        if key in seen_keys:  # a 64-bit digest collision: never seen, but never silent
            errors.append(_error(image_id, uri, "key_collision", f"key {key} is also the key of {seen_keys[key]!r}"))
            continue
        seen_ids.add(image_id)
        seen_keys[key] = image_id
        keep.append(i)
        keys.append(key)
    rows = table.take(pa.array(keep, pa.int64())) if len(keep) < len(table) else table
    return rows.append_column("__key__", pa.array(keys, pa.string())), errors


def _error(image_id, uri, kind: str, message: str, shard: str | None = None) -> dict:
    return {"image_id": image_id, "uri": None if uri is None else redact(uri), "kind": kind,
            "message": redact_text(message)[:500], "shard": shard}


# -- reading a shard's images --------------------------------------------------------------------------------
def read_images(rows: list[dict], job: ExportJob, tmpdir: str):
    """Yields (row, bytes, name hint) or (row, None, ImageError) for each row, in order. Container members
    are extracted first, each container once, into ``tmpdir``; plain objects are fetched in threads."""
    fetcher = Fetcher(job.max_bytes)
    spilled: dict[int, tuple[str, str] | ImageError] = {}  # row position -> (temp path, name) or its error
    where: dict[int, str | ImageError] = {}
    groups: dict[tuple[str, str], list[tuple[int, locators.Locator]]] = {}
    for i, row in enumerate(rows):
        try:
            loc = locators.parse(row["uri"])
            container = resolve_image_uri(loc.container, job.image_root, job.allow_outside_root)
        except ValueError as e:  # ImageError is one
            where[i] = e if isinstance(e, ImageError) else ImageError("bad_locator", str(e))
            continue
        if loc.kind == "object":
            where[i] = container
        else:
            groups.setdefault((loc.kind, container), []).append((i, loc))
    for (kind, container), members in groups.items():
        extract = _extract_tar if kind == locators.TAR else _extract_parquet
        spilled.update(extract(container, members, tmpdir, job.max_bytes))

    def fetch(i):
        target = where.get(i)
        if isinstance(target, ImageError):
            return target
        try:
            return fetcher.fetch(target)
        except ImageError as e:
            return e

    with ThreadPoolExecutor(FETCH_THREADS) as pool:
        in_flight: deque = deque()  # (row position, future): a bounded window, so a task holds few images
        objects = iter(i for i in range(len(rows)) if i not in spilled)
        for i, row in enumerate(rows):
            while len(in_flight) < 2 * FETCH_THREADS and (j := next(objects, None)) is not None:
                in_flight.append((j, pool.submit(fetch, j)))
            if in_flight and in_flight[0][0] == i:
                data, name = in_flight.popleft()[1].result(), where[i] if isinstance(where[i], str) else row["uri"]
            elif isinstance(spilled[i], ImageError):
                data = spilled[i]
            else:
                path, name = spilled[i]
                with open(path, "rb") as f:
                    data = f.read()
                os.remove(path)
            if isinstance(data, ImageError):
                yield row, None, data
            elif not data:
                yield row, None, ImageError("empty", f"{redact(row['uri'])} is empty")
            else:
                yield row, data, name


def _spill(tmpdir: str, data: bytes) -> str:
    path = os.path.join(tmpdir, uuid.uuid4().hex)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _extract_tar(shard: str, members: list, tmpdir: str, max_bytes: int) -> dict:
    """Streams a tar shard once, spilling the wanted members; stops at the last one wanted."""
    wanted: dict[str, list[int]] = {}
    for i, loc in members:
        wanted.setdefault(loc.member, []).append(i)
    out = {}
    try:
        with fsspec.open(shard, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if info.name not in wanted:
                    continue
                positions = wanted.pop(info.name)
                if not info.isfile():
                    err = ImageError("missing", f"{info.name} in {redact(shard)} is not a file")
                elif info.size > max_bytes:
                    err = ImageError("too_large", f"{info.name} in {redact(shard)} is {info.size} bytes, over the limit of {max_bytes}")
                else:
                    data = tar.extractfile(info).read()
                    err = None
                for i in positions:  # a member two rows name gets a copy each (each is removed once read)
                    out[i] = err or (_spill(tmpdir, data), info.name)
                if not wanted:
                    break
    except Exception as e:  # noqa: BLE001 - a missing or corrupt shard, a store's error: its rows fail, not the export
        return {i: out.get(i, _container_error(e, "tar shard", shard)) for i, _ in members}
    for name, positions in wanted.items():
        for i in positions:
            out[i] = ImageError("missing", f"no member {name} in {redact(shard)}")
    return out


def _extract_parquet(file_uri: str, members: list, tmpdir: str, max_bytes: int) -> dict:
    """Reads the wanted cells of a Parquet file: only their column and the row groups that hold them."""
    out = {}
    try:
        with fsspec.open(file_uri, "rb") as f:
            pf = pq.ParquetFile(f)
            starts, total = [], 0
            for g in range(pf.metadata.num_row_groups):
                starts.append(total)
                total += pf.metadata.row_group(g).num_rows
            by_group: dict[tuple[int, str], list[tuple[int, int]]] = {}
            for i, loc in members:
                if loc.column not in pf.schema_arrow.names:
                    out[i] = ImageError("missing", f"{redact(file_uri)} has no column {loc.column!r}")
                elif loc.row >= total:
                    out[i] = ImageError("missing", f"{redact(file_uri)} has {total} rows, no row {loc.row}")
                else:
                    g = max(n for n, s in enumerate(starts) if s <= loc.row)
                    by_group.setdefault((g, loc.column), []).append((i, loc.row - starts[g]))
            for (g, column), cells in sorted(by_group.items()):
                values = pf.read_row_group(g, columns=[column])[column]
                for i, offset in cells:
                    out[i] = _cell(values[offset].as_py(), file_uri, column, starts[g] + offset, tmpdir, max_bytes)
    except Exception as e:  # noqa: BLE001
        return {i: out.get(i, _container_error(e, "Parquet file", file_uri)) for i, _ in members}
    return out


def _container_error(e: Exception, what: str, uri: str) -> ImageError:
    if isinstance(e, FileNotFoundError):
        return ImageError("missing", f"no such {what}: {redact(uri)}")
    return ImageError("container", f"{type(e).__name__} reading {what} {redact(uri)}: {redact_text(str(e))[:200]}")


def _cell(value, file_uri, column, row, tmpdir, max_bytes):
    """An image cell: binary, or the datasets library's struct {bytes, path}."""
    name = None
    if isinstance(value, dict):
        value, name = value.get("bytes"), value.get("path")
    if value is None:
        return ImageError("missing", f"row {row} of {redact(file_uri)} has no bytes in {column!r}")
    if not isinstance(value, (bytes, bytearray)):
        return ImageError("not_image", f"column {column!r} of {redact(file_uri)} holds {type(value).__name__}, not bytes")
    if len(value) > max_bytes:
        return ImageError("too_large", f"row {row} of {redact(file_uri)} is {len(value)} bytes, over the limit of {max_bytes}")
    return _spill(tmpdir, bytes(value)), name


# -- writing a shard -----------------------------------------------------------------------------------------
def _json_value(value, float32: bool):
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return None
        if float32:  # a float32 score as written (0.3), not as the double nearest it (0.30000001192092896)
            return float(str(np.float32(value)))
    return value


def sample_json(row: dict, float32_columns=frozenset()) -> bytes:
    """A sample's ``.json``: every column of its kept row (timestamps as ISO text, NaN as null)."""
    doc = {k: _json_value(v, k in float32_columns) for k, v in row.items() if not k.startswith("_")}
    return json.dumps(doc, default=lambda v: v.isoformat() if hasattr(v, "isoformat") else str(v)).encode("utf-8")


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # no time stamp, owner or mode of this run: the same shard is the same bytes
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def publish(local_path: str, uri: str) -> None:
    """Puts a finished local file at ``uri`` whole: a rename on local disks (the temp file lies beside the
    target), one upload on an object store, which publishes the object only when it completes."""
    if is_remote(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        fs.put_file(local_path, path)
    else:
        os.replace(local_path, uri.split("://", 1)[1] if "://" in uri else uri)


def _local_temp(job: ExportJob, tmpdir: str, name: str) -> str:
    """Where a file is written before it is published: beside its target on a local disk (so the rename is
    atomic), else in the task's temporary directory. Local temp names start with ``.tmp-``."""
    if is_remote(job.output):
        return os.path.join(tmpdir, f"out-{uuid.uuid4().hex}")
    base = job.output.split("://", 1)[1] if "://" in job.output else job.output
    directory = os.path.join(base, posixpath.dirname(name))
    os.makedirs(directory, exist_ok=True)
    return os.path.join(directory, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(name)}")


def write_shard(job: ExportJob, index: int) -> dict:
    """Writes export shard ``index`` and then its record; returns the record."""
    import ray

    started = time.time()
    table = ray.get(job.rows[0])
    rows = table.slice(index * job.shard_size, job.shard_size).to_pylist()
    name = job.names[index]
    exported, nbytes, errors, written = 0, 0, [], []
    with tempfile.TemporaryDirectory(prefix="ma-agiqa-export-") as tmpdir:
        images = read_images(rows, job, tmpdir)
        if job.fmt == "files":
            for row, data, hint in images:
                if data is None:
                    errors.append(_error(row["image_id"], row["uri"], hint.kind, hint.message, name))
                    continue
                rel = f"{IMAGES_DIR}/{row['__key__']}.{image_extension(data, hint)}"
                tmp = _local_temp(job, tmpdir, rel)
                with open(tmp, "wb") as f:
                    f.write(data)
                publish(tmp, join_uri(job.output, rel))
                written.append(rel)
                exported, nbytes = exported + 1, nbytes + len(data)
        else:
            tmp = _local_temp(job, tmpdir, name)
            try:
                if job.fmt == "webdataset":
                    float32 = {f.name for f in table.schema if pa.types.is_float32(f.type)}
                    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                        for row, data, hint in images:
                            if data is None:
                                errors.append(_error(row["image_id"], row["uri"], hint.kind, hint.message, name))
                                continue
                            key = row["__key__"]
                            _tar_add(tar, f"{key}.{image_extension(data, hint)}", data)
                            _tar_add(tar, f"{key}.json", sample_json(row, float32))
                            exported, nbytes = exported + 1, nbytes + len(data)
                else:
                    exported, nbytes = _write_parquet_shard(tmp, table.schema, images, errors, name)
                publish(tmp, join_uri(job.output, name))
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    record = {"shard": name, "index": index, "rows": len(rows), "exported": exported, "bytes": nbytes,
              "errors": errors, "files": written, "seconds": round(time.time() - started, 3)}
    write_text(json.dumps(record), join_uri(job.output, f"{RECORDS_DIR}/{name}.json"))
    return record


IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def image_parquet_schema(kept_schema: pa.Schema) -> pa.Schema:
    """The Hugging Face layout: ``image`` struct {bytes, path} first, then the kept row's columns; the
    schema's ``huggingface`` metadata tells the datasets library that ``image`` is an Image feature."""
    fields = [pa.field("image", IMAGE_TYPE)] + [f for f in kept_schema if not f.name.startswith("_")]
    features = {"image": {"_type": "Image"}}
    return pa.schema(fields, metadata={b"huggingface": json.dumps({"info": {"features": features}}).encode()})


def _write_parquet_shard(tmp: str, kept_schema: pa.Schema, images, errors: list, name: str) -> tuple[int, int]:
    schema = image_parquet_schema(kept_schema)
    exported = nbytes = 0
    batch: list[dict] = []
    with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        def flush():
            writer.write_table(pa.Table.from_pylist(batch, schema=schema), row_group_size=PARQUET_ROW_GROUP)
            batch.clear()

        for row, data, hint in images:
            if data is None:
                errors.append(_error(row["image_id"], row["uri"], hint.kind, hint.message, name))
                continue
            batch.append({**row, "image": {"bytes": data, "path": f"{row['__key__']}.{image_extension(data, hint)}"}})
            exported, nbytes = exported + 1, nbytes + len(data)
            if len(batch) >= PARQUET_ROW_GROUP:
                flush()
        if batch or not exported:
            flush()
    return exported, nbytes


def write_text(text: str, uri: str) -> None:
    """A small file, whole: written to a temp file and renamed locally, one upload remotely."""
    if is_remote(uri):
        fs, path = fsspec.core.url_to_fs(uri)
        fs.pipe_file(path, text.encode("utf-8"))
        return
    path = uri.split("://", 1)[1] if "://" in uri else uri
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _write_shards(batch: pa.Table, job: ExportJob) -> pa.Table:
    """The Ray Data stage: one export shard per row of the batch; returns each shard's record as JSON."""
    records = []
    for i in batch["index"].to_pylist():
        try:
            records.append(write_shard(job, i))
        except storage_errors() as e:  # brought back as data: the driver raises it as one StorageFailure
            records.append({"storage_failed": f"{type(e).__name__}: {redact_text(str(e))[:300]}"})
    return pa.table({"record": [json.dumps(r) for r in records]})


# -- the run -------------------------------------------------------------------------------------------------
def _read_records(output: str) -> dict[str, dict]:
    fs, path = fsspec.core.url_to_fs(join_uri(output, RECORDS_DIR))
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        return {}
    records = {}
    for p in fs.ls(path, detail=False, refresh=True):
        if p.endswith(".json") and not posixpath.basename(p).startswith("."):
            record = json.loads(fs.cat_file(p))
            records[record["shard"]] = record
    return records


def _prepare_output(output: str, plan: dict) -> bool:
    """Checks the output and writes its plan. Returns whether a previous export of another plan was replaced.
    An output that is a file, or a non-empty directory that is not an export, is refused."""
    try:
        check_output_location(output, "--output")
    except OutputError as e:
        raise ExportError(str(e)) from None
    fs, path = fsspec.core.url_to_fs(output)
    fs.invalidate_cache(path)
    replaced = False
    if fs.isfile(path):
        raise ExportError(f"--output {redact(output)} is a file, not a directory")
    if fs.isdir(path):
        entries = fs.ls(path, detail=False, refresh=True)
        plan_path = posixpath.join(path, PLAN_FILE)
        if fs.isfile(plan_path):
            if json.loads(fs.cat_file(plan_path)) == plan:
                _remove_temp_files(output, fs, path)
                return False
            for entry in entries:  # another kept set or layout: the previous export is replaced whole
                fs.rm(entry, recursive=True)
            replaced = True
        elif entries:
            raise ExportError(f"--output {redact(output)} is a non-empty directory that holds no export ({PLAN_FILE})")
    write_text(json.dumps(plan, indent=2) + "\n", join_uri(output, PLAN_FILE))
    return replaced


def _remove_temp_files(output: str, fs, path: str) -> None:
    """The temp files of a killed local run (remote runs leave none: an upload is whole or absent)."""
    if is_remote(output):
        return
    for p in fs.find(path):
        if posixpath.basename(p).startswith(".tmp-"):
            fs.rm(p)


def run_export(kept: str, output: str, fmt: str, shard_size: int = DEFAULT_SHARD_SIZE, image_root: str | None = None,
               allow_outside_root: bool = False, max_bytes: int = DEFAULT_MAX_BYTES, num_cpus: float = 0.5,
               start_ray=None) -> dict:
    """Exports a kept set to ``output`` (see the module's docstring). ``start_ray`` is called once the
    options and the kept table have been checked and there are shards to write (else Ray Data starts a
    local Ray itself). Returns the summary, also written last to OUTPUT/_summary.json."""
    import ray
    import ray.data

    started = time.time()
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    if shard_size < 1:
        raise ExportError(f"--shard-size must be at least 1, got {shard_size}")
    table = read_kept(kept)
    if fmt == "parquet" and "image" in table.column_names:
        raise ExportError("the kept table has a column named 'image', which the parquet format uses for the image bytes")
    rows, plan_errors = plan_rows(table)
    n_shards = -(-len(rows) // shard_size)
    names = [shard_name(fmt, i) for i in range(n_shards)]
    plan = {"format": fmt, "shard_size": shard_size, "kept_rows": len(table), "rows_digest": table_digest(table),
            "image_root": image_root}
    replaced = _prepare_output(output, plan)
    done = _read_records(output)
    todo = [i for i, n in enumerate(names) if n not in done]

    if todo:
        if start_ray is not None:
            start_ray()
        job = ExportJob(output, fmt, shard_size, [ray.put(rows)], image_root, allow_outside_root, max_bytes, names)
        ds = ray.data.from_items([{"index": i} for i in todo], override_num_blocks=len(todo))
        results = ds.map_batches(_write_shards, fn_kwargs={"job": job}, batch_size=1, batch_format="pyarrow",
                                 num_cpus=num_cpus).take_all()
        records = [json.loads(r["record"]) for r in results]
        failed = [r["storage_failed"] for r in records if "storage_failed" in r]
        if failed:
            raise StorageFailure(f"{failed[0]} (writing {len(failed)} of {len(todo)} shards; the shards written are "
                                 "kept: run the same command again to complete the export)")
        for record in records:
            done[record["shard"]] = record
    records = [done[n] for n in names]
    errors = plan_errors + [e for r in records for e in r["errors"]]
    error_schema = pa.schema([(f, pa.string()) for f in ERROR_FIELDS])
    write_part_atomically(pa.Table.from_pylist(errors, schema=error_schema), output, ERRORS_FILE)
    if fmt == "files":
        _write_metadata(rows, records, output)
    by_kind: dict[str, int] = {}
    for e in errors:
        by_kind[e["kind"]] = by_kind.get(e["kind"], 0) + 1
    exported = sum(r["exported"] for r in records)
    elapsed = time.time() - started
    summary = {
        "kept": redact(kept), "output": redact(output), "format": fmt, "shard_size": shard_size,
        "kept_rows": len(table), "exported": exported, "errors": len(errors), "errors_by_kind": by_kind,
        "shards": n_shards, "shards_written": len(todo), "shards_already_done": n_shards - len(todo),
        "replaced_previous_export": replaced, "bytes": sum(r["bytes"] for r in records),
        "seconds": round(elapsed, 3), "rows_per_s": round(len(table) / elapsed, 2) if elapsed else 0.0,
    }
    write_text(json.dumps(summary, indent=2) + "\n", join_uri(output, SUMMARY_FILE))
    return summary


def _write_metadata(rows: pa.Table, records: list[dict], output: str) -> None:
    """The files format's one table: the exported rows, each with ``file_name`` (relative to the table)."""
    by_key = {posixpath.basename(f).rsplit(".", 1)[0]: f for r in records for f in r["files"]}
    keys = rows["__key__"].to_pylist()
    keep = [i for i, k in enumerate(keys) if k in by_key]
    table = rows.take(pa.array(keep, pa.int64()))
    table = table.append_column("file_name", pa.array([by_key[keys[i]] for i in keep], pa.string()))
    write_part_atomically(table.drop_columns(["__key__"]), output, METADATA_FILE)
