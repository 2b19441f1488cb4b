"""Tiny random models of real classes, built here with no download: a LLaVA (CLIP vision tower + Llama), a
Qwen2-VL (its own dynamic-resolution vision tower, M-RoPE, a different chat template and processor) and a BERT
sentence encoder, each with a tokenizer trained locally. They are saved to a directory and loaded back with
``from_pretrained``, the path real checkpoints take. Each carries its family's real chat template, so the
prompt layout the semantic branch builds is the one the real models get.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .cache import cache_dir
from .prompts import COHERENCE_PROMPT, SEMANTIC_PROMPT

# llava-hf/llava-1.5-7b-hf's chat template (its chat_template.json; tests/data/mllm/README.md says where it was
# read). It renders every image before the text, whatever their order in the message.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
# Qwen/Qwen2-VL-2B-Instruct's chat template (its chat_template.json): content items in their given order, a
# default system turn, each image as <|vision_start|><|image_pad|><|vision_end|>.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    COHERENCE_PROMPT,
    SEMANTIC_PROMPT,
    "USER: ASSISTANT: describe the image quality, aesthetics, realism, artifacts, blur, noise.",
    "system\nYou are a helpful assistant.\nuser\nassistant\n",
    "a photo of a cat, a dog, a tray of sushi, a man lost in space, a landscape painting, a city at night.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",
]

VLM_IMAGE_SIZE = 32
VLM_PATCH = 8
# The tiny Qwen2-VL: 8-pixel patches merged 2x2, so one image token per 16x16 pixels, between 4 and 64 tokens.
QWEN_PATCH = 8
QWEN_MERGE = 2
QWEN_MIN_PIXELS = 32 * 32
QWEN_MAX_PIXELS = 128 * 128




def _train_tokenizer(special: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def build_tiny_vlm(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random LlavaForConditionalGeneration with its processor to ``path``."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = _train_tokenizer(["<pad>", "<s>", "</s>", "<image>"])
    tokenizer.add_special_tokens(
        {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["<image>"]}
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": VLM_IMAGE_SIZE},
        crop_size={"height": VLM_IMAGE_SIZE, "width": VLM_IMAGE_SIZE},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=VLM_PATCH,
        vision_feature_select_strategy="default",
        chat_template=LLAVA_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=VLM_IMAGE_SIZE, patch_size=VLM_PATCH, projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    import torch  # here, not at the top: resolving a built model's directory needs no torch

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    return _save_atomically(path, [model, processor])


def build_tiny_qwen2_vl(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random Qwen2VLForConditionalGeneration with its processor (Qwen2-VL's image processor:
    dynamic resolution, so images of different sizes get different numbers of image tokens) to ``path``.
    48 wide, a width no config declares."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
               "<|video_pad|>"]
    tokenizer = _train_tokenizer(special)
    tokenizer.add_special_tokens(
        {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "additional_special_tokens": special[1:]}
    )
    image_processor = Qwen2VLImageProcessor(
        min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, patch_size=QWEN_PATCH, merge_size=QWEN_MERGE,
        temporal_patch_size=2,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    video_processor = Qwen2VLVideoProcessor(  # unused here, but a Qwen2-VL processor is not complete without one
        min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, patch_size=QWEN_PATCH, merge_size=QWEN_MERGE,
        temporal_patch_size=2,
    )
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "mrope_section": [2, 2, 2], "rope_theta": 10000.0},
            bos_token_id=None, eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2, embed_dim=32, hidden_size=48, num_heads=2, mlp_ratio=2, patch_size=QWEN_PATCH,
            spatial_merge_size=QWEN_MERGE, temporal_patch_size=2,
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    import torch  # here, not at the top: resolving a built model's directory needs no torch

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    return _save_atomically(path, [model, processor])


def build_tiny_sentence_encoder(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny random BertModel with a locally trained tokenizer to ``path``."""
    from transformers import BertConfig, BertModel

    tokenizer = _train_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"])
    tokenizer.add_special_tokens(
        {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]", "unk_token": "[UNK]", "mask_token": "[MASK]"}
    )
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
    )
    import torch  # here, not at the top: resolving a built model's directory needs no torch

    torch.manual_seed(seed)
    return _save_atomically(path, [BertModel(config).eval(), tokenizer])


def _save_atomically(path: str | Path, parts) -> Path:
    """Write into a temporary sibling and rename it in place, so that concurrent builders (several Ray
    actors on one node) never see a half-written directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=path.name + ".", dir=path.parent))
    for part in parts:
        part.save_pretrained(tmp)
    try:
        os.rename(tmp, path)
    except OSError:  # another process got there first: its copy is identical
        shutil.rmtree(tmp, ignore_errors=True)
    return path


_BUILDERS = {
    "tiny-random-vlm": build_tiny_vlm,
    "tiny-random-qwen2-vl": build_tiny_qwen2_vl,
    "tiny-random-sentence": build_tiny_sentence_encoder,
}
# Bumped when a builder changes what it builds, so a cache never serves an older build.
_VERSIONS = {"tiny-random-vlm": 2, "tiny-random-qwen2-vl": 1, "tiny-random-sentence": 1}


def tiny_model_dir(name: str) -> Path:
    """The cached directory of a tiny model (a key of ``_BUILDERS``), built on first use."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown built-in model {name!r}; known: {sorted(_BUILDERS)}")
    path = cache_dir() / f"{name}-v{_VERSIONS[name]}"
    if not (path / "config.json").exists():
        _BUILDERS[name](path)
    return path
