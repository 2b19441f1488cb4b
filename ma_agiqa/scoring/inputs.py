"""The scoring job's input kinds, each a ``plan.InputFiles``, and ``open_input``, which picks the kind of a
request's input.

- ``ManifestFiles``: manifests (Parquet, CSV, JSONL) of image URIs, as before.
- ``ImageFolder``: a folder or glob of images (``--images``, or ``--manifest DIR`` holding images and no
  manifest). ``id`` = the path relative to the root, ``uri`` = the image's URI. Listed once in the driver
  (one fsspec ``find``/``glob``: no per-image stat); prompts from sidecars (``a.txt``, or a field of
  ``a.json``, found in the same listing) or, with ``--prompt-from metadata``, from a PNG's text chunks, read
  in the read tasks (a task per READ_SLICE images).
- ``ParquetImages``: Parquet files whose ``--image-column`` holds the images (struct {bytes, path} as the
  Hugging Face datasets library writes it, or plain binary). A read task per row group; ``uri`` =
  ``parquet://<column>/<row>::<file>``; ``id`` = ``--id-column``, else ``stable_id``'s length of the SHA-1 of
  the image bytes. The bytes go from the read task to decoding and never into the score table.
- ``WebDatasetShards``: tar shards (a file, a directory, a glob or a brace pattern). A read task per shard;
  one row per sample key; ``uri`` = ``tar://<image member>::<shard>``; ``id`` = the sample's json ``uid`` or
  ``key``, else ``<shard>/<key>`` (the shard's path relative to the root, without ``.tar``).

Planning: the driver needs every row's id before Ray starts (repeated ids are counted and scored once, and
resume skips the ids the table holds), so each kind's ``plan`` gives ids without image bytes reaching the
driver: a listing (folders); with ``--id-column``, that column alone by column projection; without it, the
image column's bytes of one row group at a time, hashed and dropped (the driver reads the images once: give
``--id-column`` for large corpora); a shard streamed once, keeping only its .txt/.json members (tar is a
stream: the driver reads the shards once; on a local disk that is cheap, on an object store it is a second
download of the input). Units are planned PLAN_THREADS at a time. The read tasks then read the same units
and give the same rows in the same order, and the rows the plan does not score are dropped there.

Where Ray Data's own readers did not fit (Ray 2.60): ``read_webdataset`` fails the dataset on a corrupt or
truncated shard (no per-sample error rows), drops samples it cannot decode, and gives no member names for our
``tar://`` locators; ``read_parquet`` gives no row positions within a file (our ``parquet://`` locators and
the driver's plan need them) and may merge or split row groups across blocks. Both also leave ids to be
found after reading, too late for the driver's plan. So the read tasks are ours (``steps.ReadInputFiles``).
"""
from __future__ import annotations

import hashlib
import json
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from .. import locators
from ..errors import JobConfigError
from ..manifests import MANIFEST_SUFFIXES, ManifestError, check_uris, expand_manifest, id_text, read_manifest_file
from ..sources import GLOB_CHARS, IMAGE_SUFFIXES, expand_braces, full_uri, has_braces, metadata_prompt, png_text, suffix, tar_samples
from ..uris import redact, redact_text, scheme_of
from .steps import BYTES, READ_ERROR


@dataclass(frozen=True)
class ManifestFiles:
    """A manifest: one file, a directory or a glob of Parquet, CSV or JSONL files of one format. The driver
    holds its rows (up to DRIVER_ROWS)."""

    uri: str
    files: list[str]
    fmt: str
    in_tasks = False
    schema = None

    @classmethod
    def open(cls, uri: str) -> "ManifestFiles":
        files, fmt = expand_manifest(uri)
        return cls(uri, files, fmt)

    @property
    def units(self) -> list[str]:
        return self.files

    def read(self, file: str) -> pa.Table:
        table = read_manifest_file(file, self.fmt)
        if not table.column_names:  # no header, or only blank lines: say so, not "no 'uri' column (columns: )"
            raise ManifestError(f"manifest file {redact(file)} is empty (no header and no rows)")
        if "uri" not in table.column_names:
            raise ManifestError(f"manifest file {redact(file)} has no 'uri' column (columns: {', '.join(table.column_names)})")
        check_uris(table, file)  # a file of URIs the job cannot read at all stops here, not as error rows
        return table

    plan = read


READ_SLICE = 1000  # images of a folder per read task
JSON_PROMPT_FIELDS = ("prompt", "caption")  # a sidecar .json's prompt field, unless --prompt-column names one
SIDECARS = ("txt", "json")


def open_input(request) -> "ManifestFiles | ImageFolder | ParquetImages | WebDatasetShards":
    """The input a ScoreRequest names. ``input_kind`` "images" is a folder or glob of images; an
    ``image_column`` means Parquet with image bytes; else the URI says: ``.tar`` files (a file, a directory
    of them, a glob, a brace pattern) are WebDataset shards; a directory or glob of images with no manifest
    file (a ``.json`` beside an image of its stem is its sidecar, not a manifest) is a folder of images; else
    a manifest, as before."""
    uri, kind = request.manifest, request.input_kind
    if request.image_column:
        return ParquetImages.open(uri, request.image_column, request.id_column)
    if request.id_column:
        raise JobConfigError("--id-column names the id column of Parquet with image bytes: give --image-column too")
    if kind == "images":
        return ImageFolder.open(uri, request.prompt_column, request.prompt_from)
    if has_braces(uri) or uri.rstrip("/").lower().endswith(".tar"):
        return WebDatasetShards.open(uri, request.max_bytes)
    listed = _listing(uri)
    if listed is None:
        return ManifestFiles.open(uri)
    protocol, root, paths = listed
    images = [p for p in paths if suffix(p) in IMAGE_SUFFIXES]
    stems = {posixpath.splitext(p)[0] for p in images}
    manifests = [p for p in paths if any(p.lower().endswith(s) for s in MANIFEST_SUFFIXES)
                 and not (suffix(p) in SIDECARS and posixpath.splitext(p)[0] in stems)]
    if manifests or not paths:
        return ManifestFiles.open(uri)
    if any(suffix(p) == "tar" for p in paths) and not images:
        return WebDatasetShards(uri, full_uri(protocol, root), [full_uri(protocol, p) for p in paths if suffix(p) == "tar"],
                                request.max_bytes)
    if images:
        return ImageFolder.from_listing(uri, protocol, root, paths, request.prompt_column, request.prompt_from)
    return ManifestFiles.open(uri)


def _listing(uri: str):
    """(protocol, root path, every file's path) of a directory or a glob, listed once; None for one file
    (or nothing there: the manifest reader says so)."""
    fs, path = fsspec.core.url_to_fs(uri)
    protocol = scheme_of(uri)
    try:
        if fs.exists(path):
            if not fs.isdir(path):
                return None
            root = path.rstrip("/")
            paths = fs.find(root)
        elif any(c in path for c in GLOB_CHARS):
            root = _glob_root(path)
            paths = fs.glob(path, detail=True)
            paths = [p for p, info in paths.items() if info.get("type") != "directory"]
        else:
            return None
    except Exception as e:  # noqa: BLE001
        raise ManifestError(f"cannot list {redact(uri)}: {type(e).__name__}: {redact_text(str(e))[:300]}") from None
    visible = [p for p in sorted(paths) if not any(part.startswith((".", "_")) for part in _relative(p, root).split("/"))]
    return protocol, root, visible


def _glob_root(pattern: str) -> str:
    """The directory a glob's matches lie under: its path up to the first component with a glob character."""
    parts = pattern.split("/")
    head = []
    for part in parts[:-1]:
        if any(c in part for c in GLOB_CHARS):
            break
        head.append(part)
    return "/".join(head)


def _relative(path: str, root: str) -> str:
    root = root.rstrip("/")
    return path[len(root) + 1:] if root and path.startswith(root + "/") else path.lstrip("/")


# -- a folder of images ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageFolder:
    """Images listed once, each a row; prompts read in the read tasks from sidecars or PNG metadata."""

    uri: str
    entries: tuple  # (uri, id, txt sidecar uri or None, json sidecar uri or None) per image, in path order
    prompt_column: str | None  # the column the prompt lands in (None: no prompts to read)
    json_fields: tuple  # the sidecar .json fields tried for the prompt, in order
    metadata: bool  # --prompt-from metadata

    @classmethod
    def open(cls, uri: str, prompt_column: str | None = None, prompt_from: str = "sidecar") -> "ImageFolder":
        listed = _listing(uri)
        if listed is None:
            fs, path = fsspec.core.url_to_fs(uri)
            if not fs.exists(path):
                raise ManifestError(f"--images {redact(uri)} matches nothing")
            listed = (scheme_of(uri), posixpath.dirname(path), [path])
        protocol, root, paths = listed
        return cls.from_listing(uri, protocol, root, paths, prompt_column, prompt_from)

    @classmethod
    def from_listing(cls, uri, protocol, root, paths, prompt_column, prompt_from) -> "ImageFolder":
        present = set(paths)
        if any(c in uri for c in GLOB_CHARS):  # the sidecars of a glob's images need not match it (*.jpg)
            fs, _ = fsspec.core.url_to_fs(uri)
            present |= set(fs.glob(posixpath.join(root, "**", "*.txt")) + fs.glob(posixpath.join(root, "**", "*.json")))
        entries = []
        for p in paths:
            if suffix(p) not in IMAGE_SUFFIXES:
                continue
            stem = posixpath.splitext(p)[0]
            side = [full_uri(protocol, f"{stem}.{s}") if f"{stem}.{s}" in present else None for s in SIDECARS]
            entries.append((full_uri(protocol, p), _relative(p, root), *side))
        if not entries:
            raise ManifestError(f"{redact(uri)} holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
        metadata = prompt_from == "metadata"
        has_sidecars = any(e[2] or e[3] for e in entries)
        column = None
        if prompt_column != "" and (metadata or has_sidecars):
            column = prompt_column or "prompt"
        fields = (prompt_column,) if prompt_column else JSON_PROMPT_FIELDS
        return cls(uri, tuple(entries), column, fields, metadata)

    @property
    def files(self) -> list[str]:
        return [e[0] for e in self.entries]

    @property
    def units(self) -> list[tuple[int, int]]:
        return [(i, min(i + READ_SLICE, len(self.entries))) for i in range(0, len(self.entries), READ_SLICE)]

    @property
    def in_tasks(self) -> bool:
        return self.prompt_column is not None  # prompts are read per image: in tasks, never in the driver

    schema = None

    def plan(self, unit) -> pa.Table:
        rows = self.entries[unit[0]:unit[1]]
        columns = {"uri": pa.array([e[0] for e in rows], pa.string()), "id": pa.array([e[1] for e in rows], pa.string())}
        if self.prompt_column:
            columns[self.prompt_column] = pa.nulls(len(rows), pa.string())
        return pa.table(columns)

    def read(self, unit) -> pa.Table:
        table = self.plan(unit)
        if self.prompt_column:
            with ThreadPoolExecutor(8) as pool:
                prompts = list(pool.map(self.prompt, self.entries[unit[0]:unit[1]]))
            table = table.set_column(table.column_names.index(self.prompt_column), self.prompt_column,
                                     pa.array(prompts, pa.string()))
        return table

    def prompt(self, entry) -> str | None:
        """An image's prompt: its PNG metadata (with --prompt-from metadata), else its .txt sidecar, else
        the first of ``json_fields`` its .json sidecar has. None where it has none or they cannot be read
        (a prompt is metadata: its absence is no error of the row)."""
        uri, _, txt, js = entry
        try:
            if self.metadata and suffix(uri) == "png":
                with fsspec.open(uri, "rb") as f:
                    found = metadata_prompt(png_text(f))
                if found:
                    return found
            if txt:
                with fsspec.open(txt, "rb") as f:
                    return f.read(1 << 20).decode("utf-8", "replace").strip() or None
            if js:
                with fsspec.open(js, "rb") as f:
                    doc = json.loads(f.read(1 << 22))
                for name in self.json_fields if isinstance(doc, dict) else ():
                    if isinstance(doc.get(name), str) and doc[name].strip():
                        return doc[name].strip()
        except Exception:  # noqa: BLE001 - an unreadable sidecar or header: no prompt
            return None
        return None


# -- Parquet with image bytes ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ParquetImages:
    """Parquet files with the images in a column; a read unit per row group: (file, row group, first row)."""

    uri: str
    files: list[str]
    units: list  # (file uri, row group, index of its first row in the file)
    image_column: str
    id_column: str | None
    schema: pa.Schema  # what read() gives: the file's columns but the image one, with uri and id
    in_tasks = True

    @classmethod
    def open(cls, uri: str, image_column: str, id_column: str | None) -> "ParquetImages":
        files, fmt = expand_manifest(uri)
        if fmt != "parquet":
            raise ManifestError(f"--image-column reads Parquet files; {redact(uri)} holds {fmt} files")
        units, schema = [], None
        with ThreadPoolExecutor(8) as pool:
            footers = list(pool.map(_footer, files))
        for file, (meta, file_schema) in zip(files, footers):
            if image_column not in file_schema.names:
                raise ManifestError(f"{redact(file)} has no column {image_column!r} (--image-column; columns: {', '.join(file_schema.names)})")
            kind = file_schema.field(image_column).type
            if not (_is_binary(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0)):
                raise ManifestError(f"column {image_column!r} of {redact(file)} is {kind}, not image bytes (binary, or struct with 'bytes')")
            if id_column and id_column not in file_schema.names:
                raise ManifestError(f"{redact(file)} has no column {id_column!r} (--id-column)")
            first = 0
            for g in range(meta.num_row_groups):
                n = meta.row_group(g).num_rows
                if n:
                    units.append((file, g, first))
                first += n
            schema = file_schema if schema is None else pa.unify_schemas([schema, file_schema], promote_options="permissive")
        others = [f for f in schema if f.name not in (image_column, "uri", "id")]
        schema = pa.schema([pa.field("uri", pa.string()), pa.field("id", pa.string()), *others])
        return cls(uri, files, units, image_column, id_column, schema)

    def _rows(self, unit, columns: list[str]) -> pa.Table:
        file, group, _ = unit
        with fsspec.open(file, "rb") as f:
            return pq.ParquetFile(f).read_row_group(group, columns=columns)

    def _cells(self, table: pa.Table) -> pa.Array:
        import pyarrow.compute as pc

        values = table[self.image_column].combine_chunks()
        return pc.struct_field(values, "bytes") if pa.types.is_struct(values.type) else values

    def _ids_and_uris(self, unit, table: pa.Table, cells) -> tuple[pa.Array, pa.Array]:
        file, _, first = unit
        if self.id_column:
            ids = id_text(table[self.id_column])
        else:
            ids = pa.array([None if b is None else hashlib.sha1(b).hexdigest()[:20] for b in _buffers(cells)], pa.string())
        uris = pa.array([locators.parquet_cell(file, self.image_column, first + i) for i in range(len(table))], pa.string())
        return ids, uris

    def plan(self, unit) -> pa.Table:
        """Ids from the id column alone, else from the image bytes, a row group at a time."""
        table = self._rows(unit, [self.id_column] if self.id_column else [self.image_column])
        ids, uris = self._ids_and_uris(unit, table, None if self.id_column else self._cells(table))
        return pa.table({"uri": uris, "id": ids})

    def read(self, unit) -> pa.Table:
        table = self._rows(unit, None)
        cells = self._cells(table)
        ids, uris = self._ids_and_uris(unit, table, cells)
        errors = pa.array([f"missing: row {unit[2] + i} of {redact(unit[0])} has no bytes in {self.image_column!r}"
                           if null else None for i, null in enumerate(cells.is_null().to_pylist())], pa.string())
        rest = table.drop_columns([c for c in (self.image_column, "uri", "id") if c in table.column_names])
        out = pa.table({"uri": uris, "id": ids, **{c: rest[c] for c in rest.column_names}})
        return out.append_column(BYTES, cells.cast(pa.large_binary())).append_column(READ_ERROR, errors)


def _footer(file: str):
    try:
        with fsspec.open(file, "rb") as f:
            pf = pq.ParquetFile(f)
            return pf.metadata, pf.schema_arrow
    except Exception as e:  # noqa: BLE001
        raise ManifestError(f"cannot read Parquet file {redact(file)}: {type(e).__name__}: {redact_text(str(e))[:300]}") from None


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _buffers(cells) -> list:
    """Each cell's bytes as an Arrow buffer (not copied), or None."""
    return [c.as_buffer() if c.is_valid else None for c in cells]


# -- WebDataset shards ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WebDatasetShards:
    """Tar shards, a read unit each; a row per sample."""

    uri: str
    root: str  # shard names in ids are relative to it
    files: list[str]
    max_bytes: int = 64 << 20
    in_tasks = True
    schema = None

    @classmethod
    def open(cls, uri: str, max_bytes: int = 64 << 20) -> "WebDatasetShards":
        if has_braces(uri):
            shards = expand_braces(uri)
            return cls(uri, _common_dir(shards), shards, max_bytes)
        listed = _listing(uri)
        if listed is None:
            fs, path = fsspec.core.url_to_fs(uri)
            if not fs.exists(path):
                raise ManifestError(f"shard {redact(uri)} does not exist")
            return cls(uri, posixpath.dirname(uri.rstrip("/")), [uri], max_bytes)
        protocol, root, paths = listed
        shards = [full_uri(protocol, p) for p in paths if suffix(p) == "tar"]
        if not shards:
            raise ManifestError(f"{redact(uri)} holds no .tar shard")
        return cls(uri, full_uri(protocol, root), shards, max_bytes)

    @property
    def units(self) -> list[str]:
        return self.files

    def _name(self, shard: str) -> str:
        rel = _relative(shard, self.root) if self.root else posixpath.basename(shard)
        return rel[:-4] if rel.lower().endswith(".tar") else rel

    def _table(self, shard: str, keep_images: bool) -> pa.Table:
        rows, images = [], []
        name = self._name(shard)
        for s in tar_samples(shard, keep_images, self.max_bytes):
            if s.key is None:  # the shard could not be read (from this point on)
                rows.append({"uri": shard, "id": f"{name}#unreadable", "key": None, READ_ERROR: s.error})
                images.append(None)
                continue
            meta = {k: v if isinstance(v, str) or v is None else json.dumps(v) for k, v in s.json.items()
                    if k not in ("uri", "id", BYTES, READ_ERROR)}  # "key" is the sample's, below
            given = s.json.get("uid", s.json.get("key"))
            rows.append({
                **meta,
                "uri": locators.tar_member(shard, s.image_member or s.key),
                "id": str(given) if given not in (None, "") else f"{name}/{s.key}",
                "key": s.key, "txt": s.txt,
                "prompt": s.json.get("prompt") if isinstance(s.json.get("prompt"), str) else s.txt or (
                    s.json.get("caption") if isinstance(s.json.get("caption"), str) else None),
                READ_ERROR: s.error,
            })
            images.append(s.image)
        names = list(dict.fromkeys(["uri", "id", "key", "txt", "prompt", READ_ERROR, *(k for r in rows for k in r)]))
        # every column as text (a json number as written by json.dumps), so that shards' schemas agree
        table = pa.table({c: pa.array([r.get(c) for r in rows], pa.string()) for c in names})
        if keep_images:
            table = table.append_column(BYTES, pa.array(images, pa.large_binary()))
        else:
            table = table.drop_columns([READ_ERROR]) if READ_ERROR in table.column_names else table
        return table

    def plan(self, shard: str) -> pa.Table:
        return self._table(shard, keep_images=False)

    def read(self, shard: str) -> pa.Table:
        return self._table(shard, keep_images=True)


def _common_dir(uris: list[str]) -> str:
    common = posixpath.commonpath([u.split("://", 1)[-1] for u in uris]) if len(uris) > 1 else posixpath.dirname(uris[0].split("://", 1)[-1])
    protocol = scheme_of(uris[0])
    return full_uri(protocol, common) if protocol else common
