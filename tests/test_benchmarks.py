"""Every benchmark runs: ``benchmarks/NAME.py --smoke`` (the same code path as its recorded run, on tiny-random
or a few sample images, in seconds) must exit 0 and print its result, so that a change that breaks a benchmark
fails here rather than when someone next reruns it. A benchmark without ``--smoke`` fails."""
import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import REPO, REQUIRE_PEERS, require_module

# Benchmarks whose smoke run a test of their own makes and reads field by field (minutes each on 2 cores).
SMOKED_ELSEWHERE = {"gpu_run.py": "test_gpu_run.py"}
BENCHMARKS = sorted(p for p in (REPO / "benchmarks").glob("*.py") if p.name not in SMOKED_ELSEWHERE and not p.name.startswith("_"))
# What a benchmark needs beyond the project's dependencies (``.ci/run`` installs it).
NEEDS = {"peer_maniqa.py": [("einops", REQUIRE_PEERS), ("cv2", REQUIRE_PEERS), ("pyiqa.archs.maniqa_arch", REQUIRE_PEERS)]}


def printed_results(stdout: str) -> list:
    """The JSON documents a benchmark printed (each starts a line with ``{``: ``json.dumps(result, indent=2)``)."""
    decoder, docs = json.JSONDecoder(), []
    offset = 0
    for line in stdout.splitlines(keepends=True):
        if line.startswith("{"):
            try:
                docs.append(decoder.raw_decode(stdout, offset)[0])
            except json.JSONDecodeError:
                pass
        offset += len(line)
    return docs


def has_number(value) -> bool:
    if isinstance(value, dict):
        return any(map(has_number, value.values()))
    if isinstance(value, list):
        return any(map(has_number, value))
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def test_every_benchmark_is_found():
    assert {"model_forward.py", "score_throughput.py", *NEEDS} <= {b.name for b in BENCHMARKS}
    for script, test in SMOKED_ELSEWHERE.items():
        assert (REPO / "benchmarks" / script).is_file() and "--smoke" in (REPO / "tests" / test).read_text()


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_smoke_run_prints_its_result(script):
    for module, flag in NEEDS.get(script.name, []):
        require_module(module, flag)
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # MA_AGIQA_CACHE too: the session's tiny models
    tmp = tempfile.gettempdir()
    before, started = set(os.listdir(tmp)), time.time() - 1
    out = subprocess.run([sys.executable, str(script), "--smoke"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    tail = f"\n--- stdout ---\n{out.stdout[-3000:]}\n--- stderr ---\n{out.stderr[-3000:]}"
    assert out.returncode == 0, f"{script.name} --smoke exited {out.returncode}{tail}"
    # its scratch folders are gone (named for the smoke run or the project; Ray's own session folder aside):
    # new ones, and ones an earlier run left that this run wrote into (a leftover must not hide the defect)
    ours = [n for n in os.listdir(tmp) if "smoke" in n or n.startswith("ma_agiqa")]
    left = [n for n in ours if n not in before or os.stat(os.path.join(tmp, n)).st_mtime >= started]
    assert not left, f"{script.name} --smoke left {left} in {tmp}"
    docs = printed_results(out.stdout)
    assert docs and all(isinstance(d, dict) and has_number(d) for d in docs), f"{script.name} printed no result{tail}"
