"""``score(request)``: a scoring run from request to summary, in the order it happens.

plan_request (request checked -> model resolved -> input planned -> columns checked -> untrained heads
refused -> JobSpec) -> Ray -> layout (and the cluster asked for it) -> rows to score (resume) -> Ray Data: decode, model stages,
parts -> summary (OUTPUT/_summary.json, OUTPUT/_runs/RUN_ID.json)

Everything before Ray reads files only (no torch, no model): a run that cannot go ahead stops there with a
JobConfigError or a ManifestError.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import replace
from datetime import datetime, timezone

from ..errors import JobConfigError

from ..score_table import resume_plan
from ..table_files import count_rows, list_parts, write_json
from ..uris import is_remote, join_uri, local_path, redact
from .layout import Layout, plan_layout, release_cluster, wait_for_cluster
from .monitor import min_rows_for_error_fraction, quiet_ray_data_errors, start_monitor
from .plan import Manifest, driver_rows, plan_request
from .request import ScoreRequest
from .steps import FetchDecode, JobSpec, ReadInputFiles, ScoreImages, ScoreRows, SemanticFeatures, WriteParts, summarise

SUMMARY_FILE = "_summary.json"  # the latest run's summary
RUNS_DIR = "_runs"  # each run's own summary, RUN_ID.json
log = logging.getLogger("ma_agiqa.scoring")
ROWS_PER_BLOCK = 4096  # at most, per Ray block: per-block costs stay small next to the rows' own work


def score(request: ScoreRequest) -> dict:
    """Scores the request's input into its output table and returns the run's summary (also written to
    OUTPUT/_summary.json and OUTPUT/_runs/RUN_ID.json). Rows already in the table for this model are not
    scored again; ``failed`` in the summary says whether the errors went over ``max_error_fraction``. Raises
    JobConfigError or ManifestError, before Ray starts, for a request that cannot run. However it ends, it
    leaves no autoscaler request of its own on the cluster (SIGTERM, as `ray job stop` sends, included)."""
    if request.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = request.s3_endpoint
    request = replace(request, output=table_location(request.output))
    model, manifest, spec = plan_request(request)
    run = {"run_id": new_run_id(), "host": socket.gethostname(), "started_at": _now()}
    init_ray(request.address, request.s3_endpoint)
    with _terminate_as_interrupt():  # after ray.init, which sets a SIGTERM handler of its own (sys.exit(15))
        try:
            return _score_on_ray(request, model, manifest, spec, run)
        finally:
            release_cluster()


def _score_on_ray(request: ScoreRequest, model, manifest: Manifest, spec: JobSpec, run: dict) -> dict:
    import ray

    started = time.time()  # the summary's images/s count from here: Ray up
    on_cluster = bool(request.address or os.environ.get("RAY_ADDRESS"))
    layout = plan_layout(request, bool(spec.semantic_prompts), ray.cluster_resources())
    ignored = ignored_options(request, layout, bool(spec.semantic_prompts))
    check_single_node(request, on_cluster)  # before waiting for nodes, and again with the nodes that joined
    wait_for_cluster(layout, local=not on_cluster, timeout_s=request.wait_for_cluster)
    check_single_node(request, on_cluster)

    # What this run's rows will say in their model column, needed only to resume: a first run leaves it to
    # the rows it writes (working it out hashes the weights).
    scorer = model.model_id if list_parts(request.output) else None
    retried = 0
    if scorer:
        done, retried = resume_plan(request.output, scorer, manifest.ids, manifest.score, request.retry_errors)
        manifest.score &= ~done
    todo, n_todo, block = rows_to_score(manifest, spec, request.batch_size, layout.actors)
    summary = {
        **run,
        "model_stages": "fused" if layout.fused else "separate",
        "decode": "in the model actors" if layout.decode_in_actors else "tasks",
        "semantic_actors": layout.semantic_actors, "quality_actors": layout.quality_actors, "gpus_per_actor": layout.gpus,
        "threads_per_actor": layout.threads, "cpus_per_actor": layout.cpus, "ignored_options": ignored,
        "manifest": redact(request.manifest), "output": redact(request.output), "model": request.model, "model_id": scorer,
        "manifest_rows": manifest.rows, "repeated_ids": manifest.repeated,
        "already_scored": manifest.rows - manifest.repeated - n_todo, "retried": retried, "to_score": n_todo,
        "rows_per_block": block, "blocks": -(-n_todo // block),
    }
    counts, watched = run_watched(request, layout, lambda watch: pipeline(todo, spec, layout, request, watch)) if n_todo else ([], {})
    summary.update(summarise(counts))
    summary.update(devices=watched.get("devices", {}), stopped_early=watched.get("verdict"))
    if summary["model_id"] is None:  # no rows written and none to resume
        summary["model_id"] = model.model_id
    elapsed = time.time() - started
    summary.update(
        table_rows=count_rows(request.output),  # counted now, from the parts' footers
        elapsed_s=round(elapsed, 2),
        images_per_s=round(summary["rows"] / elapsed, 2) if summary["rows"] else 0.0,
        finished_at=_now(),
    )
    summary["error_fraction"] = round(summary["errors"] / summary["rows"], 4) if summary["rows"] else 0.0
    summary["max_error_fraction"] = request.max_error_fraction
    summary["failed"] = summary["error_fraction"] > request.max_error_fraction or summary["stopped_early"] is not None
    write_summary(summary, request.output)
    return summary


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id() -> str:
    """A run's id: when it started (sorts in time) and a random suffix (two runs in the same second)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


def write_summary(summary: dict, output: str) -> None:
    """The run's own summary (OUTPUT/_runs/RUN_ID.json), which no other run overwrites, then the latest one
    (OUTPUT/_summary.json: the last run to finish; its run_id, host and times say which run that was)."""
    text = json.dumps(summary, indent=2) + "\n"
    write_json(text, join_uri(join_uri(output, RUNS_DIR), summary["run_id"] + ".json"))
    write_json(text, join_uri(output, SUMMARY_FILE))


def table_location(output: str) -> str:
    """Where the table really is: a URI as given, a local path made absolute (the driver's working directory
    is not the workers'). A local path inside the temporary working directory `ray job submit --working-dir`
    made for this job (under Ray's session directory, deleted with it) is refused."""
    if is_remote(output):
        return output
    path = os.path.abspath(local_path(output))
    parts = path.split(os.sep)
    if "runtime_resources" in parts and any(p.startswith("working_dir_files") for p in parts):
        raise JobConfigError(
            f"--output {output} would be written to {path}, inside the temporary copy of the working directory "
            f"Ray made for this job, which Ray deletes: give an object store URI (s3://...) or an absolute path")
    return path


def check_single_node(request: ScoreRequest, on_cluster: bool) -> None:
    """A local --output on a cluster of several nodes would be written to the disks of whichever nodes ran the
    write tasks (and the summary to the driver's): refused unless --shared-filesystem says the path is the
    same storage on every node."""
    if not on_cluster or is_remote(request.output) or request.shared_filesystem:
        return
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1:
        raise JobConfigError(
            f"--output {request.output} is a local path on a cluster of {len(nodes)} nodes: each node would write "
            f"its parts to its own disk. Give an object store URI (s3://...), or --shared-filesystem if the path "
            f"is shared storage mounted on every node")


def ignored_options(request: ScoreRequest, layout: Layout, has_semantic: bool) -> list[str]:
    """Options given that the chosen layout does not use, each logged as a warning (and listed in the summary)."""
    ignored = []
    if request.semantic_actors is not None and layout.semantic_actors == 0:
        why = "the model stages are fused (--fuse)" if layout.fused else "the model has no MLLM branch"
        ignored.append(f"--semantic-actors {request.semantic_actors}: {why}")
    for line in ignored:
        log.warning(f"warning: ignored {line}")
    return ignored


@contextlib.contextmanager
def _terminate_as_interrupt():
    """SIGTERM (`ray job stop`, Kubernetes deleting the pod) raises KeyboardInterrupt while the run is on Ray,
    as Ctrl-C does, so that its clean-up runs before Ray's SIGKILL follows (3 s later under `ray job stop`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
        check_cluster_answers(address)
        try:
            ray.init(address=address, runtime_env={"env_vars": env} if env else None, ignore_reinit_error=True,
                     logging_level=logging.WARNING)
        except (ConnectionError, ValueError, TimeoutError) as e:  # a bad address, a client server that is gone
            raise JobConfigError(f"cannot join the Ray cluster at {address}: {type(e).__name__}: {str(e)[:200]}") from None
    else:
        ray.init(address="local", include_dashboard=False, ignore_reinit_error=True, logging_level=logging.WARNING)


def check_cluster_answers(address: str, timeout_s: float = 10.0) -> None:
    """A GCS address (host:port) that nothing answers on is one line, not ray.init's minutes of retries.
    "auto" and Ray Client addresses (ray://) are left to ray.init."""
    import socket

    if address == "auto" or "://" in address:
        if address.startswith(("http://", "https://")):
            raise JobConfigError(f"--address {address} is a URL; a cluster's address is HOST:PORT of its head (its "
                                 "GCS, port 6379 by default), ray://HOST:10001 or auto")
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise JobConfigError(f"--address {address}: expected HOST:PORT of the cluster's head, ray://HOST:PORT or auto")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise JobConfigError(f"no Ray cluster answers at {address} ({type(e).__name__}: {e}); is the head up, and "
                             "is this its GCS port (6379 by default)?") from None


def rows_per_block(n_rows: int, batch_size: int, n_actors: int) -> int:
    """Blocks of thousands of rows (a task each, at every stage), but at least four per model actor on a
    small manifest, so that every actor gets work."""
    return int(min(ROWS_PER_BLOCK, max(batch_size, -(-n_rows // (4 * max(1, n_actors))))))


def rows_to_score(manifest: Manifest, spec: JobSpec, batch_size: int, n_actors: int):
    """(Ray Dataset of the input rows this run scores, in blocks of ``rows_per_block`` rows, their count, the
    block size)."""
    # An input the driver holds goes to Ray as its blocks (from_blocks: no read or repartition task). A
    # larger one, or one whose rows carry their images, is read again by Ray tasks, a read unit each.
    import ray.data

    n = int(manifest.score.sum())
    block = rows_per_block(n, batch_size, n_actors)
    if n == 0:  # nothing to read (Ray Data refuses a dataset of no read tasks)
        return None, 0, block
    if manifest.tables is not None:
        table = driver_rows(manifest, spec)
        blocks = [table.slice(i, block) for i in range(0, len(table), block)] or [table]
        # from_blocks, unlike from_arrow, keeps the blocks as they are and reads their metadata here rather
        # than in a remote task per block.
        return ray.data.from_blocks(blocks), n, block
    skip = manifest.skipped_by_file()
    files = [{"index": i} for i, rows in enumerate(manifest.file_rows()) if rows and len(skip.get(i, [])) < rows]
    todo = (
        ray.data.from_items(files, override_num_blocks=len(files))
        .map_batches(ReadInputFiles(manifest.source, manifest.file_rows(), skip, spec), batch_size=1, batch_format="pyarrow")
    )
    return todo.repartition(target_num_rows_per_block=block), n, block


def pipeline(todo, spec: JobSpec, layout: Layout, request: ScoreRequest, watch=None):
    """The Ray Data pipeline from rows to score to one line of counts per written part."""
    import ray.data

    # Decoding holds at most JobSpec.decode_memory() bytes per process; Ray is told, so it does not pack
    # more decoders onto a node than its memory holds.
    memory = spec.decode_memory()
    todo = todo.map_batches(
        FetchDecode(spec), batch_size=request.batch_size, batch_format="pyarrow",
        # With GPUs: one CPU per decode task, unlike the model actors, so that Ray Data keeps decoding in
        # parallel tasks running ahead of the GPU actors. Fused on CPUs: the model actors' resources, so
        # that Ray Data fuses decoding into them and each actor takes its rows from manifest row to score,
        # with no decoded pixels moved between processes.
        num_cpus=layout.cpus if layout.decode_in_actors else 1, memory=memory,
    )
    if layout.fused:
        stages = [(ScoreImages, layout.quality_actors)]
    else:
        stages = [(SemanticFeatures, layout.semantic_actors)] if layout.semantic_actors else []
        stages.append((ScoreRows, layout.quality_actors))
    for stage, size in stages:  # fixed-size pools: models load once per actor, not per batch
        todo = todo.map_batches(
            stage, fn_constructor_args=(spec, layout.gpus, layout.threads, watch), batch_size=request.batch_size,
            batch_format="pyarrow", num_gpus=layout.gpus, num_cpus=layout.cpus,
            memory=memory if layout.decode_in_actors else None,
            compute=ray.data.ActorPoolStrategy(size=size, max_tasks_in_flight_per_actor=2),
        )
    return todo.map_batches(WriteParts(request.output, watch), batch_size=request.rows_per_file, batch_format="pyarrow", num_cpus=0.25)


# ---- the run monitor (monitor.py): failing fast, and the device each model stage really ran on ----

def run_watched(request: ScoreRequest, layout: Layout, build) -> tuple[list[dict], dict]:
    """Runs the dataset ``build(watch)`` makes under a run monitor, reading WriteParts' lines of counts as
    parts are written: (those lines, the monitor's state: its verdict, None unless the run stopped early, and
    the devices). A dataset that the monitor stopped ends here with what was written; any other failure
    is raised."""
    import ray

    min_rows = min_rows_for_error_fraction(request.min_rows_for_error_fraction, request.batch_size, layout.actors)
    monitor, watch = start_monitor(request.max_error_fraction, min_rows, request.allow_cpu_fallback, request.max_failed_batches)
    unquiet = quiet_ray_data_errors(monitor)
    counts: list[dict] = []
    try:
        try:
            # a for loop over the dataset: leaving it, however, shuts the dataset down
            for batch in build(watch).iter_batches(batch_size=None, batch_format="pyarrow"):
                counts.extend(batch.to_pylist())
        except Exception:
            state = ray.get(monitor.state.remote())
            if state["verdict"] is None:
                raise
            return counts, state
        return counts, ray.get(monitor.state.remote())
    finally:
        unquiet()
        ray.kill(monitor)
