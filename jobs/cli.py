"""The one way the curation entry points end: a user's mistake (a bad manifest, options that do not fit the
tables or the cluster) is one line on stderr and exit code 2, never a traceback; otherwise the result is
printed as JSON (without its long per-group part) followed by one line that says where the output is."""
from __future__ import annotations

import json
import sys
from typing import Callable

from ma_agiqa.curation import CurationError
from ma_agiqa.manifests import ManifestError

USER_ERRORS: tuple[type[Exception], ...] = (CurationError, ManifestError)


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
    print(json.dumps({k: v for k, v in result.items() if k != "per_group"}, indent=2, default=str))
    print(where(result, args))
    return 0
