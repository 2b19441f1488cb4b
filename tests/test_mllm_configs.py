"""Shape-faithful checks of every registered MLLM without its weights: its config.json and image-processor
config (tests/data/mllm/, sources in its README) build the model on torch's meta device (no memory, no
download), and the semantic branch's shapes are driven through it: the width the heads get, the number of
image tokens the processor writes against the number of embeddings the vision tower gives, the processor's
framing. A wrong width, token count or processor setting fails here, not on a GPU cluster."""
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from ma_agiqa import get_config, list_models
from ma_agiqa.hub import resolve, text_width
from ma_agiqa.semantic import expand_to_square, pad_colour, processor_side

DATA = Path(__file__).resolve().parent / "data" / "mllm"
STORED = {
    "llava-hf/llava-1.5-7b-hf": "llava-1.5-7b-hf",
    "llava-hf/llava-interleave-qwen-0.5b-hf": "llava-interleave-qwen-0.5b-hf",
    "Qwen/Qwen2-VL-2B-Instruct": "qwen2-vl-2b-instruct",
}
# What each model's card and paper state, against which the stored configs are read.
STATED = {
    "llava-hf/llava-1.5-7b-hf": {"width": 4096, "image_tokens": 576, "billion_params": (6.9, 7.2)},
    "llava-hf/llava-interleave-qwen-0.5b-hf": {"width": 1024, "image_tokens": 729, "billion_params": (0.8, 1.0)},
    # Qwen2-VL: one token per 28x28 pixels (14-pixel patches merged 2x2); 448x448 -> 256
    "Qwen/Qwen2-VL-2B-Instruct": {"width": 1536, "image_tokens": 256, "billion_params": (2.0, 2.3)},
}
HUB_MLLMS = sorted({c.semantic.model_id for c in map(get_config, list_models()) if c.semantic and not c.semantic.model_id.startswith("builtin:")})


def test_every_registered_mllm_has_its_configs_stored():
    assert HUB_MLLMS == sorted(STORED)
    for name in STORED.values():
        assert (DATA / name / "config.json").is_file() and (DATA / name / "preprocessor_config.json").is_file()


def _meta_model(directory: Path):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        return AutoModel.from_config(config), config


def _processor(model_id: str, directory: Path):
    """The real image processor and processor settings, with the tiny model's tokenizer of the same family
    (the tokenizer does not change the image token count)."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaProcessor, Qwen2VLProcessor

    image_processor = AutoImageProcessor.from_pretrained(directory)
    if model_id.startswith("Qwen/"):
        from transformers import Qwen2VLVideoProcessor

        tokenizer = AutoTokenizer.from_pretrained(resolve("builtin:tiny-random-qwen2-vl"))
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor())
    tokenizer = AutoTokenizer.from_pretrained(resolve("builtin:tiny-random-vlm"))
    settings = json.loads((directory / "processor_config.json").read_text())
    settings = {k: settings[k] for k in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")}
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, **settings)


@pytest.mark.parametrize("model_id", sorted(STORED))
def test_the_semantic_branch_fits_the_real_model(model_id):
    directory = DATA / STORED[model_id]
    stated = STATED[model_id]
    model, config = _meta_model(directory)
    assert all(p.device.type == "meta" for p in model.parameters())
    width = config.get_text_config().hidden_size
    # the width the driver reads from config.json without transformers' classes (or with them, where the file
    # leaves it to the class's default, as llava-1.5's does) is the model's, and what its card states
    assert text_width(str(directory)) == width == stated["width"]
    billions = sum(p.numel() for p in model.parameters()) / 1e9
    assert stated["billion_params"][0] < billions < stated["billion_params"][1]
    assert not hasattr(model, "lm_head")  # the base class: no LM head is loaded

    processor = _processor(model_id, directory)
    assert processor.image_processor.image_mean is not None and len(pad_colour(processor.image_processor)) == 3
    side = processor_side(processor.image_processor)
    wide = Image.new("RGB", (640, 360), (200, 30, 30))
    framed = expand_to_square(wide, pad_colour(processor.image_processor))
    if side is not None:  # fixed-size processor: the padded square at its side passes its resize and crop unchanged
        assert side == config.vision_config.image_size
        framed = framed.resize((side, side))
    else:
        framed = framed.resize((448, 448))
    inputs = processor.image_processor([framed], return_tensors="pt")
    tokens = processor.replace_image_token(inputs, 0).count(processor.image_token)
    assert tokens == stated["image_tokens"]

    # the vision tower and projector on the meta device give one embedding per image token, as wide as the LM
    if model_id.startswith("Qwen/"):
        grid = inputs["image_grid_thw"][0]
        patches = torch.empty(int(grid.prod()), config.vision_config.embed_dim, device="meta")
        embeddings = model.visual.merger(patches)
    else:
        out = model.get_image_features(pixel_values=inputs["pixel_values"].to("meta"), return_dict=True)
        (embeddings,) = out.pooler_output
    assert tuple(embeddings.shape) == (tokens, width)
    # and the language model turns a prompt with them into [1, T, width] hidden states
    # (a prepared 4-D mask and position ids: building them from a 2-D mask reads values, which meta tensors lack)
    length = tokens + 40
    positions = torch.empty(*((3,) if model_id.startswith("Qwen/") else ()), 1, length, dtype=torch.long, device="meta")
    hidden = model.language_model(
        inputs_embeds=torch.empty(1, length, width, device="meta"), position_ids=positions, use_cache=False,
        attention_mask=torch.ones(1, 1, length, length, dtype=torch.bool, device="meta"),
    )
    assert tuple(hidden.last_hidden_state.shape) == (1, length, width)


def test_the_stored_processor_settings_agree_with_the_model_configs():
    for model_id in ("llava-hf/llava-1.5-7b-hf", "llava-hf/llava-interleave-qwen-0.5b-hf"):
        directory = DATA / STORED[model_id]
        config = json.loads((directory / "config.json").read_text())
        settings = json.loads((directory / "processor_config.json").read_text())
        assert settings["patch_size"] == config["vision_config"]["patch_size"]
        assert settings["vision_feature_select_strategy"] == config["vision_feature_select_strategy"]
