"""``semantic.pooling``: the last hidden layer averaged over every position (the reference's), the image tokens
or the other positions, on both MLLM families, batched with right padding; model ids unchanged."""
import dataclasses

import pytest
import torch

from ma_agiqa import get_config, list_models
from ma_agiqa.checkpoint import UNTRAINED, identity
from ma_agiqa.config import POOLINGS, ModelConfig, SemanticConfig
from ma_agiqa.hub import resolve
from ma_agiqa.semantic import SemanticExtractor, load_vlm, pool_hidden

FAMILIES = ["builtin:tiny-random-vlm", "builtin:tiny-random-qwen2-vl"]


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request):
    model, processor = load_vlm(resolve(request.param))
    return request.param, model, processor


def _extractor(vlm, **changes):
    model_id, model, processor = vlm
    return SemanticExtractor(model, processor, SemanticConfig(model_id=model_id, **changes))


def _mixed_sizes(images):
    """Images whose token counts differ under the processor's own framing (Qwen2-VL: dynamic resolution), so
    that a batch of them is right-padded."""
    wide = images[1].crop((0, 0, images[1].width, images[1].height // 3))
    return [images[0], wide, images[2]]


def _independent(model, processor, text, image, positions):
    """The mean of one image's last hidden layer over the positions ``positions(ids, image_id)`` picks, from the
    processor and the model called directly, one image at a time (no padding)."""
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**inputs, use_cache=False).last_hidden_state[0].float()
    image_id = getattr(model.config, "image_token_id", None) or model.config.image_token_index
    keep = positions(inputs["input_ids"][0], image_id)
    assert 0 < int(keep.sum()) < len(keep)
    return hidden[keep].mean(0)


def test_pool_hidden_picks_image_or_text_positions_and_never_padding():
    hidden = torch.randn(2, 6, 3)
    real = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    image = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0]]).bool()
    pooled = {p: pool_hidden(hidden, real, p, image) for p in ("image", "text", "mean")}
    torch.testing.assert_close(pooled["image"][0], hidden[0, 1:3].mean(0))
    torch.testing.assert_close(pooled["text"][0], hidden[0, [0, 3]].mean(0))  # not the pads at 4, 5
    torch.testing.assert_close(pooled["image"][1], hidden[1, 2:5].mean(0))
    torch.testing.assert_close(pooled["text"][1], hidden[1, [0, 1, 5]].mean(0))
    torch.testing.assert_close(pooled["mean"][0], hidden[0, :4].mean(0))
    with pytest.raises(ValueError, match="image tokens"):
        pool_hidden(hidden, real, "image")


@pytest.mark.parametrize("pooling", ["image", "text"])
def test_pooled_vectors_equal_an_independent_mean_in_a_padded_batch(vlm, agiqa_images, pooling):
    _, model, processor = vlm
    ex = _extractor(vlm, pooling=pooling, framing="processor")
    images = _mixed_sizes(agiqa_images)
    batch = ex(images)
    if "qwen2" in vlm[0]:  # the dynamic-resolution family: the batch really is padded
        lengths = ex.hidden_states(images, ["coherence"])["coherence"][1]["attention_mask"].sum(1)
        assert len(set(lengths.tolist())) > 1
    if pooling == "image":
        def pick(ids, image_id): return ids == image_id
    else:
        def pick(ids, image_id): return ids != image_id
    for key in ex.cfg.prompts:
        for i, image in enumerate(images):
            expected = _independent(model, processor, ex.texts[key], ex.frame(image), pick)
            torch.testing.assert_close(batch[key][i], expected, atol=1e-4, rtol=1e-4)


def test_the_poolings_give_different_vectors(vlm, agiqa_images):
    vectors = {p: _extractor(vlm, pooling=p)(agiqa_images[:2])["coherence"] for p in POOLINGS}
    for a in POOLINGS:
        for b in POOLINGS:
            if a < b:
                assert not torch.allclose(vectors[a], vectors[b]), (a, b)


def test_the_two_prompts_image_vectors_differ_only_when_the_question_comes_first(vlm, agiqa_images):
    """Question first (the reference's order), the image tokens attend to the question under causal attention,
    so each prompt's image vector is its own; image first, they come before any question and are the same."""
    first = _extractor(vlm, pooling="image")(agiqa_images[:2])
    assert not torch.allclose(first["coherence"], first["semantic"], atol=1e-4)
    after = _extractor(vlm, pooling="image", prompt_order="image-first")(agiqa_images[:2])
    torch.testing.assert_close(after["coherence"], after["semantic"], atol=1e-5, rtol=1e-5)


def test_model_ids_are_unchanged_and_each_pooling_has_its_own():
    """Every config written before ``image``/``text`` existed holds ``"pooling": "mean"``: it must load to the
    registered configs' ids; another pooling is another model (id) and other features (cache key)."""
    for name in list_models():
        cfg = get_config(name)
        if cfg.semantic is None:
            continue
        assert cfg.semantic.pooling == SemanticConfig.__dataclass_fields__["pooling"].default
        data = cfg.to_dict()
        data["semantic"]["pooling"] = "mean"
        assert identity(ModelConfig.from_dict(data), UNTRAINED) == identity(cfg, UNTRAINED), name
    cfg = get_config("ma-agiqa-paper")
    variants = [dataclasses.replace(cfg, semantic=dataclasses.replace(cfg.semantic, pooling=p)) for p in POOLINGS]
    assert len({identity(v, UNTRAINED) for v in variants}) == len(POOLINGS)
    assert len({v.semantic.prompt_hash() for v in variants}) == len(POOLINGS)
    with pytest.raises(ValueError, match="pooling"):
        SemanticConfig(model_id="x", pooling="max")
