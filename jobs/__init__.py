"""Command lines over the ma_agiqa library (``python -m jobs.NAME``).

Run from an interpreter without the project installed, a job would stop on its first import with a
traceback; it says so in one line instead (exit 2)."""
import importlib.util
import sys

# What every job's driver imports (torch is only needed where a model runs).
_NEEDED = ("numpy", "pandas", "pyarrow", "fsspec", "duckdb", "ray")
_missing = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
if _missing:
    sys.stderr.write(f"this Python ({sys.executable}) lacks {', '.join(_missing)}: install ma-agiqa first "
                     "(pip install -e . in the checkout, as README.md says)\n")
    sys.exit(2)
