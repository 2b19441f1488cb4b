"""Scores with and without prompts: does a model with a prompt expert stay on the MOS scale when an image
comes without its prompt (issue 14)? Every image of the split is scored twice, with its prompt and with the
prompt expert absent (as a null or empty prompt is scored), through the path jobs.evaluate uses (cached
frozen features, ``training.predict``).

    python benchmarks/prompt_dropout.py [--model ma-agiqa-offline] [--data-root ../shared/datasets/agiqa3k]
        [--split val] [--output FILE.json] [--smoke]

Prints, for each of the two: the score range, mean and std, SRCC, PLCC (after the 4-parameter logistic fit,
as everywhere in this project), raw Pearson r and raw RMSE against MOS (no fit: the fit hides a shifted
scale), the prompt expert's mean gate; and the mean and largest absolute difference between the two scores of
one image. --smoke: an untrained ma-agiqa-offline on tf_efficientnet_lite0 at 64 px, samples/agiqa3k's val
images, a temporary cache (seconds; figures of no meaning).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from ma_agiqa import create_model
from ma_agiqa.datasets import load_dataset
from ma_agiqa.metrics import iqa_metrics
from ma_agiqa.training import forward_rows, prepare


@torch.inference_mode()
def scores_and_gates(model, inputs, batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    n = len(inputs.mos)
    out = [forward_rows(model, inputs, np.arange(i, min(n, i + batch_size))) for i in range(0, n, batch_size)]
    return np.concatenate([s.cpu().numpy() for s, _ in out]), np.concatenate([g.cpu().numpy() for _, g in out])


def summary(pred: np.ndarray, gates: np.ndarray, mos: np.ndarray, prompt_gate: int) -> dict:
    m = iqa_metrics(pred, mos)
    return {
        "min": float(pred.min()), "max": float(pred.max()), "mean": float(pred.mean()), "std": float(pred.std()),
        "srcc": m["srcc"], "plcc": m["plcc"], "pearson_raw": float(stats.pearsonr(pred, mos)[0]),
        "rmse_raw": float(np.sqrt(np.mean((pred - mos) ** 2))), "gate_prompt_mean": float(gates[:, prompt_gate].mean()),
    }


def smoke_model(model_ref: str):
    """``model_ref`` untrained, on a small backbone at 64 px: seconds to build and to compute features for."""
    from ma_agiqa import get_config

    q = get_config(model_ref).quality
    q = dataclasses.replace(q, backbone="tf_efficientnet_lite0", views=dataclasses.replace(q.views, size=64))
    return create_model(model_ref, with_semantic=False, shipped=False, quality=q)


def measure(model_ref: str, data_root: str, split: str = "val", cache_dir: str | None = None, model=None) -> dict:
    df = load_dataset("agiqa3k", data_root)
    df = df[df["split"] == split].reset_index(drop=True)
    model = model or create_model(model_ref, with_semantic=False)
    if "prompt" not in model.cfg.expert_names:
        raise SystemExit(f"{model_ref} has no prompt expert")
    inputs, _ = prepare(model, model_ref, df, cache_dir)
    none = dataclasses.replace(inputs, prompt=np.zeros_like(inputs.prompt),
                               prompt_present=np.zeros_like(inputs.prompt_present))
    mos = df["mos"].to_numpy(np.float64)
    k = model.cfg.expert_names.index("prompt")
    with_p, gates_p = scores_and_gates(model, inputs)
    without, gates_n = scores_and_gates(model, none)
    diff = np.abs(with_p - without)
    return {
        "model": model.model_id, "split": split, "n": len(df), "images_with_prompt": int(inputs.prompt_present.sum()),
        "drop_prompt_in_training": model.cfg.train.drop_prompt,
        "mos": {"min": float(mos.min()), "max": float(mos.max())},
        "with_prompt": summary(with_p, gates_p, mos, k), "without_prompt": summary(without, gates_n, mos, k),
        "abs_diff": {"mean": float(diff.mean()), "median": float(np.median(diff)), "max": float(diff.max())},
        "srcc_between": float(stats.spearmanr(with_p, without)[0]),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ma-agiqa-offline")
    p.add_argument("--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/datasets/agiqa3k"))
    p.add_argument("--split", default="val")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--output", default=None)
    p.add_argument("--smoke", action="store_true", help="seconds: an untrained small model on samples/agiqa3k")
    args = p.parse_args()
    torch.set_num_threads(2)
    model = None
    if args.smoke:
        from _common import scratch_dir

        args.data_root = str(Path(__file__).resolve().parents[1] / "samples" / "agiqa3k")
        args.cache_dir = args.cache_dir or scratch_dir("prompt_dropout_smoke_")
        model = smoke_model(args.model)
    out = measure(args.model, args.data_root, args.split, args.cache_dir, model)
    text = json.dumps(out, indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
