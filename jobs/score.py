"""Score a manifest of images with MA-AGIQA on Ray Data and write a Parquet score table.

    python -m jobs.score --manifest URI --output URI [--model NAME_OR_DIR] ...
    ray job submit --working-dir . -- python -m jobs.score --manifest s3://... --output s3://...

Without --address (and without RAY_ADDRESS, which `ray job submit` sets) it starts a local Ray.
Re-running the same command resumes: only rows whose image_id the output does not hold for this model (config
name @ weights hash) are scored, so one score table can also collect the scores of several models.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa

from ma_agiqa.checkpoint import is_trained, load_config, model_id, untrained_message
from ma_agiqa.errors import DEFAULT_MAX_PIXELS
from ma_agiqa.pipeline import (
    AssignIds,
    FetchDecode,
    JobSpec,
    ScoreImages,
    ScoreRows,
    SemanticFeatures,
    WriteParts,
    summarise,
)
from ma_agiqa.score_table import resume_plan
from ma_agiqa.fetch import DEFAULT_MAX_BYTES
from ma_agiqa.manifests import ManifestError, expand_manifest, read_manifest_file
from ma_agiqa.table_files import count_rows, list_parts, write_json
from ma_agiqa.uris import join_uri, redact

log = logging.getLogger("jobs.score")
SUMMARY_FILE = "_summary.json"


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """The options of a scoring run besides its manifest and output (shared with jobs.curate)."""
    p.add_argument("--model", default="tiny-random",
                   help="a registered model name, or a checkpoint directory (local, or on object storage: s3://bucket/ckpt/)")
    p.add_argument("--allow-untrained", action="store_true",
                   help="score with heads that were never trained (random weights: tests and smoke runs)")
    p.add_argument("--image-root", default=None, help="URI that relative manifest uris are resolved against; every uri must lie inside it")
    p.add_argument("--allow-outside-root", action="store_true", help="with --image-root, accept absolute uris outside it")
    p.add_argument("--address", default=None, help="Ray address; default RAY_ADDRESS, else a local Ray")
    p.add_argument("--batch-size", type=int, default=16, help="images per model batch")
    p.add_argument("--semantic-actors", type=int, default=None,
                   help="actors hosting the MLLM; default: 3/4 of the cluster's GPU slots, 1 without GPUs")
    p.add_argument("--quality-actors", type=int, default=None,
                   help="actors hosting MANIQA + MoE (the whole model when fused); default: the GPU slots the MLLM leaves, else one per CPU (at most 8)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPUs per model actor (fractions allowed); default 1 if the cluster has 2+ GPUs, 0.5 with one, else 0. "
                        "Give it on a cluster that scales GPU workers from zero")
    p.add_argument("--wait-for-cluster", type=float, default=900,
                   help="seconds to wait for a cluster to scale up to the job's actors (asked of its autoscaler)")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs reserved per model actor; default 1 with GPUs, 0.5 on CPU only")
    p.add_argument("--threads-per-actor", type=int, default=None, help="torch CPU threads per model actor; default: the CPUs it reserves, at least 1")
    p.add_argument("--fuse", choices=["auto", "on", "off"], default="auto",
                   help="run both model stages in one actor pool of --quality-actors actors; auto: on when the cluster has no GPU")
    p.add_argument("--keep-columns", default="", help="comma-separated manifest columns to copy into the score table")
    p.add_argument("--prompt-column", default=None,
                   help="manifest column with the generation prompt, for a model with a prompt expert (default 'prompt'; '' scores without prompts)")
    p.add_argument("--keep-features", action="store_true", help="also write the semantic vectors (float16)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N manifest rows")
    p.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="objects larger than this are error rows, refused before they are read")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="images with more pixels are error rows, refused before decoding")
    p.add_argument("--retry-errors", action="store_true", help="also score again the rows whose error is permanent (missing, not_image, ...)")
    p.add_argument("--max-error-fraction", type=float, default=0.1,
                   help="exit 3 (summary written) when more than this fraction of the run's rows are errors")
    p.add_argument("--s3-endpoint", default=None, help="endpoint of an S3-compatible store (sets AWS_ENDPOINT_URL)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, help="a Parquet/CSV/JSONL file, a directory or a glob (local, file://, s3://, gs://)")
    p.add_argument("--output", required=True, help="directory URI of the score table (Parquet parts)")
    add_scoring_args(p)
    p.add_argument("--rows-per-file", type=int, default=5000, help="rows per output Parquet part")
    return p.parse_args(argv)


class JobConfigError(ValueError):
    """Settings that cannot run: the job stops with exit code 2 before Ray starts or any model loads."""


def kept_columns(args) -> list[str]:
    return [c.strip() for c in args.keep_columns.split(",") if c.strip()]


def check_options(args) -> None:
    for name in ("batch_size", "rows_per_file", "max_bytes", "max_pixels", "semantic_actors", "quality_actors"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise JobConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.limit is not None and args.limit < 0:
        raise JobConfigError(f"--limit must be 0 or more, got {args.limit}")
    if not 0 <= args.max_error_fraction <= 1:
        raise JobConfigError(f"--max-error-fraction must be between 0 and 1, got {args.max_error_fraction}")


def check_output(output: str, manifest_files: list[str], manifest_uri: str) -> None:
    """--output must be a directory (or nothing yet), and never the manifest or a directory holding it."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(output)
    if fs.exists(path) and not fs.isdir(path):
        raise JobConfigError(f"--output {redact(output)} is an existing file; it must be a directory (the score table)")
    out = path.rstrip("/")
    for f in manifest_files:
        _, fpath = fsspec.core.url_to_fs(f)
        if fpath.rstrip("/") == out or fpath.startswith(out + "/"):
            raise JobConfigError(f"--output {redact(output)} holds the manifest {redact(f)}: choose another directory")
    if fsspec.core.url_to_fs(manifest_uri)[1].rstrip("/") == out:
        raise JobConfigError(f"--output {redact(output)} is the manifest itself: choose another directory")


@dataclass
class Manifest:
    """The manifest as the driver planned it: every row's image_id and whether this run scores it, and the
    rows themselves when the driver holds them (else Ray tasks read the files again, a file each)."""

    files: list[str]
    fmt: str
    schema: pa.Schema
    ids: pa.ChunkedArray  # image_id of every row within --limit, one chunk per file
    score: np.ndarray  # bool per row: scored by this run (the first row of each id, not already in the table)
    repeated: int  # rows whose image_id an earlier row already has: scored once, at the first
    tables: list[pa.Table] | None = None  # the rows of each file, when the driver holds them

    @property
    def rows(self) -> int:
        return len(self.ids)

    def file_rows(self) -> list[int]:
        return [len(c) for c in self.ids.chunks]

    def skipped_by_file(self) -> dict[int, np.ndarray]:
        """Per file index, the positions of its rows that this run does not score."""
        out, offset = {}, 0
        for i, n in enumerate(self.file_rows()):
            skip = np.flatnonzero(~self.score[offset:offset + n])
            if len(skip):
                out[i] = skip
            offset += n
        return out


DRIVER_ROWS = 1_000_000  # manifests up to this many rows are handed to Ray from the driver
ROWS_PER_BLOCK = 4096  # at most, per Ray block: per-block costs stay small next to the rows' own work


def read_manifest(args, spec_for_ids) -> Manifest:
    """Reads and checks every manifest file in the driver, before Ray starts: a file that cannot be parsed,
    lacks ``uri`` or holds no row stops the job here, with the file and line. Rows that repeat an earlier
    row's image_id are scored once (the first); the summary counts them. Past DRIVER_ROWS only the ids stay
    in the driver."""
    files, fmt = expand_manifest(args.manifest)
    check_output(args.output, files, args.manifest)
    tables, ids, schema, total = [], [], None, 0
    for f in files:
        table = read_manifest_file(f, fmt)
        if "uri" not in table.column_names:
            raise ManifestError(f"manifest file {redact(f)} has no 'uri' column (columns: {', '.join(table.column_names)})")
        if args.limit is not None:
            table = table.slice(0, max(0, args.limit - total))
        total += len(table)
        schema = table.schema if schema is None else pa.unify_schemas([schema, table.schema], promote_options="permissive")
        ids.append(AssignIds(spec_for_ids)(table)["image_id"].combine_chunks())
        if tables is not None:
            tables.append(table)
            if total > DRIVER_ROWS:
                tables = None
    if total == 0:
        raise ManifestError(f"manifest {redact(args.manifest)} is empty: no rows" + (" within --limit" if args.limit == 0 else ""))
    all_ids = pa.chunked_array(ids, pa.string())
    positions = pa.table({"image_id": all_ids, "pos": pa.array(np.arange(total, dtype=np.int64))})
    first = positions.group_by("image_id").aggregate([("pos", "min")])["pos_min"].to_numpy()
    score = np.zeros(total, bool)
    score[first] = True
    return Manifest(files, fmt, schema, all_ids, score, int(total - len(first)), tables)


def job_spec(args, schema: pa.Schema) -> JobSpec:
    """What every stage needs to know, from the model's config (read, not built) and the manifest's schema."""
    try:
        cfg = load_config(args.model)
    except KeyError as e:  # neither a checkpoint directory nor a registered name
        raise JobConfigError(f"--model {args.model}: {e.args[0]}") from None
    uses_prompt = any(e.source == "prompt" for e in cfg.moe.experts)
    prompt_column = "prompt" if args.prompt_column is None else args.prompt_column
    if prompt_column and prompt_column not in schema.names and (args.prompt_column is not None or uses_prompt):
        raise JobConfigError(
            f"--prompt-column {prompt_column!r}: the manifest has no such column (columns: {', '.join(schema.names)})"
            + ("; pass --prompt-column '' to score without prompts" if uses_prompt else "")
        )
    keep = kept_columns(args)
    missing = [c for c in keep if c not in schema.names]
    if missing:
        raise JobConfigError(f"--keep-columns names columns the manifest lacks: {missing} (columns: {', '.join(schema.names)})")
    framing = None
    if cfg.semantic is not None:  # images leave decoding at the size the MLLM's processor uses
        from ma_agiqa.framing import Framing

        try:
            framing = Framing.of(cfg.semantic)
        except Exception as e:  # noqa: BLE001 - the actors frame each image themselves, as the library does
            log.warning(f"the MLLM's image-processor settings could not be read ({type(e).__name__}: {e}); "
                        "images go to its actors at up to max_image_side")
    spec = JobSpec(
        model=args.model,
        experts=cfg.expert_names,
        semantic_framing=framing,
        views=cfg.quality.views,
        semantic_prompts={name: cfg.semantic.hidden_size for name in cfg.semantic.prompts} if cfg.semantic else {},
        semantic_max_side=cfg.semantic.max_image_side if cfg.semantic else 1024,
        image_root=args.image_root,
        allow_outside_root=args.allow_outside_root,
        keep_columns={c: schema.field(c).type for c in keep},
        keep_features=args.keep_features,
        prompt_column=prompt_column if uses_prompt and prompt_column else None,
        max_pixels=args.max_pixels,
        max_bytes=args.max_bytes,
    )
    try:
        spec.output_schema()
    except ValueError as e:  # a kept column named like a score table column
        raise JobConfigError(f"--keep-columns: {e}") from None
    return spec


def plan(args) -> tuple[JobSpec, Manifest]:
    """Everything that can be checked before Ray starts or a model loads: the options, the output, every
    manifest line, the columns, the model's config."""
    check_options(args)
    manifest = read_manifest(args, JobSpec(model=args.model, experts=[], views=None))
    return job_spec(args, manifest.schema), manifest


@dataclass
class Layout:
    """Where the model stages run: per-actor GPUs and CPUs, how many actors of each stage."""

    gpus: float  # per model actor
    cpus: float  # per model actor
    fused: bool  # both model stages (and, without GPUs, decoding) in one pool
    semantic_actors: int  # 0 when fused or the model has no semantic branch
    quality_actors: int
    threads: int  # torch CPU threads per actor

    @property
    def actors(self) -> int:
        return self.semantic_actors + self.quality_actors

    def bundles(self) -> list[dict]:
        """What the job needs of the cluster: each model actor, and one CPU for the read, decode and write
        tasks, without which Ray Data waits forever for room to schedule them."""
        actor = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        return [dict(actor) for _ in range(self.actors)] + [{"CPU": 1.0}]


def plan_layout(args, spec: JobSpec, resources: dict) -> Layout:
    """Explicit --gpus-per-actor, --semantic-actors, --quality-actors and --cpus-per-actor are taken as given,
    whatever the cluster holds now (a cluster that scales from zero holds nothing yet). Defaults come from
    the cluster: with GPUs, a GPU per actor (half of one when it has a single GPU), three quarters of the GPU
    slots to the MLLM stage and the rest to the quality stage; without, one fused actor per CPU (at most 8;
    single-threaded actors side by side beat one actor with more threads, benchmarks/README.md)."""
    cluster_gpus, cluster_cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    gpus = args.gpus_per_actor
    if gpus is None:
        gpus = 0.0 if cluster_gpus <= 0 else 1.0 if cluster_gpus >= 2 else 0.5
    fused = args.fuse == "on" or (args.fuse == "auto" and gpus == 0)
    staged = bool(spec.semantic_prompts) and not fused
    if gpus > 0:
        slots = max(2 if staged else 1, int(cluster_gpus / gpus))
        semantic = (args.semantic_actors or max(1, slots * 3 // 4)) if staged else 0
        quality = args.quality_actors or max(1, slots - semantic)
    else:
        semantic = (args.semantic_actors or 1) if staged else 0
        quality = args.quality_actors or min(8, max(1, int(cluster_cpus)))
    n_actors = semantic + quality
    if args.cpus_per_actor is not None:
        cpus = args.cpus_per_actor
    elif gpus > 0:
        cpus = 1.0
    else:  # share what the cluster has, leaving one CPU for the tasks
        cpus = min(0.5, max(cluster_cpus - 1, 0.0) / n_actors) if cluster_cpus > 1 else 0.5
    # Torch threads per model actor: one per reserved CPU. On CPU-only nodes, more threads than reserved
    # CPUs oversubscribe the cores and were measured slower (benchmarks/README.md): add actors instead.
    threads = args.threads_per_actor or max(1, int(cpus))
    return Layout(gpus, cpus, fused, semantic, quality, threads)


def fits(bundles: list[dict], nodes: list[dict]) -> bool:
    """Whether the bundles can all be placed on the nodes' total resources (first fit, largest first)."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True):
        node = next((n for n in free if all(n.get(k, 0) + 1e-9 >= v for k, v in b.items())), None)
        if node is None:
            return False
        for k, v in b.items():
            node[k] -= v
    return True


def wait_for_cluster(layout: Layout, local: bool, timeout_s: float) -> None:
    """A local Ray is what it is: a layout it cannot hold is the user's error. A cluster may scale up: ask
    its autoscaler for the layout's bundles (ray.autoscaler.sdk.request_resources) and wait for the nodes,
    saying what is missing, until ``timeout_s``."""
    import ray

    def nodes():
        return [n["Resources"] for n in ray.nodes() if n.get("Alive")]

    bundles = layout.bundles()
    if fits(bundles, nodes()):
        return
    need = {k: sum(b.get(k, 0) for b in bundles) for k in ("CPU", "GPU")}
    if local:
        raise JobConfigError(
            f"{layout.actors} model actors x ({layout.cpus:g} CPU, {layout.gpus:g} GPU) and one CPU for decoding do not "
            f"fit this machine's Ray ({ray.cluster_resources()}): lower --cpus-per-actor, --gpus-per-actor or the actor counts")
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    started, said = time.time(), 0.0
    while not fits(bundles, nodes()):
        waited = time.time() - started
        if waited > timeout_s:
            raise JobConfigError(f"the cluster did not provide {need['CPU']:g} CPUs and {need['GPU']:g} GPUs for "
                                 f"{layout.actors} model actors within {timeout_s:g} s (--wait-for-cluster)")
        if waited - said >= 15 or said == 0:
            have = ray.cluster_resources()
            log.info(f"waiting for the cluster to scale up: need {need['CPU']:g} CPUs and {need['GPU']:g} GPUs for "
                     f"{layout.actors} model actors, have {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs "
                     f"({waited:.0f} s)")
            said = waited or 0.001
        time.sleep(2)
    log.info(f"the cluster holds the job's actors after {time.time() - started:.0f} s")


class ReadManifestFiles:
    """A Ray task's share of a large manifest: its files read with the driver's reader, cut at --limit, ids
    assigned, and the rows the driver decided not to score (repeats, already in the table) dropped."""

    def __init__(self, manifest: Manifest, spec: JobSpec):
        self.fmt, self.file_rows, self.skip = manifest.fmt, manifest.file_rows(), manifest.skipped_by_file()
        self.spec = spec

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = []
        for index, uri in zip(batch["index"].to_pylist(), batch["file"].to_pylist()):
            table = read_manifest_file(uri, self.fmt).slice(0, self.file_rows[index])
            keep = np.ones(len(table), bool)
            keep[self.skip.get(index, [])] = False
            out.append(AssignIds(self.spec)(table.filter(pa.array(keep))))
        return pa.concat_tables(out, promote_options="permissive")


def rows_per_block(n_rows: int, batch_size: int, n_actors: int) -> int:
    """Blocks of thousands of rows (a task each, at every stage), but at least four per model actor on a
    small manifest, so that every actor gets work."""
    return int(min(ROWS_PER_BLOCK, max(batch_size, -(-n_rows // (4 * max(1, n_actors))))))


def rows_to_score(manifest: Manifest, spec: JobSpec, batch_size: int, n_actors: int):
    """(Ray Dataset of the manifest rows this run scores, in blocks of ``rows_per_block`` rows, their count,
    the block size)."""
    # A manifest the driver holds goes to Ray as its blocks (from_blocks: no read or repartition task). A
    # larger one is read again by Ray tasks, a file each, with the same reader.
    import ray.data

    n = int(manifest.score.sum())
    block = rows_per_block(n, batch_size, n_actors)
    if manifest.tables is not None:
        table = AssignIds(spec)(pa.concat_tables(manifest.tables, promote_options="permissive").filter(pa.array(manifest.score)))
        blocks = [table.slice(i, block) for i in range(0, len(table), block)] or [table]
        # from_blocks, unlike from_arrow, keeps the blocks as they are and reads their metadata here rather
        # than in a remote task per block.
        return ray.data.from_blocks(blocks), n, block
    skip = manifest.skipped_by_file()
    files = [{"index": i, "file": f} for i, (f, rows) in enumerate(zip(manifest.files, manifest.file_rows()))
             if rows and len(skip.get(i, [])) < rows]
    todo = (
        ray.data.from_items(files, override_num_blocks=len(files))
        .map_batches(ReadManifestFiles(manifest, spec), batch_size=1, batch_format="pyarrow")
    )
    return todo.repartition(target_num_rows_per_block=block), n, block


def init_ray(address: str | None, s3_endpoint: str | None = None):
    """Join the cluster at ``address`` / RAY_ADDRESS (as under `ray job submit`), else start a local Ray.

    A local Ray's processes inherit this process's environment (store settings included), so the job sets no
    runtime_env there: one would keep its actors off the workers Ray starts in advance. A cluster's settings
    come from its job's runtime_env (cluster/README.md), except an explicit --s3-endpoint, merged into it."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    env = {"AWS_ENDPOINT_URL": s3_endpoint} if s3_endpoint and address else {}
    if env:
        os.environ["RAY_OVERRIDE_JOB_RUNTIME_ENV"] = "1"
    # "local" always starts a new local Ray: a bare ray.init() would attach to whatever cluster
    # /tmp/ray/ray_current_cluster names, even a dead one. It starts without the dashboard, whose processes
    # cost a second of start-up and share a laptop's cores with the job; for one, `ray start --head` and
    # pass --address.
    if address:
        ray.init(address=address, runtime_env={"env_vars": env} if env else None, ignore_reinit_error=True,
                 logging_level=logging.WARNING)
    else:
        ray.init(address="local", include_dashboard=False, ignore_reinit_error=True, logging_level=logging.WARNING)


def run(args) -> dict:
    import ray
    import ray.data

    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    spec, manifest = plan(args)
    if not args.allow_untrained and not is_trained(args.model):  # scores of random heads mean nothing
        raise JobConfigError(untrained_message(args.model))
    init_ray(args.address, args.s3_endpoint)
    started = time.time()  # the summary's images/s count from here: Ray up

    address = args.address or os.environ.get("RAY_ADDRESS")
    layout = plan_layout(args, spec, ray.cluster_resources())
    wait_for_cluster(layout, local=not address, timeout_s=args.wait_for_cluster)
    gpus, cpus, threads, fused = layout.gpus, layout.cpus, layout.threads, layout.fused
    decode_in_actors = fused and gpus == 0

    # What this run's rows will say in their model column, needed only to resume: working it out can mean
    # building the model, which a first run leaves to the actors.
    scorer = model_id(args.model) if list_parts(args.output) else None
    retried = 0
    if scorer:
        done, retried = resume_plan(args.output, scorer, manifest.ids, manifest.score, args.retry_errors)
        manifest.score &= ~done
    todo, n_todo, block = rows_to_score(manifest, spec, args.batch_size, layout.actors)
    summary = {
        "model_stages": "fused" if fused else "separate", "decode": "in the model actors" if decode_in_actors else "tasks",
        "semantic_actors": layout.semantic_actors, "quality_actors": layout.quality_actors, "gpus_per_actor": gpus,
        "threads_per_actor": threads, "cpus_per_actor": cpus,
        "manifest": redact(args.manifest), "output": redact(args.output), "model": args.model, "model_id": scorer,
        "manifest_rows": manifest.rows, "repeated_ids": manifest.repeated,
        "already_scored": manifest.rows - manifest.repeated - n_todo, "retried": retried, "to_score": n_todo,
        "rows_per_block": block, "blocks": -(-n_todo // block),
    }
    if n_todo:
        # Decoding holds at most JobSpec.decode_memory() bytes per process; Ray is told, so it does not
        # pack more decoders onto a node than its memory holds.
        memory = spec.decode_memory()
        todo = todo.map_batches(
            FetchDecode(spec), batch_size=args.batch_size, batch_format="pyarrow",
            # With GPUs: one CPU per decode task, unlike the model actors, so that Ray Data keeps decoding in
            # parallel tasks running ahead of the GPU actors. Fused on CPUs: the model actors' resources, so
            # that Ray Data fuses decoding into them and each actor takes its rows from manifest row to score,
            # with no decoded pixels moved between processes.
            num_cpus=cpus if decode_in_actors else 1, memory=memory,
        )
        if fused:
            stages = [(ScoreImages, layout.quality_actors)]
        else:
            stages = [(SemanticFeatures, layout.semantic_actors)] if layout.semantic_actors else []
            stages.append((ScoreRows, layout.quality_actors))
        for stage, size in stages:  # fixed-size pools: models load once per actor, not per batch
            todo = todo.map_batches(
                stage, fn_constructor_args=(spec, gpus, threads), batch_size=args.batch_size, batch_format="pyarrow",
                num_gpus=gpus, num_cpus=cpus, memory=memory if decode_in_actors else None,
                compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2),
            )
        counts = todo.map_batches(
            WriteParts(args.output), batch_size=args.rows_per_file, batch_format="pyarrow", num_cpus=0.25,
        ).take_all()
        summary.update(summarise(counts))
    else:
        summary.update(summarise([]))
    if summary["model_id"] is None:  # no rows written and none to resume
        summary["model_id"] = model_id(args.model)
    elapsed = time.time() - started
    summary.update(
        table_rows=count_rows(args.output),  # counted now, from the parts' footers
        elapsed_s=round(elapsed, 2),
        images_per_s=round(summary["rows"] / elapsed, 2) if summary["rows"] else 0.0,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    summary["error_fraction"] = round(summary["errors"] / summary["rows"], 4) if summary["rows"] else 0.0
    summary["max_error_fraction"] = args.max_error_fraction
    summary["failed"] = summary["error_fraction"] > args.max_error_fraction
    write_json(json.dumps(summary, indent=2) + "\n", join_uri(args.output, SUMMARY_FILE))
    return summary


class _Interrupts:
    """Ctrl-C while the job runs: raises KeyboardInterrupt as Python's own handler does, and remembers it, so a
    run whose KeyboardInterrupt was swallowed on its way out (it can land in Ray's cleanup code, where Python
    only prints it) still ends as interrupted instead of exiting 0."""

    def __init__(self):
        self.seen, self._previous = False, None

    def _handler(self, signum, frame):
        self.seen = True
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        with _Interrupts() as interrupts:
            summary = run(args)
            if interrupts.seen:
                raise KeyboardInterrupt
    except ManifestError as e:
        print(f"error: bad manifest: {e}", file=sys.stderr)
        return 2
    except JobConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the parts written so far are kept; run the same command again to resume into {redact(args.output)}",
              file=sys.stderr)
        return 130
    print(json.dumps(summary, indent=2))
    if summary["to_score"] == 0:
        print(f"nothing to do: all {summary['already_scored']} rows of the manifest are already in {redact(args.output)}")
    print(f"score table: {redact(args.output)} ({summary['table_rows']} rows; summary in {redact(join_uri(args.output, SUMMARY_FILE))})")
    if summary["failed"]:
        print(f"error: {summary['errors']} of {summary['rows']} rows failed ({summary['error_fraction']:.1%}), over "
              f"--max-error-fraction {args.max_error_fraction:g}; errors by kind: {summary['errors_by_kind']}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
