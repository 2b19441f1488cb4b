""".ci/run is README's two commands, and under it no check can skip for want of what it needs."""
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
