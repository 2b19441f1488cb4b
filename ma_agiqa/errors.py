"""Errors shared by the light modules (storage, curation) and the image preprocessing, without importing
torch: a filter or manifest check should not pay for it."""

# 50 megapixels: 7071x7071. Generated images are rarely over 4096x4096 (16.8 MP).
DEFAULT_MAX_PIXELS = 50_000_000
# Longer side / shorter side above this is refused: a 224x224 view of a 1x10000 strip means nothing, and a
# 1-pixel side breaks resizing.
MAX_ASPECT_RATIO = 20.0

# Error kinds (the part of a row's ``error`` before the colon). Transient ones can pass on another try, so
# the next run of the same command retries them; the others are the image's own and stay unless
# --retry-errors asks.
TRANSIENT_KINDS = frozenset({"fetch", "timeout", "model", "oom"})
PERMANENT_KINDS = frozenset({
    "missing", "empty", "not_image", "truncated", "too_large", "extreme_aspect", "bad_mode", "decode",
    "unsupported_scheme", "escapes_root", "missing_uri", "nonfinite",
})


def error_kind(error: str | None) -> str | None:
    return None if error is None else error.split(":", 1)[0]


class ImageError(ValueError):
    """A per-image failure that becomes the row's error: ``kind`` is one of TRANSIENT_KINDS or
    PERMANENT_KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind
        self.message = message


class JobConfigError(ValueError):
    """Settings that cannot run: a scoring run stops before Ray starts or any model loads (jobs.score: exit
    code 2)."""


class OutputError(ValueError):
    """An output location that cannot be written (a file where a directory must go, a folder under a file, an
    endpoint that does not answer): refused before any work, one line and exit 2 (``check_output_location``)."""


def storage_errors() -> tuple[type[Exception], ...]:
    """What storage raises when it fails mid-run (a dropped connection, a full disk, an object store's
    refusal, a path that became a file): a failed run (exit 3), never a row's error."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return (OSError,)
    return (OSError, BotoCoreError, ClientError)


class StorageFailure(OSError):
    """A store's error raised inside a Ray task, brought back to the driver as its message (Ray's wrapping of
    the original would not survive the trip): ``"<ErrorType>: <message>"``."""
