"""A scoring run's request: every option of ``jobs.score`` as a field with its default, and the checks of
their values that need nothing but the values."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import DEFAULT_MAX_PIXELS, JobConfigError
from ..fetch import CONNECT_TIMEOUT, DEFAULT_MAX_BYTES, FETCH_TIMEOUT, READ_TIMEOUT
from ..registry import DEFAULT_MODEL
from .monitor import MAX_FAILED_BATCHES

FUSE_CHOICES = ("auto", "on", "off")


@dataclass
class ScoreRequest:
    """What to score, with which model, where to write it, and how to lay the job out on Ray. Field names
    are jobs.score's options (``--batch-size`` is ``batch_size``); None means "work it out" where the CLI's
    help says so, and never stands in for zero."""

    manifest: str  # a manifest, a folder of images, Parquet with images, tar shards (scoring.inputs; local or remote)
    output: str  # directory URI of the score table
    model: str = DEFAULT_MODEL  # a registered name, or a checkpoint directory (local or s3://)
    allow_untrained: bool = False  # score with heads never trained (random: tests and smoke runs)
    image_root: str | None = None  # relative uris are resolved against it; every uri must lie inside it
    allow_outside_root: bool = False
    address: str | None = None  # Ray address; None: RAY_ADDRESS, else a local Ray
    batch_size: int = 16  # images per model batch
    semantic_actors: int | None = None
    quality_actors: int | None = None
    gpus_per_actor: float | None = None
    wait_for_cluster: float = 900  # seconds
    cpus_per_actor: float | None = None
    threads_per_actor: int | None = None
    fuse: str = "auto"  # one of FUSE_CHOICES
    keep_columns: list[str] = field(default_factory=list)  # manifest columns copied into the score table
    prompt_column: str | None = None  # None: "prompt" if the model has a prompt expert; "": no prompts
    keep_features: bool = False  # also write the semantic vectors (float16)
    limit: int | None = None  # score only the first N manifest rows
    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    retry_errors: bool = False  # also score again rows whose error is permanent
    max_error_fraction: float = 0.1  # above it the summary says failed (jobs.score: exit 3)
    s3_endpoint: str | None = None  # sets AWS_ENDPOINT_URL
    rows_per_file: int = 5000  # rows per output Parquet part
    # Failing fast (monitor.py): the error fraction is judged while the run runs, once this many rows are done
    # (None: 200, or two batches per model actor where that is more); 0 judges from the first batch.
    min_rows_for_error_fraction: int | None = None
    max_failed_batches: int = MAX_FAILED_BATCHES  # a model stage failing on every row of this many batches in a row stops the run; 0: never
    allow_cpu_fallback: bool = False  # a GPU actor whose torch sees no CUDA runs on CPU instead of stopping the run
    connect_timeout: float = CONNECT_TIMEOUT  # seconds, per request to an object store
    read_timeout: float = READ_TIMEOUT  # seconds without a byte, per request
    fetch_timeout: float = FETCH_TIMEOUT  # seconds, per object, retries included; 0: no deadline
    input_kind: str = "auto"  # "images": ``manifest`` is a folder or glob of images (jobs.score --images)
    image_column: str | None = None  # Parquet input whose column holds the image bytes
    id_column: str | None = None  # with image_column: the column of ids (else a digest of the bytes)
    prompt_from: str = "sidecar"  # or "metadata": a folder's prompts from PNG text chunks, then sidecars
    shared_filesystem: bool = False  # a local --output is the same storage on every node of the cluster

    def check(self) -> None:
        """Raises JobConfigError on values no run can use; zero is taken as zero wherever it can run."""
        for name in ("manifest", "output"):
            if not getattr(self, name):
                raise JobConfigError(f"--{name} is required")
        at_least_one = ("batch_size", "rows_per_file", "max_bytes", "max_pixels", "semantic_actors", "quality_actors",
                        "threads_per_actor")
        for name in at_least_one:
            value = getattr(self, name)
            if value is not None and not value >= 1:
                raise JobConfigError(f"{_flag(name)} must be at least 1, got {value}")
        for name in ("limit", "gpus_per_actor", "cpus_per_actor", "wait_for_cluster", "min_rows_for_error_fraction",
                     "max_failed_batches", "fetch_timeout"):
            value = getattr(self, name)
            if value is not None and not value >= 0:  # NaN too
                raise JobConfigError(f"{_flag(name)} must be 0 or more, got {value}")
        for name in ("connect_timeout", "read_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise JobConfigError(f"{_flag(name)} must be more than 0 seconds, got {value}")
        if not 0 <= self.max_error_fraction <= 1:
            raise JobConfigError(f"--max-error-fraction must be between 0 and 1, got {self.max_error_fraction}")
        if self.fuse not in FUSE_CHOICES:
            raise JobConfigError(f"--fuse must be one of {', '.join(FUSE_CHOICES)}, got {self.fuse!r}")
        if self.input_kind not in ("auto", "images"):
            raise JobConfigError(f"input_kind must be 'auto' or 'images', got {self.input_kind!r}")
        if self.prompt_from not in ("sidecar", "metadata"):
            raise JobConfigError(f"--prompt-from must be sidecar or metadata, got {self.prompt_from!r}")
        if isinstance(self.keep_columns, str):
            raise JobConfigError("keep_columns is a list of column names, not one string")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
