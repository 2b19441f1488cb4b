"""Where the model stages run: GPUs and CPUs per actor, how many actors of each stage, and whether the
cluster holds them (asking its autoscaler for them when it can grow)."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..errors import JobConfigError
from .request import ScoreRequest

log = logging.getLogger("ma_agiqa.scoring")


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

    @property
    def decode_in_actors(self) -> bool:
        """Fused on CPUs, the model actors decode their own rows: no decoded pixels move between processes."""
        return self.fused and self.gpus == 0

    def bundles(self) -> list[dict]:
        """What the job needs of the cluster: each model actor, and one CPU for the read, decode and write
        tasks, without which Ray Data waits forever for room to schedule them."""
        actor = {"CPU": self.cpus, **({"GPU": self.gpus} if self.gpus else {})}
        return [dict(actor) for _ in range(self.actors)] + [{"CPU": 1.0}]


def plan_layout(request: ScoreRequest, has_semantic: bool, resources: dict) -> Layout:
    """Explicit gpus_per_actor, semantic_actors, quality_actors and cpus_per_actor are taken as given,
    whatever the cluster holds now (a cluster that scales from zero holds nothing yet). Defaults come from
    the cluster: with GPUs, a GPU per actor (half of one when it has a single GPU), three quarters of the GPU
    slots to the MLLM stage and the rest to the quality stage; without, one fused actor per CPU (at most 8;
    single-threaded actors side by side beat one actor with more threads, benchmarks/README.md).
    ``has_semantic``: the model has an MLLM branch, a stage of its own unless fused."""
    cluster_gpus, cluster_cpus = resources.get("GPU", 0), resources.get("CPU", 0)
    gpus = request.gpus_per_actor
    if gpus is None:
        gpus = 0.0 if cluster_gpus <= 0 else 1.0 if cluster_gpus >= 2 else 0.5
    fused = request.fuse == "on" or (request.fuse == "auto" and gpus == 0)
    staged = has_semantic and not fused
    if gpus > 0:
        slots = max(2 if staged else 1, int(cluster_gpus / gpus))
        semantic = _given(request.semantic_actors, max(1, slots * 3 // 4)) if staged else 0
        quality = _given(request.quality_actors, max(1, slots - semantic))
    else:
        semantic = _given(request.semantic_actors, 1) if staged else 0
        quality = _given(request.quality_actors, min(8, max(1, int(cluster_cpus))))
    n_actors = semantic + quality
    if request.cpus_per_actor is not None:
        cpus = request.cpus_per_actor
    elif gpus > 0:
        cpus = 1.0
    else:  # share what the cluster has, leaving one CPU for the tasks
        cpus = min(0.5, max(cluster_cpus - 1, 0.0) / n_actors) if cluster_cpus > 1 else 0.5
    # Torch threads per model actor: one per reserved CPU. On CPU-only nodes, more threads than reserved
    # CPUs oversubscribe the cores and were measured slower (benchmarks/README.md): add actors instead.
    threads = _given(request.threads_per_actor, max(1, int(cpus)))
    return Layout(gpus, cpus, fused, semantic, quality, threads)


def _given(value, default):
    return default if value is None else value


def fits(bundles: list[dict], nodes: list[dict]) -> bool:
    """Whether the bundles can all be placed on the nodes' resources (first fit, largest first); given what
    each node has free, whether the cluster can give them now."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)), reverse=True):
        node = next((n for n in free if all(n.get(k, 0) + 1e-9 >= v for k, v in b.items())), None)
        if node is None:
            return False
        for k, v in b.items():
            node[k] -= v
    return True


def free_resources() -> tuple[list[dict], list[dict]]:
    """(what each alive node has free now, what it has in all): on a shared cluster other jobs hold part of
    the totals, and a layout sized against totals would wait inside Ray Data with nothing said."""
    from ray._private.state import available_resources_per_node, total_resources_per_node

    total = total_resources_per_node()
    free = available_resources_per_node()
    return [free.get(node, {}) for node in total], list(total.values())


def describe_wait(layout: Layout, free: list[dict], total: list[dict]) -> str:
    """What the job waits for: its actors, what the cluster has free and what other jobs hold."""
    def sums(nodes):
        return {k: sum(n.get(k, 0) for n in nodes) for k in ("CPU", "GPU")}

    have, cap = sums(free), sums(total)
    need = sums(layout.bundles())
    return (f"need {layout.actors} model actors x ({layout.cpus:g} CPU, {layout.gpus:g} GPU) and 1 CPU for decoding "
            f"({need['CPU']:g} CPUs, {need['GPU']:g} GPUs, each actor on one node); free now {have['CPU']:g} CPUs and "
            f"{have['GPU']:g} GPUs on {len(total)} nodes; other jobs hold {cap['CPU'] - have['CPU']:g} CPUs and "
            f"{cap['GPU'] - have['GPU']:g} GPUs")


REASSERT_S = 2.0  # how often a waiting job repeats its autoscaler request
_asked = False  # this process made an autoscaler request that is not cleared yet


def ask_cluster(bundles: list[dict]) -> None:
    """Asks the autoscaler for ``bundles`` (request_resources: one standing request per cluster, replaced by
    the next call). Ray Data's autoscaling coordinator, a detached actor left by any earlier Ray Data job,
    rewrites that request every 20 s (to [] when it has none), so a waiting job repeats its own."""
    global _asked
    from ray.autoscaler.sdk import request_resources

    _asked = True
    request_resources(bundles=bundles)


def release_cluster() -> None:
    """Clears this process's autoscaler request, if it made one: on a cluster that scales from zero a standing
    request keeps its nodes up, and billed, after the job. Called when the wait ends, however it ends, and
    again when the job ends."""
    global _asked
    if not _asked:
        return
    import ray
    from ray.autoscaler.sdk import request_resources

    if ray.is_initialized():
        request_resources(bundles=[])
    _asked = False


def standing_request() -> list[dict]:
    """The bundles the cluster's autoscaler is asked for now by request_resources (for tests and for anyone
    checking that a job left nothing behind)."""
    import json

    from ray.autoscaler.v2.utils import is_autoscaler_v2

    if is_autoscaler_v2():
        from ray._private.worker import global_worker
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        state = get_cluster_resource_state(global_worker.gcs_client)
        return [dict(r.request.resources_bundle) for c in state.cluster_resource_constraints
                for r in c.resource_requests for _ in range(r.count)]
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def wait_for_cluster(layout: Layout, local: bool, timeout_s: float) -> None:
    """Waits until the cluster can give the layout now (each bundle on one node's free resources), saying what
    is missing every 15 s, until ``timeout_s``. A local Ray is what it is: a layout its totals cannot hold is
    the user's error, at once (what it holds now, an earlier run's actors, it releases). A cluster may scale up
    or other jobs may finish: ask its autoscaler for the layout's bundles (request_resources, repeated while
    waiting) and clear the request when the wait ends, however it ends."""
    import ray

    bundles = layout.bundles()
    free, total = free_resources()
    if fits(bundles, free):
        return
    if local and not fits(bundles, total):
        raise JobConfigError(
            f"{layout.actors} model actors x ({layout.cpus:g} CPU, {layout.gpus:g} GPU) and one CPU for decoding do not "
            f"fit this machine's Ray ({ray.cluster_resources()}): lower --cpus-per-actor, --gpus-per-actor or the actor counts")
    started, said, asked = time.time(), None, None
    try:
        while True:
            now = time.time()
            waited = now - started
            if fits(bundles, free):
                break
            if waited > timeout_s:
                raise JobConfigError(f"the cluster did not give the job its actors within {timeout_s:g} s "
                                     f"(--wait-for-cluster): {describe_wait(layout, free, total)}")
            if not local and (asked is None or now - asked >= REASSERT_S):
                ask_cluster(bundles)
                asked = now
            if said is None or waited - said >= 15:
                log.info(f"waiting for the cluster ({waited:.0f} s): {describe_wait(layout, free, total)}")
                said = waited
            time.sleep(1)
            free, total = free_resources()
    finally:
        release_cluster()
    log.info(f"the cluster holds the job's actors after {time.time() - started:.0f} s")
