"""The semantic branch on locally built tiny models of two families: LLaVA (CLIP tower + Llama, llava-1.5's
chat template, a fixed-size processor) and Qwen2-VL (dynamic resolution, M-RoPE, its own chat template)."""
import dataclasses

import pytest
import torch
from PIL import Image

from ma_agiqa.config import SemanticConfig
from ma_agiqa.hub import resolve, text_width
from ma_agiqa.semantic import SemanticExtractor, expand_to_square, load_vlm

FAMILIES = {"llava": "builtin:tiny-random-vlm", "qwen2-vl": "builtin:tiny-random-qwen2-vl"}
PROMPTS = {
    "short": "Is it coherent?",
    "long": "Evaluate the input image to determine if its quality is compromised due to a lack of meaningful "
            "semantic content, in every part of it.",
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model, processor = load_vlm(resolve(FAMILIES[request.param]))
    return request.param, model, processor


def extractor(family, **fields) -> SemanticExtractor:
    name, model, processor = family
    return SemanticExtractor(model, processor, SemanticConfig(model_id=FAMILIES[name], prompts=PROMPTS, **fields))


def image_positions(ex, inputs) -> torch.Tensor:
    return inputs["input_ids"] == ex.processor.image_token_id


# -- prompt order ---------------------------------------------------------------------------------------------
def test_the_question_comes_before_the_image_by_default(family):
    name = family[0]
    ex = extractor(family)
    assert ex.cfg.prompt_order == "question-first"
    text = ex.texts["short"]
    assert text.index("Is it coherent?\n") < text.index(ex.image_token)
    if name == "llava":  # llava-1.5's template renders images first: the reference's "USER: question\n<image>"
        assert text == f"USER: Is it coherent?\n{ex.image_token} ASSISTANT:"
        assert extractor(family, prompt_order="image-first").texts["short"] == "USER: <image>\nIs it coherent? ASSISTANT:"
    else:
        assert "Is it coherent?\n<|vision_start|><|image_pad|><|vision_end|><|im_end|>" in text
    first = extractor(family, prompt_order="image-first").texts["short"]
    assert first.index(ex.image_token) < first.index("Is it coherent?")


@pytest.mark.parametrize("order", ["question-first", "image-first"])
def test_image_tokens_see_the_question_only_when_it_comes_first(family, agiqa_images, order):
    """With causal attention the image tokens attend to what precedes them: after the question they depend on
    it, so the two prompts' hidden states at the image positions differ; before it they are identical, and the
    two vectors differ only through the question's own tokens."""
    ex = extractor(family, prompt_order=order)
    out = ex.hidden_states(agiqa_images[:2])
    (h_short, in_short), (h_long, in_long) = out["short"], out["long"]
    img_short, img_long = h_short[image_positions(ex, in_short)], h_long[image_positions(ex, in_long)]
    assert img_short.shape == img_long.shape and img_short.numel() > 0
    if order == "question-first":
        assert (img_short - img_long).abs().max() > 1e-3
    else:
        torch.testing.assert_close(img_short, img_long, atol=1e-6, rtol=1e-6)


# -- framing --------------------------------------------------------------------------------------------------
def test_images_are_padded_to_a_square_with_the_processor_mean(family):
    ex = extractor(family)
    mean = ex.processor.image_processor.image_mean
    assert ex.fill == tuple(int(m * 255) for m in mean)  # the reference's expand2square colour
    wide = Image.new("RGB", (120, 40), (250, 10, 10))
    framed = ex.frame(wide)
    assert framed.size[0] == framed.size[1]
    if ex.side is not None:  # a fixed-size processor gets the image at its own size
        assert framed.size == (ex.side, ex.side)
    assert framed.getpixel((framed.size[0] // 2, 0)) == pytest.approx(ex.fill, abs=2)  # the band above
    assert framed.getpixel((framed.size[0] // 2, framed.size[1] // 2)) == pytest.approx((250, 10, 10), abs=2)
    square = expand_to_square(wide, ex.fill)
    assert square.size == (120, 120) and square.getpixel((0, 0)) == ex.fill and square.getpixel((0, 40)) == (250, 10, 10)
    # what the processor then makes of the padding: the normalised mean, about 0
    pixels, _ = ex.encode_images([wide])
    std = torch.tensor(ex.processor.image_processor.image_std)
    expected = (torch.tensor(ex.fill) / 255 - torch.tensor(mean)) / std
    if name_of(family) == "llava":
        torch.testing.assert_close(pixels["pixel_values"][0, :, 0, 0], expected, atol=0.02, rtol=0)
    # the processor's own framing (resize + centre crop) cuts the sides off instead
    cropped = extractor(family, framing="processor")
    other = cropped.encode_images([wide])[0]["pixel_values"]
    assert other.shape != pixels["pixel_values"].shape or not torch.allclose(other, pixels["pixel_values"])


def name_of(family):
    return family[0]


def test_a_square_image_is_not_padded(family, agiqa_images):
    ex = extractor(family)
    square = agiqa_images[0]
    assert square.size[0] == square.size[1]
    assert expand_to_square(square, ex.fill) is square


# -- the processor's work, once per image ---------------------------------------------------------------------
def test_inputs_equal_the_processors_own_and_images_are_processed_once(family, agiqa_images, monkeypatch):
    """The text is tokenised per prompt, the images once: the result equals what the processor gives for
    (images, text) in one call, prompt by prompt."""
    ex = extractor(family, framing="processor")
    images = [agiqa_images[0], agiqa_images[2].resize((96, 48)), agiqa_images[4].resize((40, 72))]
    pixels, expansions = ex.encode_images(images)
    for key in PROMPTS:
        mine = ex.encode_text(key, expansions)
        theirs = ex.processor(images=[ex.frame(im) for im in images], text=[ex.texts[key]] * len(images),
                              padding=True, return_tensors="pt")
        for k in mine:
            assert torch.equal(mine[k], theirs[k]), k
        for k in pixels:
            assert torch.equal(pixels[k], theirs[k]), k
    calls = []
    original = type(ex.processor.image_processor).__call__
    monkeypatch.setattr(type(ex.processor.image_processor), "__call__", lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    forwards = []
    model_forward = ex.model.forward
    monkeypatch.setattr(ex.model, "forward", lambda *a, **kw: forwards.append(kw.get("use_cache")) or model_forward(*a, **kw))
    ex(images)
    assert len(calls) == 1  # one image-processor call for two prompts
    assert forwards == [False, False]  # one forward per prompt, no KV cache


# -- batches ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("framing", ["pad", "processor"])
def test_a_batch_gives_the_vectors_of_images_one_by_one(family, agiqa_images, framing):
    """Images of really different sizes (for Qwen2-VL: different numbers of image tokens, so the rows are
    padded to the longest) and prompts of different lengths."""
    ex = extractor(family, framing=framing)
    images = [agiqa_images[0], agiqa_images[3].resize((200, 64)), agiqa_images[5].resize((48, 160)), agiqa_images[6]]
    out = ex.hidden_states(images)
    lengths = {int(m.sum()) for _, (_, inputs) in out.items() for m in inputs["attention_mask"]}
    if name_of(family) == "qwen2-vl" and framing == "processor":
        assert len(lengths) > 2  # rows of different lengths, right-padded
    batch = ex(images)
    for i, im in enumerate(images):
        one = ex([im])
        for key in PROMPTS:
            torch.testing.assert_close(one[key][0], batch[key][i], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batch["short"], batch["long"])


def test_encoding_the_image_once_matches_encoding_it_per_prompt(family, agiqa_images):
    ex = extractor(family)
    assert ex.reuse_image_encoding  # both families accept pre-computed encoder outputs
    reused = ex(agiqa_images[:3])
    ex.reuse_image_encoding = False
    separate = ex(agiqa_images[:3])
    for key in reused:
        torch.testing.assert_close(reused[key], separate[key], atol=1e-5, rtol=1e-5)


# -- what the model states --------------------------------------------------------------------------------------
def test_the_width_comes_from_the_model(family):
    name, model, _ = family
    ex = extractor(family)
    assert ex.hidden_size == {"llava": 64, "qwen2-vl": 48}[name]
    assert text_width(FAMILIES[name]) == ex.hidden_size  # read from config.json alone, as the job's driver does
    with pytest.raises(ValueError, match=f"gives {ex.hidden_size}-wide vectors.*built for 896-wide"):
        SemanticExtractor(model, family[2], ex.cfg, expected_width=896)


def test_a_model_whose_width_no_config_declares_scores(agiqa_images):
    """tiny-random-qwen2-vl's MLLM is 48 wide, a number no config states: the heads are built to it."""
    from ma_agiqa import create_model, get_config

    assert all(e.dim is None for e in get_config("tiny-random-qwen2-vl").moe.experts if e.source == "semantic")
    model = create_model("tiny-random-qwen2-vl")
    assert [e.dim for e in model.cfg.moe.experts] == [48, 48, 784]
    out = model.score_images(agiqa_images[:2])
    assert out["score"].shape == (2,) and torch.isfinite(out["score"]).all()
    assert model.cfg.semantic.hidden_size == 48


def test_the_base_model_loads_without_its_lm_head(family, tmp_path):
    """load_vlm takes the base class (LlavaModel, Qwen2VLModel): the checkpoint's LM head is never loaded, and
    the rest equals the task model's."""
    from transformers import AutoModelForImageTextToText

    name, model, _ = family
    assert not hasattr(model, "lm_head") and type(model).__name__ in ("LlavaModel", "Qwen2VLModel")
    full = AutoModelForImageTextToText.from_pretrained(resolve(FAMILIES[name]))
    base = full.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, base["model." + k]), k


def test_a_llava_checkpoint_in_the_original_layout_loads_as_the_base_model(tmp_path, agiqa_images):
    """llava-hf's published checkpoints name their weights language_model.model.*, vision_tower.*,
    multi_modal_projector.*: transformers' LlavaModel maps them."""
    import shutil

    from safetensors.torch import load_file, save_file

    source = resolve(FAMILIES["llava"])
    shutil.copytree(source, tmp_path / "old")
    sd = load_file(str(tmp_path / "old" / "model.safetensors"))
    old = {}
    for k, v in sd.items():
        k = k.removeprefix("model.")
        if k.startswith("language_model."):
            k = "language_model.model." + k.removeprefix("language_model.")
        elif k == "lm_head.weight":
            k = "language_model.lm_head.weight"
        old[k] = v
    assert any(k.startswith("language_model.model.") for k in old)
    save_file(old, str(tmp_path / "old" / "model.safetensors"), metadata={"format": "pt"})
    new_model, processor = load_vlm(source)
    old_model, _ = load_vlm(str(tmp_path / "old"))
    cfg = SemanticConfig(model_id="x", prompts=PROMPTS)
    a = SemanticExtractor(new_model, processor, cfg)(agiqa_images[:2])
    b = SemanticExtractor(old_model, processor, cfg)(agiqa_images[:2])
    for key in a:
        torch.testing.assert_close(a[key], b[key])


def test_options_are_checked():
    with pytest.raises(ValueError, match="prompt_order"):
        SemanticConfig(model_id="x", prompt_order="image-last")
    with pytest.raises(ValueError, match="framing"):
        SemanticConfig(model_id="x", framing="crop")
    legacy = SemanticConfig.from_dict({"model_id": "x", "hidden_size": 4096})  # a checkpoint saved before
    assert dataclasses.asdict(legacy)["model_id"] == "x" and "hidden_size" not in dataclasses.asdict(legacy)


# -- framing in the job's decoding step -----------------------------------------------------------------------
def test_the_decoding_step_can_frame_images_without_the_model(family, agiqa_images):
    """Framing.of reads the processor's settings from its files (no model, no torch): images framed so reach
    the MLLM's actors at the processor's size and give the same vectors."""
    from ma_agiqa.framing import Framing

    ex = extractor(family)
    framing = Framing.of(ex.cfg)
    assert framing == ex.framing
    images = [agiqa_images[1].resize((300, 120)), agiqa_images[2]]
    framed = [framing(im) for im in images]
    assert all(ex.frame(f) is f for f in framed)  # already framed: passed as they are
    if ex.side is not None:
        assert all(f.size == (ex.side, ex.side) for f in framed)
    direct, pre = ex(images), ex(framed)
    for key in direct:
        torch.testing.assert_close(direct[key], pre[key])


def test_framing_reads_the_processor_settings_of_a_checkpoint_without_torch(tmp_path):
    import json
    import subprocess
    import sys

    from ma_agiqa import create_model

    create_model("tiny-random", with_semantic=False).save_pretrained(tmp_path / "ckpt")
    code = (
        "import json, sys\n"
        "from ma_agiqa.checkpoint import load_config\n"
        "from ma_agiqa.framing import Framing\n"
        f"f = Framing.of(load_config({str(tmp_path / 'ckpt')!r}).semantic)\n"
        "print(json.dumps({'fill': f.fill, 'side': f.side, 'pad': f.pad, 'torch': 'torch' in sys.modules}))\n"
    )
    out = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert out == {"fill": [122, 116, 104], "side": 32, "pad": True, "torch": False}
