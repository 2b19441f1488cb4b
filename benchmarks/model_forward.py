"""The semantic branch before and after issue 15, each model branch's images/s, and what a real MLLM costs.

    python benchmarks/model_forward.py [--model tiny-random] [--images 40] [--batch-size 8]
    python benchmarks/model_forward.py --flops            # per-image LLM FLOPs of the registered MLLMs
    python benchmarks/model_forward.py --real-forward llava-interleave-qwen-0.5b-hf   # one random-weight forward
    python benchmarks/model_forward.py --smoke            # seconds: the rates on 2 images, one round; the FLOPs

Semantic branch, three ways on the same images and model:
- ``after``: ``SemanticExtractor`` as it is: question first, image padded to a square, the image processor once
  per batch, the vision tower once for both prompts (``mm_encoder_outputs``), no KV cache, no LM head;
- ``before``: the extractor as it was before (image first, the processor called with the images once per
  prompt, default ``use_cache``), the base model and encoder reuse as now;
- ``reference style``: what the reference's getFeature.py does per batch: the task model with its LM head,
  every batch run twice (logits, then hidden states), once per prompt, the image encoded per forward.

``--flops`` counts each registered MLLM's parameters on torch's meta device from the stored configs
(tests/data/mllm/) and the image tokens its processor writes for a padded square image, and prints the
forward FLOPs per image (two prompts; matmuls 2 x params x tokens, attention 4 x layers x tokens^2 x width,
the vision tower once per image), to compare a GPU run with its roofline. The text tokens of a prompt are
estimated (the Llama/Qwen tokenizers are not available offline), which moves the total by under 1 %.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "agiqa3k" / "images"
DATA = REPO / "tests" / "data" / "mllm"


def rate(fn, n_images: int, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_images / best


def compare(fns: dict, n_images: int, repeats: int) -> dict:
    """images/s of each function, measured alternately (one run of each per round, the best round kept), so
    that load from other processes on a shared machine falls on all of them alike."""
    for fn in fns.values():
        fn()  # warm-up
    best = {k: float("inf") for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t)
    return {k: n_images / v for k, v in best.items()}


def before_style(ex, images):
    """The extractor as it was before issue 15: image first, the processor (images included) once per prompt,
    the model's default use_cache, the image encoding reused across prompts."""
    from ma_agiqa.images import shrink
    from ma_agiqa.semantic import pool_hidden

    images = [shrink(im, ex.cfg.max_image_side) for im in images]
    out, encoded = {}, None
    for key, prompt in ex.cfg.prompts.items():
        text = ex._render([{"type": "image"}, {"type": "text", "text": prompt}])
        inputs = dict(ex.processor(images=images, text=[text] * len(images), return_tensors="pt", padding=True))
        if encoded is None:
            extra = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_grid_thw")}
            encoded = ex.model.get_image_features(**extra, return_dict=True)
        kwargs = {k: v for k, v in inputs.items() if k != "pixel_values"}
        hidden = ex.model(**kwargs, mm_encoder_outputs={"image": encoded}).last_hidden_state
        out[key] = pool_hidden(hidden.float(), inputs["attention_mask"], ex.cfg.pooling)
    return out


def reference_style(full, ex, images):
    """The reference's loop: the task model (LM head included) run twice per batch and prompt, the image encoded
    in every forward."""
    from ma_agiqa.semantic import pool_hidden

    framed = [ex.frame(im) for im in images]
    for key in ex.cfg.prompts:
        inputs = ex.processor(images=framed, text=[ex.texts[key]] * len(images), return_tensors="pt", padding=True)
        full(**inputs).logits  # noqa: B018 - the reference computes logits it never uses
        hidden = full(**inputs, output_hidden_states=True).hidden_states[-1]
        pool_hidden(hidden.float(), inputs["attention_mask"], "mean")


def branch_rates(args) -> dict:
    from transformers import AutoModelForImageTextToText

    from ma_agiqa import create_model
    from ma_agiqa.hub import resolve
    from ma_agiqa.images import decode_image

    names = sorted(os.listdir(SAMPLE))[: args.images]
    images = [decode_image((SAMPLE / n).read_bytes()) for n in names]
    model = create_model(args.model)
    bs = args.batch_size
    chunks = [images[i : i + bs] for i in range(0, len(images), bs)]
    views = [torch.stack([model.preprocess(im) for im in c]) for c in chunks]
    results = {}
    with torch.inference_mode():
        results["preprocess (decoded image -> views)"] = rate(lambda: [model.preprocess(im) for im in images], len(images), args.repeats)
        results["quality branch (MANIQA)"] = rate(lambda: [model.quality(v) for v in views], len(images), args.repeats)
        if model.semantic is not None:
            ex = model.semantic
            full = AutoModelForImageTextToText.from_pretrained(resolve(model.cfg.semantic.model_id)).eval()
            results.update(compare({
                "semantic: after": lambda: [ex(c) for c in chunks],
                "semantic: before (image first, processor per prompt, KV cache)": lambda: [before_style(ex, c) for c in chunks],
                "semantic: reference style (LM head, twice per batch)": lambda: [reference_style(full, ex, c) for c in chunks],
            }, len(images), args.rounds))
            image_tokens = {k: int((v[1]["input_ids"] == ex.processor.image_token_id).sum(1)[0]) for k, v in ex.hidden_states(images[:1]).items()}
            results_tokens = {k: int(v[1]["attention_mask"].sum()) for k, v in ex.hidden_states(images[:1]).items()}
        results["whole model from decoded images"] = rate(lambda: [model.score_images(c) for c in chunks], len(images), args.repeats)
    out = {
        "model": args.model, "images": len(images), "batch_size": bs, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "device": "cpu",
        "images_per_s": {k: round(v, 1) for k, v in results.items()},
    }
    if model.semantic is not None:
        out["tokens_per_prompt"] = {"total": results_tokens, "image": image_tokens}
        out["after_over_before"] = round(results["semantic: after"] / results["semantic: before (image first, processor per prompt, KV cache)"], 2)
        out["after_over_reference_style"] = round(results["semantic: after"] / results["semantic: reference style (LM head, twice per batch)"], 2)
    return out


# -- what a real MLLM costs -------------------------------------------------------------------------------------
# Text tokens around the image per prompt (chat template + question), estimated at ~1.3 tokens per English word
# for the two MA-AGIQA questions (12 and 20 words) plus the template's own tokens; the image tokens are real.
TEXT_TOKENS = {"llava-1.5-7b-hf": (25, 35), "llava-interleave-qwen-0.5b-hf": (30, 40), "qwen2-vl-2b-instruct": (40, 50)}


def _meta(directory: Path):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(directory)
    with torch.device("meta"):
        return AutoModel.from_config(config), config


def _image_tokens(directory: Path, side: int = 512) -> int:
    """Image tokens for a padded square image, from the stored image-processor config (fixed-size processors
    bring it to their side; Qwen2-VL's takes an AGIQA-3K image, 512 px square, at about its size)."""
    from PIL import Image
    from transformers import AutoImageProcessor

    from ma_agiqa.semantic import processor_side

    ip = AutoImageProcessor.from_pretrained(directory)
    fixed = processor_side(ip)
    inputs = ip([Image.new("RGB", (fixed or side, fixed or side))], return_tensors="pt")
    if "image_grid_thw" in inputs:
        return int(inputs["image_grid_thw"][0].prod()) // ip.merge_size ** 2
    settings = json.loads((directory / "processor_config.json").read_text())
    h, w = inputs["pixel_values"].shape[-2:]
    n = (h // settings["patch_size"]) * (w // settings["patch_size"]) + settings["num_additional_image_tokens"]
    return n - (settings["vision_feature_select_strategy"] == "default")


def flops(name: str) -> dict:
    directory = DATA / name
    model, config = _meta(directory)
    text = config.get_text_config()
    lm = model.language_model
    lm_matmul = sum(p.numel() for n, p in lm.named_parameters() if p.dim() == 2 and "embed_tokens" not in n)
    vision = model.visual if hasattr(model, "visual") else model.vision_tower
    vision_params = sum(p.numel() for p in vision.parameters() if p.dim() >= 2)
    projector = sum(p.numel() for p in getattr(model, "multi_modal_projector", torch.nn.Module()).parameters() if p.dim() == 2)
    image_tokens = _image_tokens(directory)
    if hasattr(model, "visual"):  # Qwen2-VL: the tower runs on the patches before the 2x2 merge
        vision_tokens = image_tokens * config.vision_config.spatial_merge_size ** 2
    else:
        vision_tokens = image_tokens + (1 if config.vision_feature_select_strategy == "default" else 0)
    prompts = []
    for text_tokens in TEXT_TOKENS[name]:
        t = image_tokens + text_tokens
        matmul = 2 * lm_matmul * t
        attention = 4 * text.num_hidden_layers * t * t * text.hidden_size // 2  # causal: half the score matrix
        prompts.append({"tokens": t, "image_tokens": image_tokens, "text_tokens_estimated": text_tokens,
                        "tflop": round((matmul + attention) / 1e12, 3)})
    vision_tflop = (2 * vision_params * vision_tokens + 2 * projector * image_tokens) / 1e12
    total = sum(p["tflop"] for p in prompts) + vision_tflop
    return {
        "lm_matmul_params_b": round(lm_matmul / 1e9, 3), "vision_params_b": round(vision_params / 1e9, 3),
        "per_prompt": prompts, "vision_tower_once_tflop": round(vision_tflop, 3),
        "tflop_per_image": round(total, 2),
        "images_per_s_at_989_tflops_bf16": round(989 / total, 1),  # H100/H200 SXM dense bf16 peak
    }


def real_forward(name: str) -> dict:
    """One forward of the real-size model with random weights on CPU (bf16 weights, float32 would need twice
    the memory): the real token counts and the memory a batch of one takes."""
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, LlavaProcessor

    from ma_agiqa.config import SemanticConfig
    from ma_agiqa.hub import resolve
    from ma_agiqa.semantic import SemanticExtractor

    directory = DATA / name
    config = AutoConfig.from_pretrained(directory)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    torch.manual_seed(0)
    model = AutoModel.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    build_s = time.perf_counter() - t
    tokenizer = AutoTokenizer.from_pretrained(resolve("builtin:tiny-random-vlm"))  # token ids are not the model's
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    settings = json.loads((directory / "processor_config.json").read_text())
    from ma_agiqa.tiny import LLAVA_CHAT_TEMPLATE  # llava-1.5's; the text around the image is a few tokens either way

    processor = LlavaProcessor(image_processor=AutoImageProcessor.from_pretrained(directory), tokenizer=tokenizer,
                               chat_template=LLAVA_CHAT_TEMPLATE,
                               **{k: settings[k] for k in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")})
    model.config.image_token_id = processor.image_token_id  # the tiny tokenizer's id for <image>
    ex = SemanticExtractor(model, processor, SemanticConfig(model_id=name))
    image = Image.open(sorted(SAMPLE.glob("*.jpg"))[0]).convert("RGB")
    t = time.perf_counter()
    out = ex.hidden_states([image])
    forward_s = time.perf_counter() - t
    return {
        "model": name, "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3), "dtype": "bfloat16",
        "build_s": round(build_s, 1), "two_prompts_forward_s": round(forward_s, 1),
        "tokens": {k: {"total": int(v[1]["attention_mask"].sum()), "image": int((v[1]["input_ids"] == processor.image_token_id).sum())}
                   for k, v in out.items()},
        "hidden": list(next(iter(out.values()))[0].shape),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2),
        "rss_before_gb": round(rss0 / 1e6, 2), "threads": torch.get_num_threads(),
        "note": "text tokens come from the tiny tokenizer (the model's own is not available offline); image tokens are the model's",
    }


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--flops", action="store_true", help="only the per-image FLOPs of the registered MLLMs")
    p.add_argument("--real-forward", default=None, help="a stored config (tests/data/mllm/NAME): one forward, random weights")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each rate, the best kept")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds of the semantic variants, the best kept")
    p.add_argument("--smoke", action="store_true",
                   help="seconds, for the test suite: the rates on 2 images in one batch, timed once, then --flops")
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.batch_size, args.repeats, args.rounds = 2, 2, 1, 1
    torch.set_num_threads(os.cpu_count())
    if args.smoke:
        print(json.dumps(branch_rates(args), indent=2))
        print(json.dumps({name: flops(name) for name in sorted(TEXT_TOKENS)}, indent=2))
    elif args.flops:
        print(json.dumps({name: flops(name) for name in sorted(TEXT_TOKENS)}, indent=2))
    elif args.real_forward:
        print(json.dumps(real_forward(args.real_forward), indent=2))
    else:
        print(json.dumps(branch_rates(args), indent=2))


if __name__ == "__main__":
    main()
