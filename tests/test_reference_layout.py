"""The quality branch and MoE as the reference builds them (IIGROUP/MANIQA's maniqa.py and swin.py, which
MA-AGIQA runs unchanged, and MA-AGIQA's MoE), checked on small tensors against forwards written here from
the reference's description, and against pyiqa's MANIQA port when pyiqa can be imported.

The stored checkpoints' configs predate these options: they must keep today's layout.
"""
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import REQUIRE_PEERS, require_module
from ma_agiqa import get_config
from ma_agiqa.config import ExpertConfig, ModelConfig, QualityConfig
from ma_agiqa.maniqa import MANIQA, SwinStage, TransposedAttention, from_reference_state_dict, reference_key
from ma_agiqa.moe import MoEHead

CHECKPOINTS = Path(__file__).resolve().parents[1] / "ma_agiqa" / "checkpoints"
REFERENCE_FIELDS = ("tab_layout", "stage_conv", "shared_dim_mlp", "swin_drop", "swin_input_drop", "drop_path")


def tiny(quality: QualityConfig, **changes) -> QualityConfig:
    """``quality`` with a 32-wide random ViT-B/8 class (10 blocks, patch 8 at 224 px: the 28x28 grid). Tests
    of the head alone pass grid=8 and feature maps of that size: the same code, 12x fewer patches."""
    return dataclasses.replace(
        quality, backbone="vit_base_patch8_224", pretrained=None, freeze_backbone=False,
        backbone_kwargs={"embed_dim": 32, "depth": 10, "num_heads": 2}, embed_dim=32, num_heads=(2, 2), dim_mlp=48,
        **changes,
    )


def seeded(cfg: QualityConfig, seed: int = 0) -> MANIQA:
    torch.manual_seed(seed)
    return MANIQA(cfg, load_pretrained=False).eval()


@pytest.fixture(scope="module")
def paper_quality() -> MANIQA:
    """The paper config's quality branch at full size, random weights (no download)."""
    return seeded(get_config("ma-agiqa-paper").quality)


# -- the transposed-attention block --------------------------------------------------------------------------
def test_tab_reference_layout_is_the_hand_computed_scramble():
    b, c, n = 2, 6, 4
    block = TransposedAttention(n, drop=0.1, layout="reference").eval()
    x = torch.randn(b, c, n)
    with torch.no_grad():
        q, k, v = block.q(x), block.k(x), block.v(x)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(n), dim=-1) @ v  # [B, C, N]
        out = block(x)
        block.layout = "clean"
        clean = block(x)
    # The reference's (attn @ v).transpose(1, 2).reshape(B, C, N), element by element: the transposed map
    # [B, N, C] read row-major into C rows of N.
    expected = torch.empty(b, c, n)
    for i in range(b):
        flat = [a[i, ch, p].item() for p in range(n) for ch in range(c)]  # [N, C] row-major
        for ch in range(c):
            for j in range(n):
                expected[i, ch, j] = flat[ch * n + j]
    torch.testing.assert_close(out, x + expected)
    torch.testing.assert_close(clean, x + a)
    assert not torch.allclose(out, clean)
    # Spelled as an index: out[c, j] = a[(c*N + j) % C, (c*N + j) // C]
    assert expected[1, 5, 3].item() == pytest.approx(a[1, (5 * n + 3) % c, (5 * n + 3) // c].item())


# -- the paper config's quality branch (full size, random weights) -------------------------------------------
def test_paper_quality_branch_has_the_reference_stages(paper_quality):
    m = paper_quality
    assert all(t.layout == "reference" for t in [*m.tab1, *m.tab2])
    assert m.conv1.in_channels == 4 * 768 and m.conv1.out_channels == 768 and m.conv2.out_channels == 384
    convs = 0
    for stage, dim in ((m.swin1, 768), (m.swin2, 384)):
        assert len(stage.convs) == len(stage.layers) == 2  # one conv per Swin layer (the reference's BasicLayer)
        for conv in stage.convs:
            assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.padding) == (dim, dim, (3, 3), (1, 1))
            convs += sum(p.numel() for p in conv.parameters())
        blocks = [blk for layer in stage.layers for blk in layer]
        # stage 2's MLP as wide as stage 1's (the reference passes dim_mlp = 768 to both)
        assert [blk.mlp.fc1.out_features for blk in blocks] == [768] * 4
        assert [blk.mlp.fc1.in_features for blk in blocks] == [dim] * 4
        # regularisation: dropout 0.1 on the stage's input, none in the blocks, drop-path 0 -> 0.1 over the 4 blocks
        assert isinstance(stage.input_drop, torch.nn.Dropout) and stage.input_drop.p == 0.1
        assert all(blk.attn.proj_drop.p == 0 and blk.mlp.drop1.p == 0 and blk.attn.attn_drop.p == 0 for blk in blocks)
        rates = [getattr(blk.drop_path1, "drop_prob", 0.0) for blk in blocks]
        assert rates == pytest.approx([0.0, 0.1 / 3, 0.2 / 3, 0.1])
        assert rates == [getattr(blk.drop_path2, "drop_prob", 0.0) for blk in blocks]
        assert [blk.shift_size for blk in blocks] == [(0, 0), (2, 2)] * 2
    assert convs == 2 * (768 * 768 * 9 + 768) + 2 * (384 * 384 * 9 + 384)  # 13.3 M, as the reference's four
    assert [t.drop.p for t in [*m.tab1, *m.tab2]] == [0.1] * 4


def test_paper_backbone_is_the_weights_tag_the_reference_loaded(paper_quality):
    """timm builds the tag the config names (its default for the name is another fine-tune), so the views its
    pretrained_cfg gives (checked for every registered config in test_model.py) are that tag's."""
    cfg = paper_quality.cfg
    assert paper_quality.backbone.model.pretrained_cfg["tag"] == cfg.backbone.split(".", 1)[1] == "augreg_in21k_ft_in1k"
    assert cfg.views.antialias is False  # the reference's OpenCV INTER_CUBIC
    assert get_config("ma-agiqa-small").quality == cfg


def test_stage_applies_conv_then_relu_then_the_scaled_residual():
    cfg = tiny(get_config("ma-agiqa-paper").quality, grid=8)
    stage = seeded(cfg).swin1
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        y = x
        for layer, conv in zip(stage.layers, stage.convs):
            z = layer(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            y = cfg.scale * torch.relu(conv(z)) + y
        torch.testing.assert_close(stage(x), y)
        # the ReLU is there: without it some outputs would differ
        plain = x
        for layer, conv in zip(stage.layers, stage.convs):
            plain = cfg.scale * conv(layer(plain.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)) + plain
        assert not torch.allclose(stage(x), plain)


# -- the whole head against a forward written from the reference's description ------------------------------
def reference_head(m: MANIQA, feats: torch.Tensor) -> torch.Tensor:
    """MANIQA's forward after the ViT, in the reference's order and layouts, on ``m``'s own parameters, with
    the Swin blocks themselves taken as given (pyiqa's check below covers them): [B, C, g, g] -> f * w."""
    b, _, g, _ = feats.shape

    def tab(block, x):  # x [B, C, N]
        n = x.shape[-1]
        q, k, v = block.q(x), block.k(x), block.v(x)
        a = torch.softmax(q @ k.transpose(-2, -1) * n ** -0.5, dim=-1) @ v
        return a.transpose(1, 2).reshape(x.shape) + x

    def swin(stage: SwinStage, x):  # [B, C, H, W] -> tokens and back, one BasicLayer at a time
        tokens = x.flatten(2).transpose(1, 2)  # 'b c h w -> b (h w) c'
        for layer, conv in zip(stage.layers, stage.convs):
            y = tokens
            for blk in layer:
                y = blk(y.reshape(b, g, g, -1)).reshape(b, g * g, -1)
            y = F.relu(conv(y.transpose(1, 2).reshape(b, -1, g, g))).flatten(2).transpose(1, 2)
            tokens = m.cfg.scale * y + tokens
        return tokens.transpose(1, 2).reshape(b, -1, g, g)

    x = feats.flatten(2)
    for block in m.tab1:
        x = tab(block, x)
    x = swin(m.swin1, m.conv1(x.reshape(b, -1, g, g)))
    x = x.flatten(2)
    for block in m.tab2:
        x = tab(block, x)
    x = swin(m.swin2, m.conv2(x.reshape(b, -1, g, g)))
    x = x.flatten(2).transpose(1, 2)  # 'b c h w -> b (h w) c'
    return (m.score_head(x) * m.weight_head(x)).squeeze(-1)


def test_head_equals_the_reference_forward():
    m = seeded(tiny(get_config("ma-agiqa-paper").quality, grid=8))
    feats = torch.randn(2, m.backbone.out_channels, 8, 8)
    with torch.no_grad():
        q = m.head(feats)
        torch.testing.assert_close(q, reference_head(m, feats), rtol=1e-5, atol=1e-5)
        f, w = m.patch_scores(feats)
        torch.testing.assert_close(m.maniqa_score(feats), (f * w).sum(-1) / w.sum(-1))
    assert q.shape == (2, 64)


def test_training_mode_applies_the_reference_regularisation():
    m = seeded(tiny(get_config("ma-agiqa-paper").quality, grid=8)).train()
    feats = torch.randn(1, m.backbone.out_channels, 8, 8)
    torch.manual_seed(1)
    a = m.head(feats)
    torch.manual_seed(2)
    assert not torch.allclose(a, m.head(feats))  # dropout and drop-path are live in training
    m.eval()
    assert torch.equal(m.head(feats), m.head(feats))


# -- checkpoints saved before the reference's options existed keep their layout ------------------------------
@pytest.mark.parametrize("name", ["ma-agiqa-offline", "ma-agiqa-offline-quality"])
def test_stored_configs_without_the_new_fields_keep_the_old_layout(name):
    """A config.json written before these fields existed (the shipped ones, less the fields) loads with the
    layout its heads were trained with."""
    stored = json.loads((CHECKPOINTS / name / "config.json").read_text())
    for field in REFERENCE_FIELDS:
        stored["quality"].pop(field, None)
    stored["quality"]["views"].pop("antialias", None)
    stored["moe"].pop("semantic_act", None), stored["moe"].pop("semantic_dropout", None)
    cfg = ModelConfig.from_dict(stored)
    q = cfg.quality
    assert (q.tab_layout, q.stage_conv, q.shared_dim_mlp, q.swin_drop, q.swin_input_drop, q.drop_path) == (
        "clean", False, False, None, 0.0, 0.0)
    assert q.views.antialias is True
    assert (cfg.moe.semantic_act, cfg.moe.semantic_dropout) == ("none", 0.0)
    m = seeded(tiny(q, input_norm=False))
    assert m.swin1.convs is None and m.swin2.convs is None
    assert m.swin2.layers[0][0].mlp.fc1.out_features == 48 // 2
    assert m.swin1.layers[0][0].attn.proj_drop.p == q.drop and isinstance(m.swin1.input_drop, torch.nn.Identity)
    assert all(t.layout == "clean" for t in m.tab1)


@pytest.mark.parametrize("name", ["ma-agiqa-offline", "ma-agiqa-offline-quality"])
def test_registry_configs_build_what_their_shipped_heads_were_trained_in(name):
    """A registered config that ships trained heads builds the function they were trained in: the quality
    branch (layout included) and MoE of the checkpoint's config.json, and its modules take the shipped tensors
    name for name and shape for shape (random backbone weights: the backbone is not in the file)."""
    from safetensors import safe_open

    from ma_agiqa.model import MAAGIQA

    stored = ModelConfig.from_dict(json.loads((CHECKPOINTS / name / "config.json").read_text()))
    registered = get_config(name)
    model = MAAGIQA(registered, load_pretrained_backbone=False)  # fills in the widths derived from the backbone
    assert registered.quality == stored.quality and registered.moe == stored.moe
    with safe_open(str(CHECKPOINTS / name / "model.safetensors"), "pt") as f:
        shipped = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shipped == {k: tuple(v.shape) for k, v in model.trainable_state_dict().items()}


# -- MoE ----------------------------------------------------------------------------------------------------
def test_paper_moe_is_the_reference_linear_gate():
    paper = get_config("ma-agiqa-paper").moe
    assert (paper.gate, paper.semantic_act, paper.semantic_dropout, paper.dropout) == ("linear", "relu", 0.1, 0.0)
    assert get_config("ma-agiqa-small").moe.gate == "linear"
    cfg = dataclasses.replace(paper, width=5, experts=[ExpertConfig("coherence", "semantic", 7),
                                                       ExpertConfig("semantic", "semantic", 7),
                                                       ExpertConfig("quality", "quality", 9)])
    torch.manual_seed(0)
    moe = MoEHead(cfg).eval()
    feats = {"coherence": torch.randn(3, 7), "semantic": torch.randn(3, 7), "quality": torch.randn(3, 9)}
    with torch.no_grad():
        score, gates = moe(feats)
        # the reference: relu(Linear) for each semantic vector, Linear for the quality one, a Linear gate over
        # their concatenation with no softmax, the gate-weighted sum, Linear to the score
        experts = [torch.relu(moe.project["coherence"](feats["coherence"])),
                   torch.relu(moe.project["semantic"](feats["semantic"])),
                   moe.project["quality"](feats["quality"])]
        logits = moe.gate(torch.cat(experts, dim=1))
        mixed = torch.bmm(logits.unsqueeze(1), torch.stack(experts, dim=1)).squeeze(1)
        torch.testing.assert_close(gates, logits)
        torch.testing.assert_close(score, moe.regress(mixed).squeeze(-1))
    assert not torch.allclose(gates.sum(1), torch.ones(3))  # not a softmax
    dropouts = [mod.p for mod in moe.after_projection["semantic"].modules() if isinstance(mod, torch.nn.Dropout)]
    assert dropouts == [0.1] and list(moe.after_projection["quality"].modules())[0].__class__ is torch.nn.Identity


# -- pyiqa's MANIQA port as a peer --------------------------------------------------------------------------
def test_reference_key_names():
    assert reference_key("tablock2.1.c_v.bias") == "tab2.1.v.bias"
    assert reference_key("swintransformer1.layers.1.blocks.0.attn.qkv.weight") == "swin1.layers.1.0.attn.qkv.weight"
    assert reference_key("swintransformer2.layers.0.conv.weight") == "swin2.convs.0.weight"
    assert reference_key("fc_weight.3.bias") == "weight_head.3.bias"
    assert reference_key("vit.blocks.6.mlp.fc1.weight") == "backbone.model.blocks.6.mlp.fc1.weight"
    assert reference_key("vit.head.weight") is None and reference_key("swintransformer1.downsample.weight") is None


def test_pyiqa_maniqa_port_computes_the_same_function(monkeypatch):
    """pyiqa's MANIQA (a second implementation) and ours, both with random weights, pyiqa's mapped onto ours:
    the same per-patch scores and MANIQA score on the same input. pyiqa is not a dependency (it pulls in
    many); ``pip install --no-deps --target DIR pyiqa einops opencv-python-headless`` and PYTHONPATH=DIR
    runs this (benchmarks/peer_maniqa.py does the same at full size)."""
    require_module("einops", REQUIRE_PEERS)
    require_module("cv2", REQUIRE_PEERS)
    maniqa_arch = require_module("pyiqa.archs.maniqa_arch", REQUIRE_PEERS)
    import timm

    from ma_agiqa.backbones import ViTBlocks

    cfg = tiny(get_config("ma-agiqa-paper").quality)
    create = timm.create_model
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: create(
        name, pretrained=False, **{**cfg.backbone_kwargs, **kw}))
    monkeypatch.setattr(maniqa_arch, "uniform_crop", lambda x, crop_size, crop_num: x)  # one whole 224 view
    torch.manual_seed(0)
    peer = maniqa_arch.MANIQA(embed_dim=cfg.embed_dim, depths=list(cfg.depths), num_heads=list(cfg.num_heads),
                              window_size=cfg.window_size, dim_mlp=cfg.dim_mlp, num_tab=cfg.num_tab,
                              scale=cfg.scale, test_sample=1, pretrained=False).eval()
    ours = seeded(cfg, seed=1)
    assert isinstance(ours.backbone, ViTBlocks)
    mapped, left = from_reference_state_dict(ours, peer.state_dict())
    ours.load_state_dict(mapped)
    # what has no counterpart: the ViT's classifier, each stage's unused downsample conv, buffers timm recomputes
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in left if not k.endswith(("attn_mask", "relative_position_index"))} \
        == {"vit.head", "swintransformer1.downsample", "swintransformer2.downsample"}
    captured = {}
    peer.fc_score.register_forward_hook(lambda mod, i, o: captured.__setitem__("f", o.squeeze(-1)))
    peer.fc_weight.register_forward_hook(lambda mod, i, o: captured.__setitem__("w", o.squeeze(-1)))
    image = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        peer_score = peer(image).squeeze(1)
        views = (image - 0.5) / 0.5  # pyiqa's inception mean and std, the ViT's own
        f, w = ours.patch_scores(ours.features(views))
        torch.testing.assert_close(f, captured["f"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(w, captured["w"], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.maniqa_score(ours.features(views)), peer_score, rtol=1e-4, atol=1e-5)
        # and the clean layout is a different function on the same weights
        for t in [*ours.tab1, *ours.tab2]:
            t.layout = "clean"
        assert not torch.allclose(ours.patch_scores(ours.features(views))[0], captured["f"], atol=1e-3)


# -- the quality view's resize ------------------------------------------------------------------------------
def _cubic_halve(a: "np.ndarray", axis: int) -> "np.ndarray":
    """OpenCV's INTER_CUBIC for an exact 2x shrink along ``axis``, by hand: output i sits at input 2i + 0.5,
    between pixels 2i and 2i + 1, whose Keys kernel (a = -0.75) weights at distances 1.5, 0.5, 0.5, 1.5 are
    -0.09375, 0.59375, 0.59375, -0.09375; edges replicated."""
    import numpy as np

    a = np.moveaxis(a.astype(np.float64), axis, 0)
    n = a.shape[0]
    taps = [(-1, -0.09375), (0, 0.59375), (1, 0.59375), (2, -0.09375)]
    out = np.stack([sum(w * a[min(max(2 * i + d, 0), n - 1)] for d, w in taps) for i in range(n // 2)])
    return np.moveaxis(out, 0, axis)


def test_resize_without_antialias_is_the_reference_cubic():
    import numpy as np
    from PIL import Image

    from ma_agiqa.config import QualityViews
    from ma_agiqa.preprocess import quality_pixels

    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    ours = quality_pixels(img, QualityViews(size=8, antialias=False))[0].permute(1, 2, 0).numpy().astype(int)
    by_hand = np.clip(np.round(_cubic_halve(_cubic_halve(arr, 0), 1)), 0, 255).astype(int)
    assert np.abs(ours - by_hand).max() <= 1 and (ours == by_hand).mean() > 0.95
    pil = quality_pixels(img, QualityViews(size=8))[0].permute(1, 2, 0).numpy().astype(int)
    assert np.array_equal(pil, np.asarray(img.resize((8, 8), Image.BICUBIC)))  # the default is unchanged
    assert np.abs(pil - by_hand).mean() > 5  # and antialiasing is a different resize


def test_resize_without_antialias_matches_opencv():
    import numpy as np
    from PIL import Image

    from ma_agiqa.config import QualityViews
    from ma_agiqa.preprocess import quality_pixels

    cv2 = require_module("cv2", REQUIRE_PEERS)
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (512, 384, 3), dtype=np.uint8))
    ours = quality_pixels(big, QualityViews(antialias=False))[0].permute(1, 2, 0).numpy().astype(int)
    theirs = cv2.resize(np.asarray(big), (224, 224), interpolation=cv2.INTER_CUBIC).astype(int)
    assert np.abs(ours - theirs).max() <= 1
