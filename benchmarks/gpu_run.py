"""Everything a short GPU slot should measure, in one command, with no hub access (issue 31).

    python benchmarks/gpu_run.py --out $OUT                 # on the GPU machine: about 5 minutes, under 8
    python benchmarks/gpu_run.py --smoke --out /tmp/smoke   # on CPU, under 2 minutes (tests/test_gpu_run.py)

Builds `ma-agiqa-paper`'s MLLM (LLaVA-1.5-7B) and `ma-agiqa-qwen2-vl`'s (Qwen2-VL-2B) at real size with random
bf16 weights from the stored configs (``benchmarks/real_size.py``: meta device, no download, the real image
processors, a local tokenizer with the real vocabulary and image token), and records in ``--out``
(``results.json`` and ``results.md``, rewritten after every step, so a run cut short keeps what it measured):

- the semantic stage alone (``SemanticExtractor`` on decoded images: processor, vision tower once, both
  prompts) at batch sizes 1, 4, 8, 16, 32: images/s, the processor's share, peak GPU memory, achieved TFLOP/s
  against ``model_forward.py --flops``'s count per image and the utilisation against ``--peak-tflops``
  (989: H100/H200 dense bf16); a batch that runs out of memory is recorded as "OOM";
- the quality branch alone: the ViT-B/8 MANIQA of ``ma-agiqa-paper`` (random weights) and ``ma-agiqa-offline``
  (its shipped EfficientNet-Lite2 model, prompt expert absent): images/s;
- ``python -m jobs.score`` end to end over ``--n-images`` images (AGIQA-3K, distinct ids) with the job's default
  layout for this machine, on an ma-agiqa checkpoint of `ma-agiqa-paper` around the random LLaVA, against the
  stages alone at the job's batch size (the ratio is the job's overhead, its start-up included);
- which attention kernels ran (the aten ops the profiler saw), the dtype each stage used, torch / CUDA /
  cuDNN / transformers versions and the device.

Each timing is the best of ``--repeats`` after a warm-up, with ``torch.cuda.synchronize()``. The checkpoint
(14 GB) goes to ``--work``, never to ``--out``. ``--smoke``: CPU, 2 layers of every model at their real widths,
LLaVA's tower at 112 px and Qwen2-VL's images at 224² pixels at most (64 image tokens, not 576 and 324),
batch sizes 1 and 2, 8 images through the job; its FLOPs, utilisation and rates mean nothing.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_forward import flops  # noqa: E402 - the FLOP count a GPU run is compared with
from real_size import FAMILIES, GB, build_mllm, build_processor, save_checkpoint, stored_config, write_manifest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "datasets" / "agiqa3k" / "images"
SAMPLE = REPO / "samples" / "agiqa3k" / "images"
JOB_BATCH = 16  # jobs.score's default --batch-size: the stages alone are compared with the job at it


class Run:
    """The results so far, written to ``out`` after every step."""

    def __init__(self, out: Path, smoke: bool):
        self.out, self.smoke = out, smoke
        out.mkdir(parents=True, exist_ok=True)
        self.data: dict = {}

    def save(self):
        (self.out / "results.json").write_text(json.dumps(self.data, indent=2) + "\n")
        (self.out / "results.md").write_text(markdown(self.data))


def sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def best_time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def oom_safe(fn, device: str):
    """fn(), or "OOM" when the GPU runs out of memory (the memory is freed, the run goes on)."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        return "OOM"


def peak_memory(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / GB, 2) if device == "cuda" else None


def reset_peak(device: str):
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


def attention_ops(fn, device: str) -> dict[str, int]:
    """The attention kernels one call ran: aten ops whose names say which SDPA backend (flash, efficient,
    cudnn, math) or attention implementation, with their call counts."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    words = ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "fmha", "attention_math")
    return {e.key: e.count for e in prof.key_averages() if any(w in e.key.lower() for w in words)}


# -- the stages --------------------------------------------------------------------------------------------
def semantic_stage(family: str, images, args, device: str, run: Run, ckpt: Path | None) -> dict:
    from ma_agiqa.config import SemanticConfig
    from ma_agiqa.semantic import SemanticExtractor

    stored, registered = FAMILIES[family]
    smoke = dict(layers=2, image_side=112) if args.smoke else {}
    t = time.perf_counter()
    model = build_mllm(stored_config(family, **smoke), device, torch.bfloat16)
    sync(device)
    processor = build_processor(family, max_pixels=224 * 224 if args.smoke else None, image_side=smoke.get("image_side"))
    result = {"registered": registered, "stored_config": stored, "build_s": round(time.perf_counter() - t, 1),
              "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
              "attn_implementation": model.config._attn_implementation}
    ex = SemanticExtractor(model, processor, SemanticConfig(model_id=stored))
    one = ex.hidden_states(images[:1])
    result["dtype"] = {"weights": str(ex.dtype), "last_hidden_state": str(next(iter(one.values()))[0].dtype)}
    result["tokens_per_prompt"] = {k: {"total": int(inp["attention_mask"][0].sum()), "image": int((inp["input_ids"][0] == ex.image_token_id).sum())}
                                   for k, (_, inp) in one.items()}
    count = flops(stored)
    result["tflop_per_image (model_forward --flops, real size)"] = count["tflop_per_image"]
    result["attention_ops"] = attention_ops(lambda: ex(images[:2]), device)
    rates = {}
    for bs in args.batch_sizes:
        batch = (images * math.ceil(bs / len(images)))[:bs]

        def measure():
            reset_peak(device)
            total = best_time(lambda: ex(batch), device, args.repeats)
            processor_s = best_time(lambda: ex.encode_images(batch), "cpu", args.repeats)
            model_rate = bs / max(total - processor_s, 1e-9)
            achieved = count["tflop_per_image"] * model_rate
            return {"images_per_s": round(bs / total, 2), "processor_s_per_batch": round(processor_s, 3),
                    "model_images_per_s (processor time taken out)": round(model_rate, 2),
                    "achieved_tflops": round(achieved, 1), "utilisation": round(achieved / args.peak_tflops, 4),
                    "peak_gpu_memory_gb": peak_memory(device)}

        rates[str(bs)] = oom_safe(measure, device)
        result["by_batch_size"] = rates
        run.data.setdefault("semantic", {})[family] = result
        run.save()
    if ckpt is not None:
        t = time.perf_counter()
        save_checkpoint(family, model, processor, ckpt)
        result["checkpoint_save_s"] = round(time.perf_counter() - t, 1)
    del ex, model, one
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def quality_stage(images, args, device: str) -> dict:
    """The quality branches alone on their views (preprocessing outside the timing)."""
    from ma_agiqa import create_model, get_config
    from ma_agiqa.maniqa import MANIQA
    from ma_agiqa.preprocess import quality_views

    out = {}
    bs = max(b for b in args.batch_sizes if b <= JOB_BATCH)
    batch = (images * math.ceil(bs / len(images)))[:bs]
    paper = get_config("ma-agiqa-paper").quality
    torch.manual_seed(0)
    maniqa = MANIQA(paper, load_pretrained=False).to(device).eval()
    offline = create_model("ma-agiqa-offline", device, with_semantic=False, with_prompt=False)
    cases = {
        "ViT-B/8 MANIQA (ma-agiqa-paper, random weights)": (lambda v: maniqa(v), paper.views),
        "ma-agiqa-offline (EfficientNet-Lite2, shipped; no prompt)": (lambda v: offline(v), offline.cfg.quality.views),
    }
    for name, (fn, views_cfg) in cases.items():
        views = torch.stack([quality_views(im, views_cfg) for im in batch]).to(device)
        module = maniqa if "MANIQA" in name else offline

        def measure():
            reset_peak(device)
            with torch.inference_mode():
                seconds = best_time(lambda: fn(views), device, args.repeats)
            return {"batch_size": bs, "images_per_s": round(bs / seconds, 2), "image_px": views_cfg.size,
                    "dtype": str(next(module.parameters()).dtype), "peak_gpu_memory_gb": peak_memory(device)}

        out[name] = oom_safe(measure, device)
    del maniqa, offline
    gc.collect()
    return out


def job_stage(ckpt: Path, args, device: str, work: Path) -> dict:
    """jobs.score as a user runs it (its own local Ray, default layout), timed from outside."""
    from ma_agiqa.semantic import CPU_DTYPE_ENV

    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no images in {args.images}")
    chosen = [files[i % len(files)] for i in range(args.n_images)]
    manifest = work / "manifest.jsonl"
    write_manifest(chosen, manifest)  # ids "<row>-<name>": distinct even where an image repeats
    output = work / "job-scores"
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "jobs.score", "--manifest", str(manifest), "--output", str(output),
           "--model", str(ckpt), "--allow-untrained"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if device == "cpu":
        env[CPU_DTYPE_ENV] = "bfloat16"  # as the GPU runs it, at half the memory
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.job_timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.job_timeout} s", "images": len(chosen)}
    wall = time.perf_counter() - t
    result = {"command": "python -m jobs.score --manifest M --output O --model CKPT --allow-untrained",
              "images": len(chosen), "distinct_files": len(set(chosen)), "wall_s": round(wall, 1),
              "images_per_s_wall": round(len(chosen) / wall, 2), "returncode": proc.returncode}
    if proc.returncode != 0:
        result["log_tail"] = (proc.stdout + proc.stderr)[-3000:]
        return result
    summary = json.loads((output / "_summary.json").read_text())
    result["summary"] = {k: summary.get(k) for k in (
        "rows", "ok", "errors", "elapsed_s", "images_per_s", "model_stages", "decode", "semantic_actors",
        "quality_actors", "gpus_per_actor", "cpus_per_actor", "threads_per_actor")}
    return result


def overhead(run: Run) -> dict | None:
    """The job's images/s against the stages alone at its batch size, run one after the other on one device
    (1 / (1/semantic + 1/quality)): below 1, the job loses that much to everything else (start-up included)."""
    sem = run.data.get("semantic", {}).get("llava", {}).get("by_batch_size", {})
    bs = max((int(b) for b, r in sem.items() if isinstance(r, dict) and int(b) <= JOB_BATCH), default=None)
    quality = run.data.get("quality", {}).get("ViT-B/8 MANIQA (ma-agiqa-paper, random weights)")
    job = run.data.get("job", {}).get("summary")
    if bs is None or not isinstance(quality, dict) or not job:
        return None
    s, q = sem[str(bs)]["images_per_s"], quality["images_per_s"]
    stages = 1 / (1 / s + 1 / q)
    return {"batch_size": bs, "stages_alone_images_per_s": round(stages, 2),
            "job_images_per_s (its summary: Ray start to end)": job["images_per_s"],
            "job_over_stages": round(job["images_per_s"] / stages, 3),
            "job_wall_over_stages": round(run.data["job"]["images_per_s_wall"] / stages, 3)}


# -- the report ------------------------------------------------------------------------------------------
def environment(device: str) -> dict:
    import transformers

    env = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": device,
           "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}
    if device == "cuda":
        env.update(device_name=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / GB, 1),
                   sdp_enabled={k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")() for k in ("flash", "mem_efficient", "math", "cudnn")})
    else:
        env["device_name"] = "cpu"
    return env


def markdown(data: dict) -> str:
    env = data.get("environment", {})
    lines = [f"# gpu_run.py {'--smoke ' if data.get('smoke') else ''}{env.get('date', '')}", "",
             f"{env.get('device_name')} · torch {env.get('torch')} · CUDA {env.get('cuda', '-')} · "
             f"transformers {env.get('transformers')} · peak {data.get('peak_tflops')} TFLOP/s", "",
             "| stage | batch | images/s | model images/s | TFLOP/s | utilisation | peak GPU GB | dtype | attention |",
             "|---|---|---|---|---|---|---|---|---|"]
    for family, r in data.get("semantic", {}).items():
        ops = ", ".join(sorted(r.get("attention_ops", {}))) or "-"
        for bs, m in r.get("by_batch_size", {}).items():
            if m == "OOM":
                lines.append(f"| semantic {r['registered']} | {bs} | OOM | | | | | | |")
                continue
            lines.append(f"| semantic {r['registered']} | {bs} | {m['images_per_s']} | {m['model_images_per_s (processor time taken out)']} | "
                         f"{m['achieved_tflops']} | {m['utilisation']:.1%} | {m['peak_gpu_memory_gb']} | {r['dtype']['weights']} | {ops} |")
    for name, m in data.get("quality", {}).items():
        if m == "OOM":
            lines.append(f"| quality {name} | | OOM | | | | | | |")
        else:
            lines.append(f"| quality {name} | {m['batch_size']} | {m['images_per_s']} | | | | {m['peak_gpu_memory_gb']} | {m['dtype']} | |")
    job = data.get("job")
    if job:
        s = job.get("summary") or {}
        lines.append(f"| jobs.score end to end, {job.get('images')} images | {JOB_BATCH} | {s.get('images_per_s', job.get('error', 'failed'))} "
                     f"(wall {job.get('images_per_s_wall')}) | | | | | | |")
    o = data.get("overhead")
    if o:
        lines += ["", f"Job over the stages alone (batch {o['batch_size']}, {o['stages_alone_images_per_s']} images/s): "
                  f"{o['job_over_stages']} (wall: {o['job_wall_over_stages']})."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="results folder; default benchmarks/results/gpu-<date>/ (with --smoke a temporary folder)")
    p.add_argument("--smoke", action="store_true", help="CPU, 2 layers, 8 images: checks the script, measures nothing")
    p.add_argument("--images", default=None, help="images for the job (default: the shared AGIQA-3K, else samples/)")
    p.add_argument("--n-images", type=int, default=None, help="images through the job (default 2000; smoke 8)")
    p.add_argument("--work", type=Path, default=Path("/tmp/ma-agiqa-gpu-run"), help="where the checkpoint is written")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak (H100/H200: 989)")
    p.add_argument("--job-timeout", type=float, default=None, help="seconds (default 300; smoke 600)")
    p.add_argument("--skip", default="", help="comma-separated steps to leave out: llava,qwen2-vl,quality,job")
    args = p.parse_args(argv)
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no GPU here: run with --smoke on CPU")
    args.batch_sizes = [1, 2] if args.smoke else [1, 4, 8, 16, 32]
    args.repeats = 1 if args.smoke else 3
    args.n_images = args.n_images or (8 if args.smoke else 2000)
    args.job_timeout = args.job_timeout or (600 if args.smoke else 300)
    args.images = args.images or str(DEFAULT_IMAGES if DEFAULT_IMAGES.is_dir() else SAMPLE)
    if args.out is None and args.smoke:  # a smoke run's figures mean nothing: never beside the recorded ones
        from _common import scratch_dir  # printed below, removed at exit

        args.out = Path(scratch_dir("gpu-run-smoke-"))
    out = args.out or REPO / "benchmarks" / "results" / f"gpu-{dt.date.today().isoformat()}"
    skip = set(filter(None, args.skip.split(",")))
    work = args.work / ("smoke" if args.smoke else "gpu")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = work / "ckpt"

    from ma_agiqa.images import decode_image

    started = time.perf_counter()
    run = Run(out, args.smoke)
    run.data.update(smoke=args.smoke, command=" ".join(["python", "benchmarks/gpu_run.py", *(argv or sys.argv[1:])]),
                    peak_tflops=args.peak_tflops, environment=environment(device))
    run.save()
    images = [decode_image(p.read_bytes()) for p in sorted(SAMPLE.glob("*.jpg"))[: max(args.batch_sizes)]]
    for family in ("llava", "qwen2-vl"):
        if family not in skip:
            semantic_stage(family, images, args, device, run, ckpt if family == "llava" and "job" not in skip else None)
    if "quality" not in skip:
        run.data["quality"] = quality_stage(images, args, device)
        run.save()
    if "job" not in skip and (ckpt / "config.json").is_file():
        run.data["job"] = job_stage(ckpt, args, device, work)
        run.data["overhead"] = overhead(run)
    run.data["total_s"] = round(time.perf_counter() - started, 1)
    run.save()
    shutil.rmtree(work, ignore_errors=True)
    print(run.out / "results.md")
    print((run.out / "results.md").read_text())
    print(json.dumps(run.data, indent=2, default=str))


if __name__ == "__main__":
    main()
