"""Where built tiny models, fetched checkpoints and training feature caches live (a leaf module: ``hub``
resolves built-in models through ``tiny``, and both need this)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``MA_AGIQA_CACHE``, else ``~/.cache/ma_agiqa``."""
    return Path(os.environ.get("MA_AGIQA_CACHE", Path.home() / ".cache" / "ma_agiqa"))
