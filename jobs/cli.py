"""The one way the curation entry points end: a user's mistake (a bad manifest, options that do not fit the
tables or the cluster) is one line on stderr and exit code 2, never a traceback; otherwise the result is
printed as JSON (without its long per-group part) followed by one line that says where the output is."""
from __future__ import annotations

import json
import sys
from typing import Callable

from ma_agiqa.curation import CurationError
from ma_agiqa.errors import OutputError, storage_errors
from ma_agiqa.manifests import ManifestError

USER_ERRORS: tuple[type[Exception], ...] = (CurationError, ManifestError, OutputError)


def storage_cause(e: BaseException) -> BaseException | None:
    """The storage error behind ``e``: itself, a RayTaskError's ``cause``, or one in the exception chain raised
    in this process; None for anything else, which stays a traceback (a bug to report). A Ray Data task's
    error reaches the driver without its chain (the cause does not survive the trip), so the pipelines' own
    steps bring storage failures back themselves: jobs.score's part writer as the run's verdict, jobs.export's
    shard writer as data (``StorageFailure``)."""
    errors, seen = storage_errors(), set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, errors):
            return getattr(e, "cause", None) if isinstance(getattr(e, "cause", None), errors) else e
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else (e.__cause__ or e.__context__)
    return None


def storage_failure(e: Exception) -> str:
    from ma_agiqa.errors import StorageFailure
    from ma_agiqa.uris import redact_text

    if isinstance(e, StorageFailure):  # already "<ErrorType>: <message>", redacted where it was raised
        return f"error: storage failed: {e}"
    return f"error: storage failed: {type(e).__name__}: {redact_text(str(e))[:300]}"


def run_and_report(args, run: Callable, where: Callable[[dict, object], str], errors=USER_ERRORS,
                   interrupted: str | None = None) -> int:
    """``interrupted``: the line Ctrl-C ends with (exit 130), saying what is kept and how to go on."""
    try:
        result = run(args)
    except errors as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if interrupted is None:
            raise
        print(f"interrupted: {interrupted}", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a storage failure, however wrapped, is one line; the rest re-raised
        if (cause := storage_cause(e)) is None:
            raise
        print(storage_failure(cause), file=sys.stderr)
        return 3
    print(json.dumps({k: v for k, v in result.items() if k != "per_group"}, indent=2, default=str))
    print(where(result, args))
    return 0
