"""An ensemble inside one checkpoint (``EnsembleConfig``): two heads of different weights and a ridge probe,
saved, loaded through ``from_pretrained`` and scored through jobs.score, give the mean of their parts computed
apart; a single-head config's data and id are what they were."""
import dataclasses
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import SAMPLE, read_table
from ma_agiqa import create_model
from ma_agiqa.config import EnsembleConfig
from ma_agiqa.ensemble import fit_ridge
from ma_agiqa.model import assemble_ensemble
from ma_agiqa.model import from_pretrained
from ma_agiqa.training import pooled_backbone_stats


def small_model():
    """One head of ma-agiqa-offline-quality (its layout, no probe) on a random, frozen EfficientNet-Lite0 at
    64 px: seconds on a CPU."""
    from ma_agiqa import get_config

    q = get_config("ma-agiqa-offline-quality").quality
    q = dataclasses.replace(q, backbone="tf_efficientnet_lite0", pretrained=None, views=dataclasses.replace(q.views, size=64))
    return create_model("ma-agiqa-offline-quality", with_semantic=False, shipped=False, quality=q, ensemble=EnsembleConfig())


def perturbed(model, seed: int):
    """Another 'seed': the heads' weights moved, the shared backbone not."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in [*model.quality.named_parameters(), *(("moe." + n, p) for n, p in model.moe.named_parameters())]:
            if not name.startswith("backbone."):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.fixture(scope="module")
def parts(tmp_path_factory, agiqa_images):
    """Two single-head checkpoints, a probe fitted on their pooled statistics, and the assembled ensemble."""
    root = tmp_path_factory.mktemp("ensemble")
    a, b = perturbed(small_model(), 1), perturbed(small_model(), 2)
    a.save_pretrained(root / "a")
    b.save_pretrained(root / "b")
    a, b = from_pretrained(root / "a"), from_pretrained(root / "b")
    views = torch.stack([a.preprocess(im) for im in agiqa_images])
    with torch.no_grad():
        stats = a.quality.pooled_stats(a.quality.features(views.flatten(0, 1))).numpy()
    probe = fit_ridge(stats, np.linspace(1, 4, len(stats)), 10.0)
    assemble_ensemble([a, b], probe).save_pretrained(root / "ensemble")
    return {"a": a, "b": b, "probe": probe, "views": views, "stats": stats, "dir": root / "ensemble"}


def test_the_ensemble_scores_the_mean_of_its_parts_and_gates_their_mean(parts):
    model = from_pretrained(parts["dir"])
    assert (model.cfg.ensemble.heads, model.cfg.ensemble.probe) == (2, True)
    with torch.no_grad():
        (sa, ga), (sb, gb), (s, g) = (m(parts["views"]) for m in (parts["a"], parts["b"], model))
    mean, scale, weight, bias = parts["probe"]
    probe = ((parts["stats"] - mean) / scale) @ weight + bias  # the ridge in numpy, apart from the model
    assert not np.allclose(sa.numpy(), sb.numpy(), atol=1e-3)  # two different heads, not one counted twice
    np.testing.assert_allclose(s.numpy(), 0.5 * (sa + sb).numpy() / 2 + 0.5 * probe, atol=1e-4)
    np.testing.assert_allclose(g.numpy(), ((ga + gb) / 2).numpy(), atol=1e-6)
    assert model.trained and model.model_id == from_pretrained(parts["dir"]).model_id != parts["a"].model_id


def test_single_head_configs_keep_their_data_and_an_ensemble_needs_a_frozen_backbone(parts):
    single = json.loads((parts["dir"].parent / "a" / "config.json").read_text())
    assert "ensemble" not in single  # left out at its default: the ids of existing checkpoints stay
    assert json.loads((parts["dir"] / "config.json").read_text())["ensemble"]["heads"] == 2
    from ma_agiqa import get_config

    cfg = get_config("tiny-random")  # its ViT backbone trains
    with pytest.raises(ValueError, match="frozen"):
        type(cfg)(name="x", quality=cfg.quality, moe=cfg.moe, semantic=cfg.semantic, ensemble=EnsembleConfig(heads=2))


def test_jobs_score_runs_the_ensemble_checkpoint_unchanged(parts, local_ray, tmp_path):
    from jobs import score
    from ma_agiqa.images import decode_image

    out = str(tmp_path / "scores")
    summary = score.run(score.parse_args(["--model", str(parts["dir"]), "--manifest", str(SAMPLE / "manifest.jsonl"),
                                          "--image-root", str(SAMPLE), "--output", out, "--batch-size", "8"]))
    assert summary["ok"] == summary["rows"] > 0
    by_id = {r["image_id"]: r for r in read_table(out).to_pylist()}
    model = from_pretrained(parts["dir"])
    names = ["AttnGAN_normal_001", "sd1.5_normal_001"]
    expected = model.score_images([decode_image((SAMPLE / "images" / f"{n}.jpg").read_bytes()) for n in names])
    for n, s, g in zip(names, expected["score"], expected["gates"]):
        assert by_id[n]["score"] == pytest.approx(float(s), abs=1e-4)
        assert by_id[n]["gate_quality"] == pytest.approx(float(g[0]), abs=1e-4)
        assert by_id[n]["model"] == model.model_id


def test_jobs_ensemble_fits_the_probe_on_the_train_rows_only(parts, tmp_path):
    from jobs import ensemble
    from ma_agiqa.datasets import load_dataset

    members = [str(parts["dir"].parent / "a"), str(parts["dir"].parent / "b")]
    out = ensemble.run(ensemble.parse_args([*(x for m in members for x in ("--member", m)), "--probe", "--probe-alpha",
                                            "10", "--data-root", str(SAMPLE), "--output", str(tmp_path / "e")]))
    model = from_pretrained(tmp_path / "e")
    assert model.cfg.ensemble.heads == out["heads"] == 2
    df = load_dataset("agiqa3k", str(SAMPLE))
    train = df[df["split"] == "train"].reset_index(drop=True)
    assert out["probe_fitted_on"] == len(train) < len(df)
    x = pooled_backbone_stats(model, train)
    expected = fit_ridge(x, train["mos"].to_numpy(), 10.0)
    np.testing.assert_allclose(model.probe.weight.numpy(), expected[2], rtol=1e-4, atol=1e-5)
    assert not (tmp_path / "e" / "split.csv").exists()  # its members' rows are not known

    # members with their runs' split.csv: the ensemble's says which rows trained any part (train wins over val)
    # or chose something (val); a member's test rows played no role
    for name, rows in (("a", {"x1": "train", "x2": "val", "x3": "test"}), ("b", {"x2": "train", "x4": "val"})):
        shutil.copytree(parts["dir"].parent / name, tmp_path / name)
        pd.DataFrame({"image_id": list(rows), "split": list(rows.values())}).to_csv(tmp_path / name / "split.csv", index=False)
    ensemble.run(ensemble.parse_args(["--member", str(tmp_path / "a"), "--member", str(tmp_path / "b"),
                                      "--output", str(tmp_path / "g")]))
    roles = pd.read_csv(tmp_path / "g" / "split.csv")
    assert dict(zip(roles["image_id"], roles["split"])) == {"x1": "train", "x2": "train", "x4": "val"}
    with pytest.raises(SystemExit):  # nothing left to choose the strength on
        ensemble.parse_args(["--member", members[0], "--probe", "--data-root", str(SAMPLE), "--fit-on", "train+val",
                             "--output", str(tmp_path / "f")])


def test_jobs_ensemble_refuses_members_that_are_not_single_heads_before_any_work(parts, tmp_path, capsys):
    """An ensemble given as a member would lose its other heads and its probe; a member that is not there, or
    another config's head, makes no ensemble: each is one line and exit 2, and nothing is written."""
    from jobs import ensemble
    from helpers import refused

    a, b = str(parts["dir"].parent / "a"), str(parts["dir"].parent / "b")
    other = perturbed(small_model(), 3)
    other.cfg.mos_mean += 1.0  # trained on other data
    other.save_pretrained(tmp_path / "other")
    for members, pattern in (([a, str(parts["dir"])], "is an ensemble itself .*2 head"),
                             ([a, str(tmp_path / "missing")], "--member .*missing"),
                             ([a, str(tmp_path / "other")], "share the config and the MOS normalisation")):
        # --data-root that does not exist: the refusal comes before the probe reads any image
        argv = [*(x for m in members for x in ("--member", m)), "--probe", "--data-root", str(tmp_path / "none"),
                "--output", str(tmp_path / "out")]
        refused(ensemble.main, argv, capsys, pattern)
        assert not (tmp_path / "out").exists()
    refused(ensemble.main, ["--member", "ma-agiqa-offline-quality", "--output", str(tmp_path / "out")], capsys,
            "ma-agiqa-offline-quality .* is an ensemble itself .*a probe")
