"""A feature cache directory made of entries, each published whole.

An entry is a directory holding ``ids.json`` (the image ids, in row order) and one ``NAME.npy`` per array,
row k of every array belonging to id k. It is written under a unique temporary name (``.tmp-...``) and
published by one ``os.rename`` of the whole directory, so that:

- a reader sees an entry complete or not at all: ids never pair with another write's arrays;
- concurrent writers of the same cache (parallel ``jobs.train --test-generator`` runs) each publish their
  own entries and never overwrite each other's; an image computed by both is read from the first entry
  (both are the same computation);
- a writer killed mid-write leaves only a temporary directory, which readers skip and a later writer
  removes once it is older than ``STALE_SECONDS`` (a younger one may belong to a writer still at work).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

TMP_PREFIX = ".tmp-"
STALE_SECONDS = 3600.0
IDS_FILE = "ids.json"


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def publish(directory: str | os.PathLike, ids: list[str], arrays: dict[str, np.ndarray]) -> Path:
    """Adds an entry of ``ids`` (rows of each of ``arrays``) to the cache at ``directory``; returns its path."""
    directory = Path(directory)
    if any(len(a) != len(ids) for a in arrays.values()):
        raise ValueError(f"an entry's arrays must have a row per id ({len(ids)})")
    directory.mkdir(parents=True, exist_ok=True)
    remove_stale(directory)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=directory))
    for name, array in arrays.items():
        _write_synced(tmp / f"{name}.npy", lambda f, a=array: np.save(f, np.ascontiguousarray(a)))
    _write_synced(tmp / IDS_FILE, lambda f: f.write(json.dumps(list(ids)).encode()))
    final = directory / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"  # oldest first when listed
    os.rename(tmp, final)
    return final


def read(directory: str | os.PathLike, names: list[str]) -> dict[str, tuple]:
    """{image id: (its row of each array in ``names``)} over every published entry (memory-mapped)."""
    directory = Path(directory)
    rows: dict[str, tuple] = {}
    if not directory.is_dir():
        return rows
    for entry in sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(TMP_PREFIX)):
        ids = json.loads((entry / IDS_FILE).read_text())
        arrays = [np.load(entry / f"{name}.npy", mmap_mode="r") for name in names]
        for k, image_id in enumerate(ids):
            rows.setdefault(image_id, tuple(a[k] for a in arrays))
    return rows


def remove_stale(directory: str | os.PathLike, older_than: float = STALE_SECONDS) -> None:
    """Deletes the temporary directories of writers that died (none has been touched for ``older_than`` s)."""
    now = time.time()
    for tmp in Path(directory).glob(f"{TMP_PREFIX}*"):
        try:
            if now - tmp.stat().st_mtime > older_than:
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:  # another writer removed or published it meanwhile
            pass
