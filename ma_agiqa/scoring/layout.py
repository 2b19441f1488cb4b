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
