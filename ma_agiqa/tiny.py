"""Tiny random models of real classes, built here with no download: a LLaVA (CLIP vision tower + Llama)
and a BERT sentence encoder, each with a tokenizer trained locally. They are saved to a directory and loaded
back with ``from_pretrained``, the path real checkpoints take.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from .config import COHERENCE_PROMPT, SEMANTIC_PROMPT

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ message['role'] | upper }}: "
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}<image>\n{% elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor %} {% endfor -%}"
    "{%- if add_generation_prompt -%}ASSISTANT:{%- endif -%}"
)

_CORPUS = [
    COHERENCE_PROMPT,
    SEMANTIC_PROMPT,
    "USER: ASSISTANT: describe the image quality, aesthetics, realism, artifacts, blur, noise.",
    "a photo of a cat, a dog, a tray of sushi, a man lost in space, a landscape painting, a city at night.",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 .,;:!?'\"()[]{}-_/\\@#$%^&*+=<>|~`",
]

VLM_IMAGE_SIZE = 32
VLM_PATCH = 8


def cache_dir() -> Path:
    return Path(os.environ.get("MA_AGIQA_CACHE", Path.home() / ".cache" / "ma_agiqa"))


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
        chat_template=CHAT_TEMPLATE,
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
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
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


_BUILDERS = {"tiny-random-vlm": build_tiny_vlm, "tiny-random-sentence": build_tiny_sentence_encoder}


def tiny_model_dir(name: str) -> Path:
    """The cached directory of a tiny model (a key of ``_BUILDERS``), built on first use."""
    if name not in _BUILDERS:
        raise KeyError(f"unknown built-in model {name!r}; known: {sorted(_BUILDERS)}")
    path = cache_dir() / f"{name}-v1"
    if not (path / "config.json").exists():
        _BUILDERS[name](path)
    return path
