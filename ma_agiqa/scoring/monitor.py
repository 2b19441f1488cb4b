"""Watching a scoring run while it runs, so that a run that cannot succeed stops early instead of scoring
millions of rows into error rows.

One small actor per run (``RunMonitor``, no resources) hears from the model actors: the device and dtype each
one really runs with, the rows of every batch it finishes and how many are errors, and the reasons a run
cannot go on (a stage that fails on every batch, a GPU actor without CUDA). It holds the verdict:

- the error fraction, judged over the rows done so far once ``min_rows`` are done (``--max-error-fraction``,
  ``--min-rows-for-error-fraction``);
- a stage whose last ``--max-failed-batches`` batches all failed on every row (a broken model, a GPU in a
  bad state);
- a model actor that Ray gave a GPU but whose torch sees none (unless ``--allow-cpu-fallback``).

Once it has one, the next batch of every model actor raises ``RunStopped``, Ray Data stops the dataset, and the
driver asks the monitor why (``verdict``). Parts already written stay (they are written whole), so the same
command resumes. Without a monitor (the benchmark's plain loop) the steps report to nobody.
"""
from __future__ import annotations

import logging
import socket
import uuid
from collections import Counter
from dataclasses import dataclass

# What stopped a run (the summary's ``stopped_early.kind``); NO_CUDA is a refusal (jobs.score: exit 2), the
# others a failed run (exit 3).
ERROR_FRACTION, FAILED_BATCHES, NO_CUDA, STORAGE = "error_fraction", "failed_batches", "no_cuda", "storage"
MIN_ROWS_FOR_ERROR_FRACTION = 200  # at least; see min_rows_for_error_fraction
MAX_FAILED_BATCHES = 5


class RunStopped(RuntimeError):
    """Raised in a model actor once the run's monitor has a verdict: it ends the Ray Data dataset."""


def min_rows_for_error_fraction(given: int | None, batch_size: int, n_actors: int) -> int:
    """Rows done before the error fraction is judged: the option, else 200, or two batches per model actor
    where that is more, so that one actor's bad first batch does not stop a run."""
    if given is not None:
        return given
    return max(MIN_ROWS_FOR_ERROR_FRACTION, 2 * batch_size * max(1, n_actors))


@dataclass
class Watch:
    """What a model actor needs to report to its run's monitor; plain data, shipped with the stage."""

    monitor: object = None  # the monitor actor's handle (handles travel with the stage; a name lookup from an
    # actor on another node can miss the job's namespace); None: report to nobody
    allow_cpu_fallback: bool = False
    max_failed_batches: int = MAX_FAILED_BATCHES  # 0: never stop for failed batches


class Judge:
    """The monitor's rules, without Ray: counts in, the first reason to stop out."""

    def __init__(self, max_error_fraction: float, min_rows: int):
        self.max_error_fraction, self.min_rows = max_error_fraction, min_rows
        self.rows = self.errors = 0
        self.verdict: dict | None = None
        self.devices: dict[str, Counter] = {}

    def batch(self, rows: int, errors: int) -> dict | None:
        self.rows += rows
        self.errors += errors
        if self.verdict is None and self.rows >= self.min_rows and self.errors > self.max_error_fraction * self.rows:
            self.stop(ERROR_FRACTION, f"{self.errors} of the first {self.rows} rows failed "
                                      f"({self.errors / self.rows:.1%}), over --max-error-fraction {self.max_error_fraction:g}")
        return self.verdict

    def stop(self, kind: str, reason: str) -> dict:
        if self.verdict is None:  # the first reason is the one reported
            self.verdict = {"kind": kind, "reason": reason, "after_rows": self.rows}
        return self.verdict

    def device(self, stage: str, device: str, dtype: str) -> None:
        self.devices.setdefault(stage, Counter())[f"{device} {dtype}"] += 1

    def state(self) -> dict:
        return {"verdict": self.verdict, "rows": self.rows, "errors": self.errors,
                "devices": {stage: dict(c) for stage, c in sorted(self.devices.items())}}


def start_monitor(max_error_fraction: float, min_rows: int, allow_cpu_fallback: bool, max_failed_batches: int):
    """(the monitor actor, the Watch its model actors get). The actor lives as long as the driver holds it."""
    import ray

    name = f"ma-agiqa-monitor-{uuid.uuid4().hex[:12]}"
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: a worker node lost mid-run (spot) must not take the run's monitor with it.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0, max_restarts=0)(Judge).options(name=name, scheduling_strategy=here).remote(
        max_error_fraction, min_rows)
    # Up before any model actor starts: their constructors report to it, and on a small node Ray starts only a
    # few worker processes at a time, so actors waiting on a monitor not yet started could starve it.
    ray.get(actor.state.remote())
    return actor, Watch(actor, allow_cpu_fallback, max_failed_batches)


def node_name() -> str:
    """This process's node, as a user finds it: hostname and Ray node id."""
    try:
        import ray

        node = ray.get_runtime_context().get_node_id()[:12]
    except Exception:  # noqa: BLE001 - outside Ray
        node = "?"
    return f"{socket.gethostname()} (Ray node {node})"


class Reporter:
    """A model actor's side of the monitor: reports, and raises RunStopped once the run has a verdict."""

    def __init__(self, watch: Watch | None, stage: str):
        self.watch, self.stage = watch or Watch(), stage
        self.failed_in_a_row = 0
        self.verdict: dict | None = None  # the run's, once the monitor has one
        self.actor = self.watch.monitor

    def _ask(self, call):
        import ray

        return ray.get(call)

    def device(self, device: str, dtype) -> None:
        if self.actor is None:
            return
        from ray.exceptions import RayActorError

        try:
            self._ask(self.actor.device.remote(self.stage, device, str(dtype).removeprefix("torch.")))
        except RayActorError:  # the run ended (its monitor is killed last) while this actor was still starting:
            pass  # nothing to report to, and no traceback after the run's summary

    def refuse(self, kind: str, reason: str) -> None:
        """A reason the run cannot go on: the monitor records it (first wins), and this actor stops."""
        if self.actor is not None:
            self._ask(self.actor.stop.remote(kind, reason))
        raise RunStopped(reason)

    def check(self) -> None:
        """Before a batch: raises RunStopped once the monitor has said the run stops. The batch that brought
        the verdict was still handed on, so its rows are written."""
        if self.verdict is not None:
            raise RunStopped(self.verdict["reason"])

    def batch(self, rows: int, errors: int, failed_whole: bool, last_error: str | None = None,
              final: bool = True) -> None:
        """After each batch: ``failed_whole`` when it fell back row by row and every row failed; ``final``
        when its rows' statuses are the ones written (the last model stage)."""
        self.failed_in_a_row = self.failed_in_a_row + 1 if failed_whole else 0
        limit = self.watch.max_failed_batches
        if limit and self.failed_in_a_row >= limit:
            self.refuse(FAILED_BATCHES, f"the {self.stage} stage failed on every row of {self.failed_in_a_row} "
                                        f"batches in a row (--max-failed-batches {limit}); last error: {last_error}")
        if self.actor is None:
            return
        self.verdict = self._ask(self.actor.batch.remote(rows if final else 0, errors if final else 0))


def quiet_ray_data_errors(actor):
    """Ray Data logs a stopped dataset's exception with its stack; when the monitor stopped it on purpose
    the run's own one line says why, so those records are dropped (any other error is logged as before).
    Returns the function that puts the loggers back."""
    import ray

    class _Stopped(logging.Filter):
        def filter(self, record):
            if record.levelno < logging.ERROR:
                return True
            try:
                return ray.get(actor.state.remote(), timeout=5)["verdict"] is None
            except Exception:  # noqa: BLE001 - the monitor is gone: log as usual
                return True

    loggers = [logging.getLogger(name) for name in ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state")]
    quiet = _Stopped()
    for logger in loggers:
        logger.addFilter(quiet)
    return lambda: [logger.removeFilter(quiet) for logger in loggers]
