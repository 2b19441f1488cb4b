"""Scoring as a library call (ma_agiqa.scoring): the request's checks, the model resolved from files, the
summary ``score`` returns; the checkpoint reader; and the package's import hygiene (no circle, no jobs/ or
benchmarks/ import, no torch in the drivers)."""
import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, SAMPLE, read_table
from jobs import score as score_cli
from ma_agiqa.scoring import JobConfigError, ScoreRequest, score
from ma_agiqa.scoring.layout import plan_layout
from ma_agiqa.scoring.model_ref import resolve_model


# -- the request -------------------------------------------------------------------------------------------
def test_every_request_field_is_a_job_option_with_the_same_default():
    args = score_cli.parse_args(["--manifest", "m", "--output", "o"])
    request = score_cli.request_from(args, args.manifest, args.output, rows_per_file=args.rows_per_file)
    assert request == ScoreRequest("m", "o")
    parsed = score_cli.parse_args(["--manifest", "m", "--output", "o", "--keep-columns", " a, b,", "--limit", "0"])
    assert score_cli.request_from(parsed, "m", "o").keep_columns == ["a", "b"]
    assert score_cli.request_from(parsed, "m", "o").limit == 0


@pytest.mark.parametrize("field, value", [
    ("batch_size", 0), ("rows_per_file", 0), ("max_bytes", 0), ("max_pixels", -1), ("semantic_actors", 0),
    ("quality_actors", 0), ("threads_per_actor", 0), ("limit", -1), ("gpus_per_actor", -0.5),
    ("cpus_per_actor", float("nan")), ("wait_for_cluster", -1), ("max_error_fraction", 1.5),
    ("max_error_fraction", float("nan")), ("fuse", "maybe"), ("manifest", ""),
])
def test_values_no_run_can_use_are_refused_naming_the_option(field, value):
    with pytest.raises(JobConfigError, match="--" + field.replace("_", "-")):
        ScoreRequest(**{"manifest": "m", "output": "o", field: value}).check()


def test_zero_means_zero_where_zero_can_run():
    zero = ScoreRequest("m", "o", limit=0, max_error_fraction=0.0, gpus_per_actor=0.0, cpus_per_actor=0.0, wait_for_cluster=0)
    zero.check()
    layout = plan_layout(zero, True, {"CPU": 8, "GPU": 4})  # a GPU cluster: the default would be a GPU per actor
    assert (layout.gpus, layout.cpus, layout.fused, layout.threads) == (0.0, 0.0, True, 1)


def test_a_limit_of_zero_is_an_empty_run_not_no_limit(tmp_path):
    with pytest.raises(score_cli.ManifestError, match="empty: no rows within --limit"):
        score(ScoreRequest(str(SAMPLE / "manifest.jsonl"), str(tmp_path / "o"), model="tiny-random", limit=0, allow_untrained=True))


# -- the model, resolved once --------------------------------------------------------------------------------
def test_unknown_models_and_untrained_heads_stop_before_ray_and_any_download(tmp_path, monkeypatch):
    import ma_agiqa.framing
    import ma_agiqa.hub
    import ma_agiqa.scoring.run

    def no(*a, **kw):
        pytest.fail("went further than the refusal")

    for module, name in ((ma_agiqa.scoring.run, "init_ray"), (ma_agiqa.hub, "model_config"),
                         (ma_agiqa.framing, "image_processor_settings")):
        monkeypatch.setattr(module, name, no)
    base = dict(manifest=str(SAMPLE / "manifest.jsonl"), output=str(tmp_path / "o"))
    with pytest.raises(JobConfigError, match="unknown model 'no-such-model'"):
        score(ScoreRequest(**base, model="no-such-model"))
    with pytest.raises(JobConfigError, match="unknown model"):  # a directory without a checkpoint
        resolve_model(str(tmp_path))
    # ma-agiqa-paper's MLLM is a hub model: its width and framing would be downloaded, after the refusal
    with pytest.raises(JobConfigError, match="never trained"):
        score(ScoreRequest(**base, model="ma-agiqa-paper"))
    shipped = resolve_model("ma-agiqa-offline")
    assert shipped.trained and shipped.directory is not None and not resolve_model("tiny-random").trained
    assert not (tmp_path / "o").exists()


# -- the library call ------------------------------------------------------------------------------------------
def test_score_returns_the_summary_it_writes(local_ray, tmp_path):
    from ma_agiqa.checkpoint import model_id

    out = tmp_path / "scores"
    request = ScoreRequest(manifest=str(SAMPLE / "manifest.jsonl"), image_root=str(SAMPLE), output=str(out),
                           model="tiny-random", allow_untrained=True, limit=8, batch_size=8, keep_columns=["prompt"])
    summary = score(request)
    assert summary == json.loads((out / "_summary.json").read_text())
    table = read_table(str(out))
    assert summary["rows"] == summary["ok"] == summary["table_rows"] == table.num_rows == 8
    assert summary["model_id"] == model_id("tiny-random") == table["model"][0].as_py()
    assert table["prompt"].null_count == 0 and summary["failed"] is False


# -- checkpoints read without torch -------------------------------------------------------------------------
def _torch_hash(path) -> tuple[str, dict]:
    """The weights hash and metadata as torch reads the file (the hash a model computes when it saves)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ma_agiqa.model import weights_hash

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return weights_hash(load_file(str(path))), metadata


def test_the_checkpoint_reader_hashes_what_torch_loads(tmp_path):
    import torch
    from safetensors.torch import save_file

    from ma_agiqa.checkpoint import WEIGHTS_FILE, hash_weights, shipped_checkpoint, stored_metadata, stored_tensors

    mixed = tmp_path / "mixed.safetensors"  # dtypes numpy has and lacks, a 0-dim counter, names out of order
    save_file({"z": torch.randn(3, 4).to(torch.bfloat16), "a": torch.arange(5, dtype=torch.float16),
               "m": torch.tensor(7), "b": torch.randn(2, 2)}, str(mixed), metadata={"k": "v"})
    files = [mixed] + [shipped_checkpoint(n) / WEIGHTS_FILE for n in ("ma-agiqa-offline", "ma-agiqa-offline-quality")]
    for path in files:
        assert (hash_weights(stored_tensors(path)), stored_metadata(path)) == _torch_hash(path), path


# -- import hygiene -----------------------------------------------------------------------------------------------
def _imports(package: Path) -> dict[str, set[str]]:
    """Module -> the modules it imports (at the top or inside functions), as dotted names."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(p for p in (base, node.module) if p)
                found |= {target} | {f"{target}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = found
    return graph


def _circles(graph: dict[str, set[str]]) -> list[str]:
    """The modules that import themselves through others."""
    edges = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}

    def reaches(start, goal):
        seen, todo = set(), list(edges[start])
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo.extend(edges[m])
        return False

    return sorted(m for m in edges if reaches(m, m))


def test_the_library_has_no_import_circle_and_never_imports_jobs_or_benchmarks(tmp_path):
    graph = _imports(REPO / "ma_agiqa")
    outside = {m: sorted(d for d in deps if d.split(".")[0] in ("jobs", "benchmarks")) for m, deps in graph.items()}
    assert {m: d for m, d in outside.items() if d} == {}
    assert _circles(graph) == []
    # the check sees a circle made of a lazy import, as config -> hub -> tiny -> config was
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("from .b import x\n")
    (tmp_path / "pkg" / "b.py").write_text("def x():\n    from . import c\n")
    (tmp_path / "pkg" / "c.py").write_text("from pkg.a import x\n")
    assert _circles(_imports(tmp_path / "pkg")) == ["pkg.a", "pkg.b", "pkg.c"]


def test_the_drivers_of_score_and_report_do_not_load_torch():
    code = (
        "import sys\n"
        "import jobs.report, jobs.score, jobs.curate\n"
        "from ma_agiqa.scoring.plan import ManifestFiles, plan_input\n"
        f"plan_input(ManifestFiles.open({str(SAMPLE / 'manifest.jsonl')!r}), 'unused')\n"
        "print([m for m in ('torch', 'timm', 'transformers') if m in sys.modules])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.stdout.strip() == "[]"
