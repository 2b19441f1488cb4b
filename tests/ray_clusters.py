"""Real Ray clusters for tests: `ray start` nodes in process sessions of their own, stopped by killing their
session's processes (never `ray stop`, which stops every Ray on the machine), and what a cluster still holds
after a job (actors, placement groups, the autoscaler request)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = os.path.join(os.path.dirname(sys.executable), "ray")  # the ray of this interpreter, venv activated or not
if not os.path.exists(RAY):
    RAY = "ray"
# Ray Data's own detached actors (no CPU), shared by every Ray Data job on a cluster and left there by design
# (ray/data/_internal: stats.py, usage/actor.py, node_trackers/actor_location.py, cluster_autoscaler/).
RAY_DATA_SHARED = {"datasets_stats_actor", "ActorLocationTracker", "DataUsageCollectionActor", "AutoscalingCoordinator",
                   "AutoscalingRequester"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    """The tests' environment for Ray processes and jobs: no token auth, this checkout on the path."""
    out = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(REPO), **extra)
    out.pop("RAY_ADDRESS", None)
    return out


def start_node(*args, environ=None) -> subprocess.Popen:
    """`ray start --block ARGS` in a session of its own (kill_session stops it and everything it started)."""
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *map(str, args)], env=environ or env(),
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_for_port(port: int, node: subprocess.Popen, timeout: float = 60) -> None:
    """Until the head's GCS accepts connections on ``port``: `ray start --block` returns nothing to wait on, and a
    job started before its GCS listens is right to stop at once (no cluster answers)."""
    deadline = time.time() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert node.poll() is None, f"the head node exited ({node.returncode}) before its GCS listened"
            assert time.time() < deadline, f"nothing listens on port {port} after {timeout:.0f} s"
            time.sleep(0.3)


def session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` that still run (zombies left to an init that does not reap are not)."""
    pids = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                state, _ppid, _pgrp, session = f.read().rsplit(")", 1)[1].split()[:4]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(session) == sid and state != "Z":
            pids.append(int(entry))
    return pids


def command_line(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return ""


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL to every process of ``proc``'s session: a node, or a job and its local Ray, and Ray's workers,
    which run in process groups of their own and would otherwise go on for seconds after their raylet died."""
    deadline = time.time() + 30
    while time.time() < deadline:
        alive = [pid for pid in session_pids(proc.pid) if pid != os.getpid()]
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.poll()  # reap the process itself
        if not alive:
            break
        time.sleep(0.1)
    proc.wait(timeout=30)


@contextlib.contextmanager
def connected(address: str, timeout: float = 60):
    """This process as a driver of a test cluster (started without token auth), ray.init retried until its GCS
    answers; on exit, ray.shutdown and the auth mode this process had before.

    The mode is process state three times over: RAY_AUTH_MODE, and what Ray's C++ core cached from it (its
    RayConfig, its token loader). A local ray.init sets them to "token"; flipping the variable alone leaves
    this driver demanding a token that the cluster's processes (or the next local Ray's) never send: the
    actors it creates die "cancelled before they started". So all three are set, and restored."""
    import ray

    before = os.environ.get("RAY_AUTH_MODE")
    _set_auth_mode("disabled")
    try:
        deadline = time.time() + timeout
        while True:
            try:
                ray.init(address=address, logging_level="ERROR")
                break
            except Exception:  # noqa: BLE001 - the GCS is not up yet
                if time.time() > deadline:
                    raise
                time.sleep(1)
        yield
    finally:
        ray.shutdown()
        _set_auth_mode(before)


def _set_auth_mode(mode: str | None) -> None:
    from ray._raylet import AuthenticationTokenLoader, Config

    if mode is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = mode
    # Both caches: the RayConfig (as Ray's authentication_token_setup refreshes it after setting the variable)
    # and the token loader's, which answers the gRPC servers' checks (tests/test_ray_clusters.py)
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def leftovers() -> dict:
    """What jobs other than this test's driver still hold on the cluster this process is connected to:
    actors not dead (but Ray Data's shared detached ones), placement groups not removed, and the autoscaler's
    standing request."""
    import ray
    from ray._private import state

    from ma_agiqa.scoring.layout import standing_request

    me = ray.get_runtime_context().get_job_id()
    actors = [a for a in state.actors().values()
              if a["State"] != "DEAD" and a["JobID"] != me and a.get("Name") not in RAY_DATA_SHARED]
    groups = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
    return {"actors": [(a.get("Name"), a.get("ActorClassName"), a["State"]) for a in actors],
            "placement_groups": [(g["placement_group_id"], g["state"]) for g in groups],
            "request": standing_request()}


def wait_for_nothing_left(timeout: float = 40) -> dict:
    """leftovers() once they are empty (the GCS cleans up a finished job's actors within seconds), else the
    last seen."""
    deadline = time.time() + timeout
    while True:
        left = leftovers()
        if not any(left.values()) or time.time() > deadline:
            return left
        time.sleep(1)


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float) -> None:
    """Until the job's log ``path`` holds ``text``; fails if the job ends first or the time runs out."""
    deadline = time.time() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert proc.poll() is None, f"the job ended before saying {text!r}:\n" + path.read_text()[-3000:]
        assert time.time() < deadline, f"no {text!r} in time:\n" + path.read_text()[-3000:]
        time.sleep(0.3)
