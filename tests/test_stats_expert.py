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
    cfg = get_config("ma-agiqa-offline-quality")
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
    model = create_model("ma-agiqa-offline-quality", shipped=False, quality=q, moe=moe).eval()
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
    assert get_config("ma-agiqa-offline-quality").expert_names == ["quality", "stats"]  # as the offline configs
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert saved["moe"]["experts"][-1] == {**STATS, "dim": stats.dim}
    back = from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        assert torch.allclose(back(views)[0], score, atol=1e-6)
    assert back.model_id == model.model_id


def test_stats_expert_trains_on_a_batch_of_one():
    q, moe = _small_offline()
    model = create_model("ma-agiqa-offline-quality", shipped=False, quality=q, moe=moe).train()
    score, _ = model(backbone_features=torch.randn(1, 496, 14, 14))
    score.sum().backward()  # BatchNorm has no statistics of one row: its running ones serve


def test_a_checkpoint_built_on_another_backbone_width_is_refused(tmp_path):
    q, moe = _small_offline()
    model = create_model("ma-agiqa-offline-quality", shipped=False, quality=q, moe=moe)
    model.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["moe"]["experts"][-1]["dim"] = 10
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="built 10 wide"):
        from_pretrained(tmp_path / "ckpt")


def test_a_stats_expert_is_refused_data_parallel_before_ray_starts(tmp_path):
    """Its BatchNorm standardises over the batch, which workers would split: N workers would not equal one."""
    from ma_agiqa.training import Inputs, check_data_parallel, train_distributed

    cfg = get_config("ma-agiqa-offline-quality")
    assert any(e.source == "stats" for e in cfg.moe.experts)
    check_data_parallel(cfg.moe, cfg.train, 1)
    head_only = MoEConfig(experts=[e for e in cfg.moe.experts if e.source == "quality"], width=cfg.moe.width)
    check_data_parallel(head_only, cfg.train, 2)
    with pytest.raises(ValueError, match="BatchNorm"):
        train_distributed("ma-agiqa-offline-quality", {}, Inputs(mos=np.zeros(2)), Inputs(mos=np.zeros(2)), tmp_path / "out", workers=2)
    # the batch-level loss terms, set as jobs.train passes them (train overrides), are refused the same way
    with pytest.raises(ValueError, match="PLCC and ranking"):
        train_distributed("ma-agiqa-offline-quality", {"rank_loss": 0.5}, Inputs(mos=np.zeros(2)), Inputs(mos=np.zeros(2)),
                          tmp_path / "out", workers=2, model_overrides={"moe": head_only})
    assert not (tmp_path / "out").exists()
