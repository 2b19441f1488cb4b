"""Images/s of each branch of a model on real AGIQA-3K images, and the batched semantic extractor against a
reference-style one (the full model with its LM head, every batch run twice and one result thrown away,
each image encoded once per prompt).

    python benchmarks/model_forward.py [--model tiny-random] [--images 64] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from ma_agiqa import create_model
from ma_agiqa.images import decode_image
from ma_agiqa.semantic import pool_hidden

DATA = Path(os.environ.get("MA_AGIQA_AGIQA3K", Path(__file__).resolve().parents[2] / "shared/datasets/agiqa3k"))


def rate(fn, n_images: int, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n_images / best


def reference_style_semantic(model, images, batch_size):
    """What the reference does per batch: the full model with hidden states and logits, once per prompt,
    the whole batch twice."""
    ex = model.semantic
    full = ex.model  # the extractor keeps the base model only; the LM head comes from a full copy
    lm_head = getattr(ex, "_bench_lm_head", None)
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        for _ in range(2):
            for prompt in ex.cfg.prompts.values():
                inputs = ex.processor(images=chunk, text=[ex.chat_text(prompt)] * len(chunk), return_tensors="pt", padding=True)
                out = full(**inputs, output_hidden_states=True)
                hidden = out.hidden_states[-1]
                _ = lm_head(hidden) if lm_head is not None else None
                pool_hidden(hidden, inputs["attention_mask"], "mean")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny-random")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    names = sorted(os.listdir(DATA / "images"))[:: max(1, 2385 // args.images)][: args.images]
    images = [decode_image((DATA / "images" / n).read_bytes()) for n in names]
    model = create_model(args.model)
    bs = args.batch_size
    chunks = [images[i : i + bs] for i in range(0, len(images), bs)]
    views = [torch.stack([model.preprocess(im) for im in c]) for c in chunks]

    with torch.inference_mode():
        results = {
            "preprocess (decoded image -> views)": rate(lambda: [model.preprocess(im) for im in images], len(images)),
            "quality branch (MANIQA)": rate(lambda: [model.quality(v) for v in views], len(images)),
        }
        if model.semantic is not None:
            from transformers import AutoModelForImageTextToText
            from ma_agiqa.hub import resolve

            full = AutoModelForImageTextToText.from_pretrained(resolve(model.cfg.semantic.model_id)).eval()
            model.semantic._bench_lm_head = full.lm_head
            results["semantic branch (batched, image encoded once)"] = rate(lambda: [model.semantic(c) for c in chunks], len(images))
            results["semantic branch, reference style (LM head, twice per batch)"] = rate(
                lambda: reference_style_semantic(model, images, bs), len(images)
            )
            sem = [model.semantic(c) for c in chunks]
        else:
            sem = [{} for _ in chunks]
        if model.prompt_encoder is None:
            results["quality + MoE on cached semantic vectors"] = rate(
                lambda: [model(v, s) for v, s in zip(views, sem)], len(images)
            )
        results["whole model from decoded images"] = rate(lambda: [model.score_images(c) for c in chunks], len(images))
    out = {
        "model": args.model, "images": len(images), "batch_size": bs, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(), "device": "cpu", "images_per_s": {k: round(v, 1) for k, v in results.items()},
    }
    sem_keys = [k for k in results if k.startswith("semantic")]
    if len(sem_keys) == 2:
        out["semantic_speedup_over_reference_style"] = round(results[sem_keys[0]] / results[sem_keys[1]], 2)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
