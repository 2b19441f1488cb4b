""".ci/run is README's two commands, and under it no check can skip for want of what it needs."""
import os
import re
import subprocess
import sys

import pytest

from helpers import REPO, REQUIRE_FLAGS, REQUIRE_PEERS, require_module, unavailable

CI = REPO / ".ci" / "run"


def test_ci_runs_the_readme_commands_in_order():
    setup = REPO.joinpath("README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)\n```", setup, re.S)
    assert len(commands) == 2 and "pytest" in commands[1]
    lines = CI.read_text().splitlines()
    assert all(c in lines for c in commands)
    assert lines.index(commands[0]) < lines.index(commands[1]) == len(lines) - 1  # the tests run last
    subprocess.run(["bash", "-n", str(CI)], check=True)


def test_ci_sets_every_require_flag_the_tests_use():
    exported = set(re.findall(r"\b(MA_AGIQA_REQUIRE_\w+)=1", CI.read_text()))
    assert exported == set(REQUIRE_FLAGS)
    used = {f for path in (REPO / "tests").glob("*.py") for f in re.findall(r"MA_AGIQA_REQUIRE_\w+", path.read_text())}
    assert used <= set(REQUIRE_FLAGS)
    # and no test skips around them: pytest's own optional-import skip would pass for a passed run
    for path in (REPO / "tests").glob("test_*.py"):
        assert path.name == "test_ci.py" or "importorskip" not in path.read_text(), path.name


def test_something_missing_skips_or_fails_by_its_flag(monkeypatch):
    monkeypatch.delenv(REQUIRE_PEERS, raising=False)
    with pytest.raises(pytest.skip.Exception, match="no_such_module_here"):
        require_module("no_such_module_here", REQUIRE_PEERS)
    monkeypatch.setenv(REQUIRE_PEERS, "1")
    with pytest.raises(pytest.fail.Exception, match=f"no_such_module_here.*{REQUIRE_PEERS} is set"):
        require_module("no_such_module_here", REQUIRE_PEERS)
    assert require_module("json", REQUIRE_PEERS) is sys.modules["json"]  # present: imported, neither
    with pytest.raises(ValueError, match="unknown flag"):
        unavailable("x", "MA_AGIQA_NO_SUCH_FLAG")


@pytest.mark.parametrize("body, status, said", [
    ("def test_ok():\n    pass\n", 0, "1 passed"),
    ("def test_bad():\n    assert 1 == 2\n", 1, "1 failed"),
    ("x = 1\n", 5, "no tests ran"),
    ("import nothing_of_this_name\n", 2, "1 error"),
])
def test_the_test_process_ends_with_pytest_s_own_status_and_report(tmp_path, body, status, said):
    """tests/conftest.py ends the test process without the interpreter's finalization (os._exit): it must still
    end with the status pytest chose, after its whole report, or CI would pass on a failure."""
    (tmp_path / "test_x.py").write_text(body)
    env = dict(os.environ, PYTHONPATH=str(REPO / "tests"))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == status, run.stdout[-2000:] + run.stderr[-2000:]
    assert said in run.stdout.splitlines()[-1], run.stdout[-2000:]
