"""The training feature cache under concurrent writers and kills: an entry is read whole or not at all, so an
image id is never paired with another write's rows (real processes, real SIGKILL)."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ma_agiqa.training import cache

REPO = Path(__file__).resolve().parents[1]

# A writer publishes entries of ids 0..n-1 whose rows say who wrote them: every value of row k of either
# array is writer * 1000 + k. A reader that pairs an id with another write's row sees a mix.
WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from ma_agiqa.training import cache

    directory, writer, rounds, n, width = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    if len(sys.argv) > 6:  # hold before publishing: the test kills the writer here, its files written
        import os, time
        os.rename = lambda *a: time.sleep(3600)
    for r in range(rounds):
        ids = [str(k) for k in (range(n) if writer % 2 else reversed(range(n)))]
        rows = np.array([writer * 1000 + int(i) for i in ids], np.float32)
        cache.publish(directory, ids, {"features": np.repeat(rows[:, None], width, 1),
                                       "cut": np.repeat(rows[:, None], 3, 1)})
""")


def writer(directory, who: int, rounds: int = 1, n: int = 20, width: int = 4, hold: bool = False):
    argv = [sys.executable, "-c", WRITER, str(directory), str(who), str(rounds), str(n), str(width)]
    return subprocess.Popen(argv + (["hold"] if hold else []), cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def consistent(rows: dict) -> set:
    """The writers whose rows were read; fails on a row that mixes two writes or sits under another id."""
    writers = set()
    for image_id, (features, cut) in rows.items():
        values = set(np.asarray(features).ravel()) | set(np.asarray(cut).ravel())
        assert len(values) == 1, f"id {image_id}: a mix of writes {values}"
        who, k = divmod(int(values.pop()), 1000)
        assert k == int(image_id), f"id {image_id} holds row {k}"
        writers.add(who)
    return writers


def test_two_concurrent_writers_of_one_cache_never_mix(tmp_path):
    directory = tmp_path / "key"
    procs = [writer(directory, who, rounds=15) for who in (1, 2)]
    seen = set()
    while any(p.poll() is None for p in procs):  # read while they write
        seen |= consistent(cache.read(directory, ["features", "cut"]))
    assert [p.returncode for p in procs] == [0, 0]
    rows = cache.read(directory, ["features", "cut"])
    assert sorted(rows, key=int) == [str(k) for k in range(20)]
    assert consistent(rows) <= {1, 2}
    assert not list(directory.glob(f"{cache.TMP_PREFIX}*"))


@pytest.mark.parametrize("where", ["before the rename", "while writing"])
def test_a_writer_killed_mid_write_leaves_nothing_half_read(tmp_path, where):
    directory = tmp_path / "key"
    big = 200_000 if where == "while writing" else 4  # 20 x 200k float32: 16 MB, synced
    proc = writer(directory, 1, n=20, width=big, hold=where == "before the rename")
    deadline = time.time() + 120
    while not list(directory.glob(f"{cache.TMP_PREFIX}*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.001)
    if where == "before the rename":  # the files are written and synced: wait for the held rename
        while not (list(directory.glob(f"{cache.TMP_PREFIX}*/ids.json"))) and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = cache.read(directory, ["features", "cut"])
    # nothing, or (the writer finished before the kill) the whole entry
    assert rows == {} or (sorted(rows, key=int) == [str(k) for k in range(20)] and consistent(rows) == {1})
    if where == "before the rename":
        assert rows == {} and len(list(directory.glob(f"{cache.TMP_PREFIX}*"))) == 1
    # a later writer succeeds beside the leftover, which is removed once stale
    assert writer(directory, 2).wait() == 0
    assert consistent(cache.read(directory, ["features", "cut"])) >= {2}
    cache.remove_stale(directory, older_than=0)
    assert not list(directory.glob(f"{cache.TMP_PREFIX}*"))


def test_an_entry_must_have_a_row_per_id(tmp_path):
    with pytest.raises(ValueError, match="a row per id"):
        cache.publish(tmp_path, ["a", "b"], {"features": np.zeros((3, 2))})
    assert cache.read(tmp_path / "none", ["features"]) == {}
