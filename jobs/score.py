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
import sys
import time
from datetime import datetime, timezone

import pyarrow as pa

from ma_agiqa.checkpoint import load_config, model_id
from ma_agiqa.pipeline import (
    AssignIds,
    DropDone,
    FetchDecode,
    JobSpec,
    ScoreImages,
    ScoreRows,
    SemanticFeatures,
    WriteParts,
    summarise,
)
from ma_agiqa.storage import (
    ManifestError,
    expand_manifest,
    join_uri,
    list_parts,
    read_column,
    read_columns,
    read_manifest_schema,
    read_manifest_table,
    total_bytes,
    write_json,
)

log = logging.getLogger("jobs.score")
SUMMARY_FILE = "_summary.json"


def add_scoring_args(p: argparse.ArgumentParser) -> None:
    """The options of a scoring run besides its manifest and output (shared with jobs.curate)."""
    p.add_argument("--model", default="tiny-random", help="a registered model name or a checkpoint directory")
    p.add_argument("--image-root", default=None, help="URI that relative manifest uris are resolved against")
    p.add_argument("--address", default=None, help="Ray address; default RAY_ADDRESS, else a local Ray")
    p.add_argument("--batch-size", type=int, default=16, help="images per model batch")
    p.add_argument("--semantic-actors", type=int, default=1, help="actors hosting the MLLM")
    p.add_argument("--quality-actors", type=int, default=None,
                   help="actors hosting MANIQA + MoE (the whole model when fused); default 1 with GPUs, else one per CPU (at most 8)")
    p.add_argument("--gpus-per-actor", type=float, default=None, help="GPUs per model actor (fractions allowed); default 1 if the cluster has GPUs, else 0")
    p.add_argument("--cpus-per-actor", type=float, default=None, help="CPUs reserved per model actor; default 1 with GPUs, 0.5 on CPU only")
    p.add_argument("--threads-per-actor", type=int, default=None, help="torch CPU threads per model actor; default: the CPUs it reserves, at least 1")
    p.add_argument("--fuse", choices=["auto", "on", "off"], default="auto",
                   help="run both model stages in one actor pool of --quality-actors actors; auto: on when the cluster has no GPU")
    p.add_argument("--keep-columns", default="", help="comma-separated manifest columns to copy into the score table")
    p.add_argument("--prompt-column", default="prompt", help="manifest column with the generation prompt (for a prompt expert)")
    p.add_argument("--keep-features", action="store_true", help="also write the semantic vectors (float16)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N manifest rows")
    p.add_argument("--s3-endpoint", default=None, help="endpoint of an S3-compatible store (sets AWS_ENDPOINT_URL)")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__.split("\n")[0])
    p.add_argument("--manifest", required=True, help="a Parquet/CSV/JSONL file, a directory or a glob (local, file://, s3://, gs://)")
    p.add_argument("--output", required=True, help="directory URI of the score table (Parquet parts)")
    add_scoring_args(p)
    p.add_argument("--rows-per-file", type=int, default=5000, help="rows per output Parquet part")
    return p.parse_args(argv)


def scored_ids(output_uri: str, scorer: str) -> pa.Array:
    """The image ids ``output_uri`` already holds a row for, scored by the model ``scorer`` (ok or error)."""
    import pyarrow.compute as pc

    done = read_columns(output_uri, ["image_id", "model"])
    return done.filter(pc.equal(done["model"], scorer))["image_id"].combine_chunks()


def check_manifest(args) -> tuple[list[str], str, pa.Schema]:
    """The manifest's files, format and schema, checked before Ray starts: a manifest that cannot be used
    (no `uri` column, unreadable, a kept column it lacks) raises ManifestError with a message for the user."""
    files, fmt = expand_manifest(args.manifest)
    schema = read_manifest_schema(files[0], fmt)
    for f in files[1:50] if fmt == "parquet" else []:
        if "uri" not in read_manifest_schema(f, fmt).names:
            raise ManifestError(f"manifest file {f} has no 'uri' column")
    if "uri" not in schema.names:
        raise ManifestError(f"manifest file {files[0]} has no 'uri' column (columns: {', '.join(schema.names)})")
    missing = [c for c in kept_columns(args) if c not in schema.names]
    if missing:
        raise ManifestError(f"--keep-columns names columns the manifest lacks: {missing} (columns: {', '.join(schema.names)})")
    return files, fmt, schema


def kept_columns(args) -> list[str]:
    return [c.strip() for c in args.keep_columns.split(",") if c.strip()]


def job_spec(args, schema: pa.Schema) -> JobSpec:
    """What every stage needs to know, from the model's config (read, not built) and the manifest's schema."""
    try:
        cfg = load_config(args.model)
    except KeyError as e:  # neither a checkpoint directory nor a registered name
        raise JobConfigError(f"--model {args.model}: {e.args[0]}") from None
    uses_prompt = any(e.source == "prompt" for e in cfg.moe.experts)
    spec = JobSpec(
        model=args.model,
        experts=cfg.expert_names,
        views=cfg.quality.views,
        semantic_prompts={name: cfg.semantic.hidden_size for name in cfg.semantic.prompts} if cfg.semantic else {},
        semantic_max_side=cfg.semantic.max_image_side if cfg.semantic else 1024,
        image_root=args.image_root,
        keep_columns={c: schema.field(c).type for c in kept_columns(args)},
        keep_features=args.keep_features,
        prompt_column=args.prompt_column if uses_prompt and args.prompt_column in schema.names else None,
    )
    spec.output_schema()  # kept columns must not clash with the score table's
    return spec


def plan(args) -> tuple[JobSpec, list[str], str]:
    """Everything that can be checked before Ray starts or a model loads: the manifest, the columns, the
    model's config."""
    files, fmt, schema = check_manifest(args)
    return job_spec(args, schema), files, fmt


class JobConfigError(ValueError):
    """Settings that cannot run on this cluster: the job stops before any model loads."""


def quality_actor_count(args, gpus: float, cluster_cpus: float) -> int:
    """--quality-actors, else 1 with GPUs and one per CPU (at most 8) without: on CPUs, single-threaded
    model actors side by side beat one actor with more threads (benchmarks/README.md)."""
    if args.quality_actors is not None:
        return args.quality_actors
    return 1 if gpus > 0 else min(8, max(1, int(cluster_cpus)))


def actor_cpus(args, gpus: float, spec: JobSpec, cluster_cpus: float, fused: bool = False) -> float:
    """CPUs reserved per model actor. The actors must leave at least one CPU for the read, decode and
    write tasks, or Ray Data waits forever for room to schedule them."""
    n_actors = quality_actor_count(args, gpus, cluster_cpus)
    n_actors += args.semantic_actors if spec.semantic_prompts and not fused else 0
    room = cluster_cpus - 1
    if args.cpus_per_actor is not None:
        if n_actors * args.cpus_per_actor > room:
            raise JobConfigError(
                f"{n_actors} model actors x {args.cpus_per_actor} CPUs leave no CPU for decoding on a cluster with "
                f"{cluster_cpus:g} CPUs: lower --cpus-per-actor or the actor counts"
            )
        return args.cpus_per_actor
    wanted = 1.0 if gpus > 0 else 0.5
    if room <= 0:
        raise JobConfigError(f"the cluster has {cluster_cpus:g} CPUs; the job needs at least 2")
    return min(wanted, room / n_actors)


SMALL_MANIFEST_BYTES = 64 << 20  # read in the driver below this: Ray Data's read tasks cost seconds


def rows_to_score(files: list[str], fmt: str, spec: JobSpec, done, limit: int | None, batch_size: int):
    """(Ray Dataset of the manifest rows still to score, in blocks of about ``batch_size`` rows, their count).

    A small manifest is read in the driver and handed over as one block per batch: Ray Data's read and
    repartition tasks would cost seconds of worker start-up. A large one is read by Ray Data's parallel
    readers, read once and materialised: the count decides whether any model needs to load, and the pipeline
    starts from these blocks instead of reading the manifest again."""
    import ray.data

    if len(files) <= 64 and total_bytes(files) <= SMALL_MANIFEST_BYTES:
        table = read_manifest_table(files, fmt)
        table = DropDone(done)(AssignIds(spec)(table.slice(0, limit) if limit is not None else table))
        blocks = [table.slice(i, batch_size) for i in range(0, len(table), batch_size)] or [table]
        # from_blocks, unlike from_arrow, keeps the blocks as they are and reads their metadata here rather
        # than in a remote task per block.
        return ray.data.from_blocks(blocks), len(table)
    if fmt == "parquet":
        ds = ray.data.read_parquet(files, file_extensions=None)
    elif fmt == "csv":
        ds = ray.data.read_csv(files, file_extensions=None)
    else:
        ds = ray.data.read_json(files, lines=True, file_extensions=None)
    if limit is not None:
        ds = ds.limit(limit)
    ds = ds.map_batches(AssignIds(spec), batch_format="pyarrow")
    todo = ds.map_batches(DropDone(done), batch_format="pyarrow").materialize()
    # Manifest files come in few large blocks: split them so that every actor gets work.
    return todo.repartition(target_num_rows_per_block=batch_size), todo.count()


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
    spec, files, fmt = plan(args)
    init_ray(args.address, args.s3_endpoint)
    started = time.time()  # the summary's images/s count from here: Ray up

    resources = ray.cluster_resources()
    gpus = args.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) > 0 else 0.0
    fused = args.fuse == "on" or (args.fuse == "auto" and gpus == 0)
    decode_in_actors = fused and gpus == 0
    args.quality_actors = quality_actor_count(args, gpus, resources.get("CPU", 0))
    cpus = actor_cpus(args, gpus, spec, resources.get("CPU", 0), fused)
    # Torch threads per model actor: one per reserved CPU. On CPU-only nodes, more threads than reserved
    # CPUs oversubscribe the cores and were measured slower (benchmarks/README.md): add actors instead.
    threads = args.threads_per_actor or max(1, int(cpus))

    # What this run's rows will say in their model column, needed only to resume: working it out can mean
    # building the model, which a first run leaves to the actors.
    scorer = model_id(args.model) if list_parts(args.output) else None
    done = scored_ids(args.output, scorer) if scorer else pa.array([], pa.string())
    todo, n_todo = rows_to_score(files, fmt, spec, done, args.limit, args.batch_size)
    summary = {
        "model_stages": "fused" if fused else "separate", "decode": "in the model actors" if decode_in_actors else "tasks",
        "quality_actors": args.quality_actors,
        "threads_per_actor": threads, "cpus_per_actor": cpus,
        "manifest": args.manifest, "output": args.output, "model": args.model, "model_id": scorer,
        "already_scored": len(done), "to_score": n_todo,
    }
    if n_todo:
        todo = todo.map_batches(
            FetchDecode(spec), batch_size=args.batch_size, batch_format="pyarrow",
            # With GPUs: one CPU per decode task, unlike the model actors, so that Ray Data keeps decoding in
            # parallel tasks running ahead of the GPU actors. Fused on CPUs: the model actors' resources, so
            # that Ray Data fuses decoding into them and each actor takes its rows from manifest row to score,
            # with no decoded pixels moved between processes.
            num_cpus=cpus if decode_in_actors else 1,
        )
        if fused:
            stages = [(ScoreImages, args.quality_actors)]
        else:
            stages = [(SemanticFeatures, args.semantic_actors)] if spec.semantic_prompts else []
            stages.append((ScoreRows, args.quality_actors))
        for stage, size in stages:  # fixed-size pools: models load once per actor, not per batch
            todo = todo.map_batches(
                stage, fn_constructor_args=(spec, gpus, threads), batch_size=args.batch_size, batch_format="pyarrow",
                num_gpus=gpus, num_cpus=cpus,
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
        table_rows=len(read_column(args.output, "image_id")),
        elapsed_s=round(elapsed, 2),
        images_per_s=round(summary["rows"] / elapsed, 2) if summary["rows"] else 0.0,
        finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    write_json(json.dumps(summary, indent=2) + "\n", join_uri(args.output, SUMMARY_FILE))
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        summary = run(args)
    except ManifestError as e:
        print(f"error: bad manifest: {e}", file=sys.stderr)
        return 2
    except JobConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    if summary["to_score"] == 0:
        print(f"nothing to do: all {summary['already_scored']} rows of the manifest are already in {args.output}")
    print(f"score table: {args.output} ({summary['table_rows']} rows; summary in {join_uri(args.output, SUMMARY_FILE)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
