"""The driver's plan of a scoring run, made before Ray starts or a model loads: the input's every row read
and checked (a file that cannot be parsed stops the run here, with the file and line), each row's image_id,
which rows this run scores, and the JobSpec every step receives.

An input kind is an ``InputFiles``: its files, its read units, and how one unit becomes a table of rows
with a ``uri`` (and, if it names them, an ``id``). ``ManifestFiles`` reads manifests (Parquet, CSV, JSONL);
``scoring.inputs`` holds it and the other kinds (a folder of images, Parquet with image bytes, WebDataset shards),
which plan through ``plan_input`` the same way: the driver learns every row's id from ``plan`` (cheap: ids
and metadata, never image bytes), and Ray tasks ``read`` the same units again, rows in the same order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from ..errors import JobConfigError, OutputError
from ..manifests import ManifestError, image_ids
from ..schema import score_schema
from ..table_files import check_output_location
from ..uris import redact
from .inputs import ManifestFiles, open_input  # noqa: F401 - ManifestFiles: the manifest kind, planned here too
from .model_ref import ResolvedModel, resolve_model
from .request import ScoreRequest
from .steps import AssignIds, JobSpec

log = logging.getLogger("ma_agiqa.scoring")

DRIVER_ROWS = 1_000_000  # inputs up to this many rows are handed to Ray from the driver


def plan_request(request: ScoreRequest) -> tuple[ResolvedModel, "Manifest", JobSpec]:
    """Everything a run settles before Ray starts, cheapest check first: the options, the model (its config
    and whether it was trained, from its files), every input row, the columns, then the JobSpec (which can
    read the MLLM's files from its hub, so untrained heads are refused before it)."""
    request.check()
    model = resolve_model(request.model)
    manifest = plan_input(open_input(request), request.output, request.limit)
    columns = plan_columns(request, model, manifest.schema)
    model.check(request.allow_untrained)
    return model, manifest, job_spec(request, model, columns)


class InputFiles(Protocol):
    """An input of the job, as read units of rows. Planned in the driver (``plan``) and read again in Ray
    tasks (``read``) where the driver cannot or should not hold the rows: it must pickle."""

    uri: str  # as the user gave it
    files: list[str]  # the files it reads (--output may not hold one)
    units: list  # what one read task reads: a manifest file, a Parquet row group, a tar shard, a slice of a listing
    in_tasks: bool  # rows hold what only a Ray task should read (image bytes, sidecar prompts): never the driver's
    schema: pa.Schema | None  # the columns ``read`` gives, where ``plan`` gives fewer; None: plan's columns

    def plan(self, unit) -> pa.Table:
        """The unit's rows as the driver plans them: ``uri``, ``id`` if the kind names ids, and metadata."""

    def read(self, unit) -> pa.Table:
        """The unit's rows to score: ``plan``'s rows, in the same order, with all their columns (raising
        ManifestError when it cannot be used)."""


@dataclass
class Manifest:
    """The input as the driver planned it: every row's image_id and whether this run scores it, and the rows
    themselves when the driver holds them (else Ray tasks read the files again, a file each)."""

    source: InputFiles
    schema: pa.Schema
    ids: pa.ChunkedArray  # image_id of every row within --limit, one chunk per read unit
    score: np.ndarray  # bool per row: scored by this run (the first row of each id, not already in the table)
    repeated: int  # rows whose image_id an earlier row already has: scored once, at the first
    tables: list[pa.Table] | None = None  # the rows of each file, when the driver holds them

    @property
    def rows(self) -> int:
        return len(self.ids)

    def file_rows(self) -> list[int]:
        return [len(c) for c in self.ids.chunks]

    def skipped_by_file(self) -> dict[int, np.ndarray]:
        """Per read unit's index, the positions of its rows that this run does not score."""
        out, offset = {}, 0
        for i, n in enumerate(self.file_rows()):
            skip = np.flatnonzero(~self.score[offset:offset + n])
            if len(skip):
                out[i] = skip
            offset += n
        return out


def driver_rows(manifest: Manifest, spec: JobSpec) -> pa.Table:
    """The rows this run scores, from the tables the driver holds, with their ids and the columns the job
    carries."""
    return AssignIds(spec)(pa.concat_tables(manifest.tables, promote_options="permissive").filter(pa.array(manifest.score)))


def check_output(output: str, source: InputFiles) -> None:
    """--output must be a directory (or nothing yet), and never the input or a directory holding it."""
    import fsspec

    try:  # reachable, a directory (the score table) or nothing yet, and writable there
        check_output_location(output, "--output")
    except OutputError as e:
        raise JobConfigError(str(e)) from None
    fs, path = fsspec.core.url_to_fs(output)
    out = path.rstrip("/")
    for f in source.files:
        _, fpath = fsspec.core.url_to_fs(f)
        if fpath.rstrip("/") == out or fpath.startswith(out + "/"):
            raise JobConfigError(f"--output {redact(output)} holds the manifest {redact(f)}: choose another directory")
    if fsspec.core.url_to_fs(source.uri)[1].rstrip("/") == out:
        raise JobConfigError(f"--output {redact(output)} is the manifest itself: choose another directory")


def plan_input(source: InputFiles, output: str, limit: int | None = None) -> Manifest:
    """Plans every read unit of the input in the driver, cut at ``limit`` rows. Rows that repeat an earlier
    row's image_id are scored once (the first); the summary counts them. Past DRIVER_ROWS, and always for an
    input read in tasks, only the ids stay in the driver. Units of an input read in tasks are planned a few
    at a time in threads (their plan can mean reading a shard or hashing a row group's images), in order."""
    check_output(output, source)
    tables, ids, schema, total = ([] if not source.in_tasks else None), [], source.schema, 0
    for table in _planned(source, limit):
        if limit is not None:
            table = table.slice(0, max(0, limit - total))
        total += len(table)
        if source.schema is None:
            schema = table.schema if schema is None else pa.unify_schemas([schema, table.schema], promote_options="permissive")
        ids.append(pa.chunked_array([image_ids(table)], pa.string()).combine_chunks())
        if tables is not None:
            tables.append(table)
            if total > DRIVER_ROWS:
                tables = None
    if total == 0:
        raise ManifestError(f"manifest {redact(source.uri)} is empty: no rows" + (" within --limit" if limit == 0 else ""))
    all_ids = pa.chunked_array(ids, pa.string())
    positions = pa.table({"image_id": all_ids, "pos": pa.array(np.arange(total, dtype=np.int64))})
    first = positions.group_by("image_id").aggregate([("pos", "min")])["pos_min"].to_numpy()
    score = np.zeros(total, bool)
    score[first] = True
    return Manifest(source, schema, all_ids, score, int(total - len(first)), tables)


PLAN_THREADS = 4  # units of an input read in tasks planned at once in the driver (each holds one unit's data)


def _planned(source: InputFiles, limit: int | None):
    """Each unit's planned table, in order; a unit past ``limit`` rows is an empty table, never planned."""
    if not source.in_tasks:
        total = 0
        for unit in source.units:
            table = source.plan(unit) if limit is None or total < limit else None
            if table is None:
                break
            total += len(table)
            yield table
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(PLAN_THREADS) as pool:
        pending, units, total = deque(), iter(source.units), 0
        while True:
            while len(pending) < PLAN_THREADS and (unit := next(units, None)) is not None:
                pending.append(pool.submit(source.plan, unit))
            if not pending:
                return
            table = pending.popleft().result()
            total += len(table)
            yield table
            if limit is not None and total >= limit:
                for f in pending:
                    f.cancel()
                return


@dataclass(frozen=True)
class Columns:
    """The input columns a run carries: those copied into the score table, and the prompt's, if any."""

    keep: dict[str, pa.DataType]
    prompt: str | None


def plan_columns(request: ScoreRequest, model: ResolvedModel, schema: pa.Schema) -> Columns:
    """--keep-columns and --prompt-column against the input's columns and the model's experts (the config
    alone: nothing is downloaded)."""
    uses_prompt = any(e.source == "prompt" for e in model.config.moe.experts)
    prompt_column = "prompt" if request.prompt_column is None else request.prompt_column
    if prompt_column and prompt_column not in schema.names and (request.prompt_column is not None or uses_prompt):
        raise JobConfigError(
            f"--prompt-column {prompt_column!r}: the manifest has no such column (columns: {', '.join(schema.names)})"
            + ("; pass --prompt-column '' to score without prompts" if uses_prompt else "")
        )
    missing = [c for c in request.keep_columns if c not in schema.names]
    if missing:
        raise JobConfigError(f"--keep-columns names columns the manifest lacks: {missing} (columns: {', '.join(schema.names)})")
    keep = {c: schema.field(c).type for c in request.keep_columns}
    try:
        score_schema(model.config.expert_names, keep)
    except ValueError as e:  # a kept column named like a score table column
        raise JobConfigError(f"--keep-columns: {e}") from None
    return Columns(keep, prompt_column if uses_prompt and prompt_column else None)


def job_spec(request: ScoreRequest, model: ResolvedModel, columns: Columns) -> JobSpec:
    """What every step needs: the model's config, and how the MLLM's processor frames an image (read from
    its files: a hub model's are downloaded, so this comes after every check that needs no network)."""
    framing = None
    if model.config.semantic is not None:  # images leave decoding at the size the MLLM's processor uses
        from ..framing import Framing

        try:
            framing = Framing.of(model.config.semantic)
        except Exception as e:  # noqa: BLE001 - the actors frame each image themselves, as the library does
            log.warning(f"the MLLM's image-processor settings could not be read ({type(e).__name__}: {e}); "
                        "images go to its actors at up to max_image_side")
    return JobSpec(
        model=model.ref, config=model.config, semantic_framing=framing, image_root=request.image_root,
        allow_outside_root=request.allow_outside_root, keep_columns=columns.keep, keep_features=request.keep_features,
        prompt_column=columns.prompt, max_pixels=request.max_pixels, max_bytes=request.max_bytes,
        connect_timeout=request.connect_timeout, read_timeout=request.read_timeout, fetch_timeout=request.fetch_timeout,
    )
