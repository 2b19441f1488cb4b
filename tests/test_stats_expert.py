"""The stats expert: each backbone channel's mean and spread over the grid as an expert of the MoE, beside the
MANIQA vector (what a linear probe of the same maps reads; benchmarks/accuracy.md)."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from ma_agiqa import create_model, from_pretrained, get_config
from ma_agiqa.config import ExpertConfig, MoEConfig
from ma_agiqa.maniqa import MANIQA

STATS = {"name": "stats", "source": "stats", "dim": None}


def _small_offline(**quality):
    cfg = get_config("ma-agiqa-offline-quality-stats")
    q = dataclasses.replace(cfg.quality, backbone="tf_efficientnet_lite0", pretrained=None,
                            views=dataclasses.replace(cfg.quality.views, size=64), **quality)
    quality_only = [e for e in cfg.moe.experts if e.source == "quality"]
    moe = MoEConfig(experts=[*quality_only, ExpertConfig(**STATS)], width=cfg.moe.width)
    return q, moe


def test_pooled_stats_are_each_channels_mean_and_spread():
    feats = torch.randn(2, 3, 4, 4)
    stats = MANIQA.pooled_stats(feats)
    assert stats.shape == (2, 6)
    assert torch.allclose(stats[1, 2], feats[1, 2].mean()) and torch.allclose(stats[0, 4], feats[0, 1].std(unbiased=False))
    # a flip or turn of the map (the training augmentation) leaves them as they are
    assert torch.allclose(MANIQA.pooled_stats(torch.rot90(feats.flip(-1), 1, (-2, -1))), stats, atol=1e-6)


def test_stats_expert_width_is_derived_and_both_paths_agree(tmp_path):
    q, moe = _small_offline()
    model = create_model("ma-agiqa-offline-quality-stats", shipped=False, quality=q, moe=moe).eval()
    stats = next(e for e in model.cfg.moe.experts if e.source == "stats")
    assert stats.dim == 2 * (24 + 40 + 112 + 320)  # lite0's levels 1-4, read from timm, never declared
    with torch.no_grad():  # give the standardisation statistics of its own, so the test can see them
        model.moe.project["stats"][0].running_mean.normal_()
    views = torch.randn(3, 2, 3, 64, 64)
    with torch.no_grad():
        score, gates = model(views)
        maps = model.quality.features(views.flatten(0, 1))
        # the cached-map path, one view: the same as the views path on that view
        one, _ = model(backbone_features=maps.view(3, 2, *maps.shape[1:])[:, 0])
        assert torch.allclose(model(views[:, :1])[0], one, atol=1e-5)
    assert gates.shape == (3, 2) and torch.isfinite(score).all()
    assert get_config("ma-agiqa-offline-quality-stats").expert_names == ["quality", "stats"]  # as the offline configs
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["moe"]["experts"][-1] == {**STATS, "dim": stats.dim}
    back = from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(back(views)[0], score, atol=1e-6)
    assert back.model_id == model.model_id


def test_stats_expert_trains_on_a_batch_of_one():
    """A BatchNorm has no statistics of one row (torch refuses it in train mode): the stats expert's
    standardisation uses its running ones instead, leaves them as they are, and the expert gets a gradient."""
    q, moe = _small_offline()
    model = create_model("ma-agiqa-offline-quality-stats", shipped=False, quality=q, moe=moe).train()
    standardize = model.moe.project["stats"][0]
    with torch.no_grad():
        standardize.running_mean.normal_()
        standardize.running_var.uniform_(0.5, 2.0)
    running = standardize.running_mean.clone(), standardize.running_var.clone()
    row = torch.randn(1, standardize.num_features)
    with pytest.raises(ValueError, match="more than 1 value"):
        torch.nn.BatchNorm1d(standardize.num_features).train()(row)
    with torch.no_grad():
        expected = (row - running[0]) / torch.sqrt(running[1] + standardize.eps) * standardize.weight + standardize.bias
        assert torch.allclose(standardize(row), expected, atol=1e-5)
    score, _ = model(backbone_features=torch.randn(1, 496, 14, 14))
    score.sum().backward()
    assert torch.equal(standardize.running_mean, running[0]) and torch.equal(standardize.running_var, running[1])
    grad = model.moe.project["stats"][1].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_a_checkpoint_built_on_another_backbone_width_is_refused(tmp_path):
    q, moe = _small_offline()
    model = create_model("ma-agiqa-offline-quality-stats", shipped=False, quality=q, moe=moe)
    model.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["moe"]["experts"][-1]["dim"] = 10
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="built 10 wide"):
        from_pretrained(tmp_path / "ckpt")


def test_a_stats_expert_is_refused_data_parallel_before_ray_starts(tmp_path):
    """Its BatchNorm standardises over the batch, which workers would split: N workers would not equal one."""
    from ma_agiqa.training import Inputs, check_data_parallel, train_distributed

    cfg = get_config("ma-agiqa-offline-quality-stats")
    assert any(e.source == "stats" for e in cfg.moe.experts)
    with_stats = create_model("ma-agiqa-offline-quality-stats", with_semantic=False, shipped=False)
    check_data_parallel(with_stats, cfg.train, 1)
    with pytest.raises(ValueError, match="moe.project.stats.0: a BatchNorm"):
        check_data_parallel(with_stats, cfg.train, 2)
    head_only = MoEConfig(experts=[e for e in cfg.moe.experts if e.source == "quality"], width=cfg.moe.width)
    check_data_parallel(create_model("ma-agiqa-offline-quality-stats", with_semantic=False, shipped=False, moe=head_only),
                        cfg.train, 2)
    with pytest.raises(ValueError, match="BatchNorm"):
        train_distributed("ma-agiqa-offline-quality-stats", {}, Inputs(mos=np.zeros(2)), Inputs(mos=np.zeros(2)), tmp_path / "out", workers=2)
    # the batch-level loss terms, set as jobs.train passes them (train overrides), are refused the same way
    with pytest.raises(ValueError, match="PLCC and ranking"):
        train_distributed("ma-agiqa-offline-quality-stats", {"rank_loss": 0.5}, Inputs(mos=np.zeros(2)), Inputs(mos=np.zeros(2)),
                          tmp_path / "out", workers=2, model_overrides={"moe": head_only})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backbone", [{"trainable_stages": 2}, {"freeze_backbone": False}])
def test_backbone_stages_that_train_with_batchnorm_are_refused_data_parallel(backbone):
    """The rule reads the modules: a CNN's BatchNorm in stages that train couples the batch as the stats
    expert's does; frozen stages stay in eval mode (their running statistics), and do not."""
    from ma_agiqa.training import batch_coupled, check_data_parallel

    q, moe = _small_offline()
    head_only = MoEConfig(experts=[e for e in moe.experts if e.source == "quality"], width=moe.width)
    frozen = create_model("ma-agiqa-offline-quality-stats", shipped=False, quality=q, moe=head_only)
    assert batch_coupled(frozen) == []
    check_data_parallel(frozen, frozen.cfg.train, 2)
    training = create_model("ma-agiqa-offline-quality-stats", shipped=False, quality=dataclasses.replace(q, **backbone),
                            moe=head_only)
    coupled = batch_coupled(training)
    assert coupled and all(name.startswith("quality.backbone.") for name in coupled)
    if "trainable_stages" in backbone:  # lite0 has 7 stages: the last two train
        assert {name.split(".")[4] for name in coupled} == {"5", "6"}
    assert not training.training  # the check leaves the model in the mode it found
    with pytest.raises(ValueError, match="quality.backbone.model.*BatchNorm.*--workers 1"):
        check_data_parallel(training, training.cfg.train, 2)
