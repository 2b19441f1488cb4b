"""What the Ray Data benchmarks share: their images and a quiet local Ray (not a benchmark itself)."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MA_AGIQA_AGIQA3K", ROOT.parent / "shared/datasets/agiqa3k"))  # the full AGIQA-3K
SAMPLE = ROOT / "samples" / "agiqa3k"  # its 40 images in the repository


def scratch_dir(prefix: str) -> str:
    """A new temporary folder for a smoke run's files, removed when the process exits however ``main`` ends
    (an exception, SystemExit): smoke runs leave nothing in the temporary directory."""
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, True)
    return path


def pick_images(n: int, smoke: bool) -> list[Path] | None:
    """The first ``n`` JPEGs of AGIQA-3K (of the sample for a smoke run), or None (said on stderr) when it
    holds fewer."""
    source = (SAMPLE if smoke else DATA) / "images"
    images = sorted(source.glob("*.jpg"))[:n]
    if len(images) < n:
        print(f"error: {source} holds {len(images)} JPEGs, fewer than {n}", file=sys.stderr)
        return None
    return images


def start_local_ray() -> None:
    """A new local Ray without the dashboard or progress bars, whose output would fill the recorded run."""
    import ray

    ray.init(address="local", include_dashboard=False, logging_level="WARNING")
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


@contextlib.contextmanager
def local_run(n: int, smoke: bool, prefix: str):
    """(the first ``n`` images, a new work folder) on a new quiet local Ray; the folder and the Ray are gone
    afterwards. SystemExit(2) where the images are missing."""
    images = pick_images(n, smoke)
    if images is None:
        raise SystemExit(2)
    import ray

    start_local_ray()
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield images, work
    finally:
        shutil.rmtree(work, ignore_errors=True)
        ray.shutdown()
