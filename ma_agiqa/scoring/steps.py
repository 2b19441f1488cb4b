"""The scoring job's steps: small callables from one pyarrow table to the next, knowing nothing of the
executor. ``run.py`` runs them on Ray Data; the benchmark's plain loop runs the same ones in a ``for`` loop.

input units -> ReadInputFiles (large inputs, and inputs whose rows carry their images) -> AssignIds -> FetchDecode (CPU) -> SemanticFeatures (GPU)
-> ScoreRows (GPU) -> WriteParts -> summarise
(ScoreImages runs the two model steps in one actor, for clusters without GPUs.)

Every step keeps every row: a row that fails becomes status "error" with its reason and flows on.

torch and the image preprocessing are imported by the steps that use them: a worker that only writes parts
starts in a fraction of a second instead of importing torch.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..config import MAX_IMAGE_SIDE, ModelConfig
from ..errors import DEFAULT_MAX_PIXELS, ImageError, error_kind, storage_errors
from ..schema import STATUS_ERROR, STATUS_OK, feature_column, gate_column, score_schema
from ..fetch import CONNECT_TIMEOUT, DEFAULT_MAX_BYTES, FETCH_TIMEOUT, READ_TIMEOUT, Fetcher
from ..manifests import image_ids
from ..table_files import write_part_atomically
from ..uris import REMOTE_SCHEMES, redact, redact_text, resolve_image_uri, scheme_of

# Columns the steps add for each other; none reaches the score table.
PIXELS = "_quality_pixels"
SEM_PIXELS, SEM_H, SEM_W = "_semantic_pixels", "_semantic_h", "_semantic_w"
PROMPT = "_prompt"
FALLBACK = "_fallback"  # 1 on one row of each batch that a model stage had to score row by row
BYTES = "_image_bytes"  # the image itself, where the input's read task holds it (a Parquet cell, a tar member)
READ_ERROR = "_read_error"  # why the read task has no image for the row ("kind: message"): an error row
CARRIED = (BYTES, READ_ERROR)  # from the read task to FetchDecode, which drops them


@dataclass
class JobSpec:
    """What every step needs to know about the job; plain data, shipped to every worker. What the model
    decides (experts, views, prompts and their width) is read from its config, held here as the driver read
    it; the rest are the run's options."""

    model: str  # the reference each model actor loads (a remote checkpoint: fetched once per node)
    config: ModelConfig
    semantic_framing: object = None  # framing.Framing: pad to square and resize to the processor's side
    image_root: str | None = None
    keep_columns: dict[str, pa.DataType] = field(default_factory=dict)
    keep_features: bool = False
    prompt_column: str | None = None  # the manifest column that holds the generation prompt
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    allow_outside_root: bool = False
    fetch_threads: int = 8
    decode_slots: int = 2  # images decoded at once per process: bounds decode memory
    connect_timeout: float = CONNECT_TIMEOUT  # seconds, per remote request (fetch.Fetcher)
    read_timeout: float = READ_TIMEOUT
    fetch_timeout: float = FETCH_TIMEOUT  # seconds, per remote object, retries included
    # prompt name -> width of its vectors (empty without an MLLM): worked out once, where the spec is made (the
    # driver), as the width can mean reading the MLLM's config.json; it travels with the spec
    semantic_prompts: dict[str, int] = field(init=False)

    def __post_init__(self):
        semantic = self.config.semantic
        self.semantic_prompts = {name: semantic.hidden_size for name in semantic.prompts} if semantic is not None else {}

    @property
    def experts(self) -> list[str]:
        return self.config.expert_names

    @property
    def views(self):
        return self.config.quality.views

    @property
    def semantic_max_side(self) -> int:
        return self.config.semantic.max_image_side if self.config.semantic is not None else MAX_IMAGE_SIDE

    def decode_memory(self) -> int:
        """Bytes a process that fetches and decodes a batch can hold at once: every fetch thread's object at
        the --max-bytes limit, and every decode slot's image at the pixel limit (4 bytes a pixel, as RGBA)."""
        return self.fetch_threads * self.max_bytes + self.decode_slots * self.max_pixels * 4

    def output_schema(self) -> pa.Schema:
        return score_schema(self.experts, self.keep_columns, self.semantic_prompts if self.keep_features else None)


def _device(num_gpus: float, reporter=None) -> str:
    """"cuda" when Ray gave the actor a GPU. A GPU that torch cannot see (a driver or CUDA build mismatch on
    one node) stops the run with one line naming the node, unless the run allows CPU fallback: a 7B MLLM on
    CPU would turn hours into weeks without a word."""
    import torch

    if num_gpus <= 0:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    from .monitor import NO_CUDA, Reporter, node_name

    reporter = reporter or Reporter(None, "model")
    if not reporter.watch.allow_cpu_fallback:
        reporter.refuse(NO_CUDA, f"a {reporter.stage} model actor on {node_name()} was given {num_gpus:g} GPU by Ray "
                                 f"but torch sees no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                                 "fix the node's GPU driver, or pass --allow-cpu-fallback to run on its CPU")
    return "cpu"


def text_column(table: pa.Table, name: str) -> pa.ChunkedArray | pa.Array:
    """A column as strings; all nulls when the table lacks it."""
    return table[name].cast(pa.string()) if name in table.column_names else pa.nulls(len(table), pa.string())


class AssignIds:
    """Adds ``image_id`` (``image_ids``) and keeps only the columns the job uses (and CARRIED ones)."""

    def __init__(self, spec: JobSpec):
        self.spec = spec

    def __call__(self, table: pa.Table) -> pa.Table:
        columns = {"image_id": image_ids(table), "uri": text_column(table, "uri")}
        for name, typ in self.spec.keep_columns.items():  # a read unit may lack a column others have: nulls
            columns[name] = table[name].cast(typ) if name in table.column_names else pa.nulls(len(table), typ)
        if self.spec.prompt_column:
            columns[PROMPT] = text_column(table, self.spec.prompt_column)
        for name in CARRIED:
            if name in table.column_names:
                columns[name] = table[name]
        return pa.table(columns)


class ReadInputFiles:
    """A Ray task's share of an input the driver does not hold (too large, or its rows carry their images):
    its read units read with the input's reader, cut where the driver cut them (--limit), ids assigned, and
    the rows the driver decided not to score (repeats, already in the table) dropped."""

    def __init__(self, source, file_rows: list[int], skip: dict[int, np.ndarray], spec: JobSpec):
        self.source, self.file_rows, self.skip, self.assign = source, file_rows, skip, AssignIds(spec)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for index in batch["index"].to_pylist():
            table = self.source.read(self.source.units[index]).slice(0, self.file_rows[index])
            keep = np.ones(len(table), bool)
            keep[self.skip.get(index, [])] = False
            out.append(self.assign(table.filter(pa.array(keep))))
        return pa.concat_tables(out, promote_options="permissive")


class FetchDecode:
    """Reads the bytes of each row's image concurrently (unless the read task holds them: BYTES), decodes
    and preprocesses them with the library's one preprocessing; anything that fails for one row (or that
    the read task could not read: READ_ERROR) becomes that row's error. Fetches run in
    ``fetch_threads`` threads, decoding in at most ``decode_slots`` of them at once, so the memory a batch
    can take is bounded (``JobSpec.decode_memory``)."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.fetcher = Fetcher(spec.max_bytes, spec.connect_timeout, spec.read_timeout, spec.fetch_timeout)
        self.decoding = self.pool = None  # made in the worker: locks and threads do not travel to it

    def _where(self, uri):
        """(the URI to fetch, None) or (None, the row's error): what needs no I/O, or for a local file one
        stat, is settled in the calling thread; a missing file costs microseconds, not a thread hand-off."""
        try:
            full = resolve_image_uri(uri, self.spec.image_root, self.spec.allow_outside_root)
            if scheme_of(full) not in REMOTE_SCHEMES:
                self.fetcher.check_local(full)
            return full, None
        except ImageError as e:
            return None, f"{e.kind}: {e.message}"

    def _one(self, source):
        """``source``: the URI to fetch, or the image's bytes (a buffer) as the read task gave them."""
        from ..images import decode_image, shrink
        from ..preprocess import quality_pixels

        try:
            if isinstance(source, str):
                data = self.fetcher.fetch(source)
            elif len(source) > self.spec.max_bytes:
                raise ImageError("too_large", f"{len(source)} bytes, over the limit of {self.spec.max_bytes} (--max-bytes)")
            else:
                data = source.to_pybytes()
            with self.decoding:
                img = decode_image(data, self.spec.max_pixels)
                del data
                width, height = img.size
                pixels = quality_pixels(img, self.spec.views).numpy().tobytes()
                sem = None
                if self.spec.semantic_prompts:
                    framing = self.spec.semantic_framing
                    small = framing(img) if framing is not None else shrink(img, self.spec.semantic_max_side)
                    sem = (np.asarray(small, dtype=np.uint8).tobytes(), small.size[1], small.size[0])
            return (width, height, pixels, sem), None
        except ImageError as e:
            return None, f"{e.kind}: {e.message}"
        except MemoryError:
            return None, "oom: out of memory while decoding"
        except Exception as e:  # noqa: BLE001 - never lose a row to an unexpected decoder or resize failure
            return None, f"decode: {type(e).__name__}: {redact_text(str(e))[:200]}"

    def __call__(self, table: pa.Table) -> pa.Table:
        if self.pool is None:  # one pool per process, not one per batch
            import threading

            self.decoding = threading.BoundedSemaphore(self.spec.decode_slots)
            self.pool = ThreadPoolExecutor(max_workers=self.spec.fetch_threads)
        given = _buffers(table[BYTES]) if BYTES in table.column_names else [None] * len(table)
        where = [(None, error) if error else (data, None) if data is not None else self._where(uri)
                 for uri, data, error in zip(table["uri"].to_pylist(), given, _texts(table, READ_ERROR))]
        del given
        table = table.drop_columns([c for c in CARRIED if c in table.column_names])
        fetched = iter(self.pool.map(self._one, [full for full, _ in where if full is not None]))
        results = [next(fetched) if full is not None else (None, error) for full, error in where]
        ok = [r is not None for r, _ in results]
        table = table.append_column("status", pa.array([STATUS_OK if o else STATUS_ERROR for o in ok]))
        table = table.append_column("error", pa.array([e for _, e in results], pa.string()))
        table = table.append_column("width", pa.array([r[0] if r else None for r, _ in results], pa.int32()))
        table = table.append_column("height", pa.array([r[1] if r else None for r, _ in results], pa.int32()))
        table = table.append_column(PIXELS, pa.array([r[2] if r else None for r, _ in results], pa.large_binary()))
        table = table.append_column(FALLBACK, pa.array(np.zeros(len(table), np.int8)))
        if self.spec.semantic_prompts:
            table = table.append_column(SEM_PIXELS, pa.array([r[3][0] if r else None for r, _ in results], pa.large_binary()))
            table = table.append_column(SEM_H, pa.array([r[3][1] if r else None for r, _ in results], pa.int32()))
            table = table.append_column(SEM_W, pa.array([r[3][2] if r else None for r, _ in results], pa.int32()))
        return table


def _buffers(column) -> list:
    """Each cell of a binary column as an Arrow buffer (not copied), or None."""
    return [c.as_buffer() if c.is_valid else None for c in column]


def _texts(table: pa.Table, name: str) -> list:
    return table[name].to_pylist() if name in table.column_names else [None] * len(table)


def model_error(stage: str, e: BaseException) -> str:
    """A model stage's failure on one row: ``oom`` when memory ran out, else ``model`` (both transient)."""
    text = f"{type(e).__name__}: {redact_text(str(e))[:200]}"
    if isinstance(e, MemoryError) or "out of memory" in str(e).lower() or type(e).__name__ == "OutOfMemoryError":
        return f"oom: {stage}: {text}"
    return f"model: {stage}: {text}"


def _mark_fallback(table: pa.Table) -> pa.Table:
    if FALLBACK not in table.column_names or len(table) == 0:
        return table
    flags = np.zeros(len(table), np.int8)
    flags[0] = 1
    return table.set_column(table.column_names.index(FALLBACK), FALLBACK, pa.array(flags))


def _ok_rows(table: pa.Table) -> np.ndarray:
    return np.flatnonzero(pc.equal(table["status"], STATUS_OK).to_numpy(zero_copy_only=False))


def _report(reporter, table: pa.Table, model_rows: np.ndarray, failed: int, fell_back: bool, last_error, final: bool):
    """Tells the run's monitor how a model stage's batch went (``failed`` of its ``model_rows`` failed in the
    model); raises RunStopped once the run has a reason to stop."""
    errors = len(table) - len(_ok_rows(table))
    whole = fell_back and len(model_rows) > 0 and failed == len(model_rows)
    reporter.batch(len(table), errors, whole, last_error, final=final)


def _set_errors(table: pa.Table, rows: list[int], message: str) -> pa.Table:
    status = table["status"].to_pylist()
    errors = table["error"].to_pylist()
    for i in rows:
        status[i], errors[i] = STATUS_ERROR, message
    table = table.set_column(table.column_names.index("status"), "status", pa.array(status))
    return table.set_column(table.column_names.index("error"), "error", pa.array(errors, pa.string()))


class SemanticFeatures:
    """GPU stage: the frozen MLLM's vectors for every ok row (a model actor; the model loads once)."""

    def __init__(self, spec: JobSpec, num_gpus: float = 0.0, threads: int | None = None, watch=None, final: bool = False):
        import torch
        from PIL import Image

        from ..model import load_semantic
        from .monitor import Reporter

        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.image = Image
        self.reporter, self.final = Reporter(watch, "semantic"), final
        self.extractor = load_semantic(spec.model, _device(num_gpus, self.reporter))
        self.reporter.device(str(self.extractor.device), self.extractor.dtype)

    def __call__(self, table: pa.Table) -> pa.Table:
        self.reporter.check()
        rows = _ok_rows(table)
        feats = {name: np.zeros((len(table), dim), np.float32) for name, dim in self.spec.semantic_prompts.items()}
        if len(rows):
            pix, hs, ws = table[SEM_PIXELS], table[SEM_H], table[SEM_W]
            images = [
                self.image.fromarray(np.frombuffer(pix[i].as_py(), np.uint8).reshape(hs[i].as_py(), ws[i].as_py(), 3))
                for i in rows
            ]
            failed, fell_back = [], False
            try:
                out = self.extractor(images)
                for name in feats:
                    feats[name][rows] = out[name].cpu().numpy()
            except Exception:  # noqa: BLE001 - isolate the row that breaks the model, keep the others
                table, fell_back = _mark_fallback(table), True
                for i, img in zip(rows, images):
                    try:
                        one = self.extractor([img])
                        for name in feats:
                            feats[name][i] = one[name][0].cpu().numpy()
                    except Exception as e:  # noqa: BLE001
                        failed.append((int(i), model_error("semantic", e)))
            for i, message in failed:
                table = _set_errors(table, [i], message)
            _report(self.reporter, table, rows, len(failed), fell_back, failed[-1][1] if failed else None, self.final)
        else:
            _report(self.reporter, table, rows, 0, False, None, self.final)
        table = table.drop_columns([SEM_PIXELS, SEM_H, SEM_W])
        for name, arr in feats.items():
            flat = pa.array(arr.reshape(-1), pa.float32())
            table = table.append_column(feature_column(name), pa.FixedSizeListArray.from_arrays(flat, arr.shape[1]))
        return table


class ScoreRows:
    """GPU stage: MANIQA + MoE (+ the prompt encoder) on every ok row; emits rows of the score table."""

    def __init__(self, spec: JobSpec, num_gpus: float = 0.0, threads: int | None = None, watch=None):
        import torch

        from ..model import create_model
        from .monitor import Reporter

        if threads:
            torch.set_num_threads(threads)
        self.spec = spec
        self.reporter = Reporter(watch, "quality")
        self.device = _device(num_gpus, self.reporter)
        # On CPU an inference-only form of a CNN backbone (BatchNorm folded, activation fused): about 2x.
        self.model = create_model(spec.model, device=self.device, with_semantic=False).optimise_for_inference()
        self.reporter.device(self.device, next(self.model.parameters()).dtype)
        self.schema = spec.output_schema()
        self.model_id = self.model.model_id  # once: working it out hashes the weights
        self.views_shape = (-1, 3, spec.views.size, spec.views.size)

    def _score(self, table: pa.Table, rows: np.ndarray):
        import torch

        from ..preprocess import normalize

        pix = table[PIXELS]
        views = np.stack([np.frombuffer(pix[i].as_py(), np.uint8).reshape(self.views_shape) for i in rows])
        views = normalize(torch.from_numpy(views).to(self.device), self.spec.views)
        semantic = {
            name: torch.from_numpy(
                table[feature_column(name)].combine_chunks().flatten().to_numpy().reshape(len(table), -1)[rows]
            ).to(self.device)
            for name in self.spec.semantic_prompts
        }
        emb = present = None
        with torch.inference_mode():
            if self.model.prompt_encoder is not None:
                prompts = table[PROMPT].to_pylist() if PROMPT in table.column_names else [None] * len(table)
                emb, present = self.model.prompt_encoder([prompts[i] for i in rows])
            score, gates = self.model(views, semantic, emb, present)
        return score.float().cpu().numpy(), gates.float().cpu().numpy()

    def __call__(self, table: pa.Table) -> pa.Table:
        self.reporter.check()
        n = len(table)
        scores = np.full(n, np.nan, np.float32)
        gates = np.full((n, len(self.spec.experts)), np.nan, np.float32)
        rows = _ok_rows(table)
        failed, fell_back, last_error = 0, False, None
        if len(rows):
            try:
                scores[rows], gates[rows] = self._score(table, rows)
            except Exception:  # noqa: BLE001 - isolate the failing row
                table, fell_back = _mark_fallback(table), True
                for i in rows:
                    try:
                        s, g = self._score(table, np.array([i]))
                        scores[i], gates[i] = s[0], g[0]
                    except Exception as e:  # noqa: BLE001
                        failed, last_error = failed + 1, model_error("quality", e)
                        table = _set_errors(table, [int(i)], last_error)
            ok_now = pc.equal(table["status"], STATUS_OK).to_numpy(zero_copy_only=False)
            bad = [int(i) for i in rows if ok_now[i] and not (np.isfinite(scores[i]) and np.isfinite(gates[i]).all())]
            if bad:
                table = _set_errors(table, bad, "nonfinite: the model gave a non-finite score or gate")
        _report(self.reporter, table, rows, failed, fell_back, last_error, final=True)
        ok = pc.equal(table["status"], STATUS_OK).to_numpy(zero_copy_only=False)
        columns = {
            "image_id": table["image_id"],
            "uri": table["uri"],
            "score": pa.array(np.where(ok, scores, 0), pa.float32(), mask=~ok),
        }
        for j, expert in enumerate(self.spec.experts):
            columns[gate_column(expert)] = pa.array(np.where(ok, gates[:, j], 0), pa.float32(), mask=~ok)
        now = datetime.now(timezone.utc)
        columns.update(
            status=table["status"], error=table["error"], width=table["width"], height=table["height"],
            model=pa.array([self.model_id] * n, pa.string()),
            scored_at=pa.array([now] * n, pa.timestamp("us", tz="UTC")),
        )
        for name in self.spec.keep_columns:
            columns[name] = table[name]
        fallback = table[FALLBACK] if FALLBACK in table.column_names else pa.array(np.zeros(n, np.int8))
        if self.spec.keep_features:
            for name, dim in self.spec.semantic_prompts.items():
                values = table[feature_column(name)].combine_chunks().flatten().to_numpy().astype(np.float16)
                columns[feature_column(name)] = pa.FixedSizeListArray.from_arrays(pa.array(values, pa.float16()), dim)
        out = pa.Table.from_pydict(columns, schema=self.schema)
        return out.append_column(FALLBACK, fallback)  # for WriteParts' counts; not written


class ScoreImages:
    """Both model stages in one actor (SemanticFeatures then ScoreRows). On a cluster without GPUs the two
    stages would only split the same cores between two processes and hand every batch from one to the
    other; fused, each actor scores its batches end to end and actors add up (jobs.score --fuse)."""

    def __init__(self, spec: JobSpec, num_gpus: float = 0.0, threads: int | None = None, watch=None):
        self.semantic = SemanticFeatures(spec, num_gpus, threads, watch) if spec.semantic_prompts else None
        self.score = ScoreRows(spec, num_gpus, threads, watch)

    def __call__(self, table: pa.Table) -> pa.Table:
        return self.score(self.semantic(table) if self.semantic else table)


class WriteParts:
    """Writes each batch of score rows as one Parquet part, named by a hash of its model and ids, and returns
    one line of counts per part for the job's summary.

    A run scores each image_id once, so within a run two parts never share a name; a Ray retry of a write
    replaces its own file. A later run writes an id again only to retry its error row; the row that replaces
    it may land in another part, and readers take the current row per (image_id, model) by the table's one
    rule (``schema.CURRENT_ROW_ORDER``)."""

    def __init__(self, output_uri: str, watch=None):
        self.output_uri, self.watch = output_uri, watch

    def __call__(self, table: pa.Table) -> pa.Table:
        if len(table) == 0:
            return pa.table({"rows": pa.array([], pa.int64()), "ok": pa.array([], pa.int64()),
                             "errors": pa.array([], pa.string()), "model": pa.array([], pa.string()),
                             "fallback_batches": pa.array([], pa.int64())})
        fallback = int(pc.sum(table[FALLBACK]).as_py() or 0) if FALLBACK in table.column_names else 0
        if FALLBACK in table.column_names:
            table = table.drop_columns([FALLBACK])
        keys = [table["model"][0].as_py(), *sorted(table["image_id"].to_pylist())]
        digest = hashlib.sha1("\n".join(keys).encode()).hexdigest()[:20]
        try:
            write_part_atomically(table, self.output_uri, f"part-{digest}.parquet")
        except storage_errors() as e:  # the run's verdict, so the job says it in one line (exit 3), not as a
            # traceback that Ray wrapped out of reach
            from .monitor import STORAGE, Reporter

            Reporter(self.watch, "write").refuse(STORAGE, f"storage failed writing a part to {redact(self.output_uri)}: "
                                                          f"{type(e).__name__}: {redact_text(str(e))[:300]}")
        ok = int(pc.sum(pc.equal(table["status"], STATUS_OK)).as_py() or 0)
        kinds = Counter(error_kind(e) for e in table["error"].to_pylist() if e is not None)
        return pa.table({"rows": [len(table)], "ok": [ok], "errors": [json.dumps(dict(kinds))], "model": [keys[0]],
                         "fallback_batches": [fallback]})


def summarise(counts: list[dict]) -> dict:
    """Adds up the per-part counts returned by WriteParts; ``model_id`` is the model of the rows written."""
    kinds: Counter = Counter()
    for c in counts:
        kinds.update(json.loads(c["errors"]))
    rows = sum(c["rows"] for c in counts)
    ok = sum(c["ok"] for c in counts)
    summary = {"rows": rows, "ok": ok, "errors": rows - ok, "errors_by_kind": dict(sorted(kinds.items())),
               "batches_scored_row_by_row": sum(c.get("fallback_batches", 0) for c in counts)}
    if counts:
        summary["model_id"] = counts[0]["model"]
    return summary
