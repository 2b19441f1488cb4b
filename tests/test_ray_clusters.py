"""The test helpers' own contract: a test that drives a `ray start` cluster leaves this process able to start
a local Ray whose actors run (the suite runs both kinds in one process, in file order)."""
import os

from ray_clusters import connected, free_port, kill_session, start_node


def test_a_local_ray_after_a_test_cluster_runs_actors():
    import ray

    class Echo:  # defined here: Ray ships it by value (the workers cannot import test modules)
        def echo(self, x):
            return x

    def local_actor_answers(value):
        ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
        try:
            return ray.get(ray.remote(num_cpus=0)(Echo).remote().echo.remote(value), timeout=60)
        finally:
            ray.shutdown()

    assert local_actor_answers(7) == 7  # a local Ray sets this process's auth mode (to token, when unset)
    mode = os.environ.get("RAY_AUTH_MODE")
    port = free_port()
    head = start_node("--head", "--num-cpus", 1, "--num-gpus", 0, "--port", port, "--include-dashboard", "false")
    try:
        with connected(f"127.0.0.1:{port}"):
            assert os.environ["RAY_AUTH_MODE"] == "disabled"
            assert ray.get(ray.remote(num_cpus=0)(Echo).remote().echo.remote(8), timeout=60) == 8
    finally:
        kill_session(head)
    assert os.environ.get("RAY_AUTH_MODE") == mode
    assert local_actor_answers(9) == 9  # before the fix: ActorDiedError, "cancelled before it started running"
