"""The offline model on CPU: eager against ``optimise_for_inference`` (what the scoring job's actors run), paired.

    python benchmarks/offline_cpu.py [--model ma-agiqa-offline-quality] [--batch-size 16] [--threads 2] [--rounds 5]
    python benchmarks/offline_cpu.py --smoke     # seconds: 4 images, one round

Both forms score the same sample images (samples/agiqa3k/images, preprocessed once, in batches of
``--batch-size``); each round times one pass of each, in alternating order, so that a busy machine moves both
alike. Reported: the medians of the wall time and of the process's CPU time (user + system of its threads: on a
shared machine the wall time counts other processes' turns, the CPU time mostly not), the median of the
per-round ratios, the images/s and the GFLOP/s achieved against the FLOPs per image that torch's FLOP counter
counts, and the largest differences of score and gates between the two forms (the same images).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

IMAGES = Path(__file__).resolve().parents[1] / "samples" / "agiqa3k" / "images"


def score_all(model, views: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        out = [model(views[i : i + batch_size]) for i in range(0, len(views), batch_size)]
    return torch.cat([s for s, _ in out]), torch.cat([g for _, g in out])


def timed(model, views: torch.Tensor, batch_size: int) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    score_all(model, views, batch_size)
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ma-agiqa-offline-quality")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()
    if args.smoke:
        args.rounds, args.images, args.batch_size = 1, 4, 4
    torch.set_num_threads(args.threads)

    from ma_agiqa import create_model
    from ma_agiqa.images import decode_image

    eager = create_model(args.model, with_semantic=False)
    fast = create_model(args.model, with_semantic=False).optimise_for_inference()
    paths = sorted(IMAGES.glob("*.jpg"))[: args.images]
    views = torch.stack([eager.preprocess(decode_image(p.read_bytes())) for p in paths])

    with FlopCounterMode(display=False) as counter:
        score_all(eager, views[:1], 1)
    gflop = counter.get_total_flops() / 1e9

    s_eager, g_eager = score_all(eager, views, args.batch_size)  # also the warm-up of both
    s_fast, g_fast = score_all(fast, views, args.batch_size)
    runs = {"eager": [], "optimised": []}
    for r in range(args.rounds):
        order = ("eager", "optimised") if r % 2 == 0 else ("optimised", "eager")
        for name in order:
            runs[name].append(timed(eager if name == "eager" else fast, views, args.batch_size))

    def summary(name: str) -> dict:
        wall = statistics.median(w for w, _ in runs[name])
        cpu = statistics.median(c for _, c in runs[name])
        # images/s as the CPU time gives it: the threads' seconds shared out over the threads
        cpu_rate = len(views) / (cpu / args.threads)
        return {"wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "images_per_s_wall": round(len(views) / wall, 2),
                "images_per_s_cpu": round(cpu_rate, 2), "gflop_per_s_cpu": round(cpu_rate * gflop, 1),
                "gflop_per_s_wall": round(len(views) / wall * gflop, 1)}

    pairs = list(zip(runs["eager"], runs["optimised"]))
    result = {
        "model": args.model, "images": len(views), "view_size": views.shape[-1], "batch_size": args.batch_size,
        "threads": args.threads, "rounds": args.rounds, "gflop_per_image": round(gflop, 3),
        "eager": summary("eager"), "optimised": summary("optimised"),
        "speedup_wall_median_of_pairs": round(statistics.median(e[0] / o[0] for e, o in pairs), 2),
        "speedup_cpu_median_of_pairs": round(statistics.median(e[1] / o[1] for e, o in pairs), 2),
        "max_abs_diff_score": float((s_fast - s_eager).abs().max()),
        "max_abs_diff_gates": float((g_fast - g_eager).abs().max()),
        "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
