import os
import sys
from pathlib import Path

import pytest

from helpers import REQUIRE_DATA, unavailable

REPO = Path(__file__).resolve().parents[1]
AGIQA3K = Path(os.environ.get("MA_AGIQA_AGIQA3K", REPO.parent / "shared" / "datasets" / "agiqa3k"))


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    """Tiny models are built once per test session into a private cache (Ray workers inherit the variable)."""
    os.environ.setdefault("MA_AGIQA_CACHE", str(tmp_path_factory.mktemp("ma_agiqa_cache")))


# 40 real AGIQA-3K images (labels.csv and images/ as in the dataset's own layout), shipped in the repository.
AGIQA3K_SAMPLE = REPO / "samples" / "agiqa3k"


def require_data(path: Path, what: str):
    """Skips a test that needs the full dataset where it is missing, or fails it where the data must be there
    (``MA_AGIQA_REQUIRE_DATA=1``, as ``.ci/run`` sets): a missing dataset must not pass for a passed run."""
    if not path.exists():
        unavailable(f"{what} not found at {path} (set MA_AGIQA_AGIQA3K)", REQUIRE_DATA)


@pytest.fixture(scope="session")
def agiqa_dir() -> Path:
    """The full AGIQA-3K (2,982 images): only for tests that measure something on many real images."""
    require_data(AGIQA3K / "labels.csv", "AGIQA-3K")
    return AGIQA3K


@pytest.fixture(scope="session")
def agiqa_sample() -> Path:
    """A small AGIQA-3K in the dataset's layout (labels.csv, images/): the 40 images in samples/."""
    return AGIQA3K_SAMPLE


@pytest.fixture(scope="session")
def agiqa_images():
    """Eight real AGIQA-3K images from four generators (from samples/), decoded by the project's own decoder."""
    from ma_agiqa.images import decode_image

    names = [
        "AttnGAN_normal_001.jpg", "AttnGAN_normal_002.jpg", "DALLE2_normal_001.jpg", "DALLE2_normal_002.jpg",
        "midjourney_normal_000.jpg", "midjourney_normal_001.jpg", "sd1.5_normal_000.jpg", "sd1.5_normal_001.jpg",
    ]
    return [decode_image((AGIQA3K_SAMPLE / "images" / n).read_bytes()) for n in names]


@pytest.fixture(scope="session")
def tiny_model():
    from ma_agiqa import create_model

    return create_model("tiny-random")


@pytest.fixture(scope="session")
def tiny_prompt_model():
    from ma_agiqa import create_model

    return create_model("tiny-random-prompt")


@pytest.fixture(scope="module")
def local_ray():
    """A real local Ray with 2 CPUs for one test module."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"MA_AGIQA_CACHE": os.environ["MA_AGIQA_CACHE"]}})
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, started before Ray so that its workers inherit the endpoint."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret", "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def local_ray_s3(s3_server):
    """A real local Ray with 2 CPUs whose workers reach the moto S3 server (started first, its settings passed on)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {
        k: os.environ[k] for k in ("MA_AGIQA_CACHE", *s3_server) if k in os.environ}})
    yield
    ray.shutdown()


# The test process ends without the interpreter's finalization. It hosts in turn several local Ray drivers, an S3
# server thread, DuckDB connections and torch's thread pools; Ray leaves native threads running after each
# ray.shutdown() (a "worker.io" and a GCS client's io thread per Ray Data run, seen here), and finalizing the
# interpreter under them crashed once, after every test had passed and been reported (CI, 2026-12-03: "380
# passed", then SIGSEGV, exit 139). The results are final by then; what is left is torn down by the kernel.
_session = None


def pytest_sessionstart(session):
    global _session
    _session = session


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _session is None:  # pytest stopped before the session began: its own ending stands
        return
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()  # a local Ray's processes are stopped by the driver, not by the kernel
    config.get_terminal_writer().flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(_session.exitstatus))
