"""A registered MLLM at its real size, with random weights, saved and scored through the job on this CPU.

    python benchmarks/real_size.py [--config llava|qwen2-vl] [--work DIR] [--images 4]

No download: the MLLM is built from its stored config (tests/data/mllm/) on torch's meta device and each
weight is then materialised in bf16 and initialised by transformers' own initialisers, so no float32 copy of
the model is ever held (7B: 14 GB in bf16, 28 GB in float32). Its processor is built here: the stored image
processor (LLaVA's 336 px CLIP one, Qwen2-VL's dynamic-resolution one), the family's chat template
(ma_agiqa/tiny.py) and a locally trained byte-level BPE tokenizer padded to the config's vocabulary, with every
special token (the image token, pad, eos, ...) at the id the config gives it.

Written to ``--work``: ``ckpt/semantic/`` (the MLLM as ``save_pretrained`` writes it: sharded safetensors,
config.json, processor and tokenizer files) and ``ckpt/`` (an ma-agiqa checkpoint of the registered config,
``ma-agiqa-paper`` or ``ma-agiqa-qwen2-vl``, with untrained heads, whose ``semantic.model_id`` is that folder).
Then, each step timed with its peak memory:
1. the MLLM loaded back from ``ckpt`` as the job loads it (bf16 on CPU, ``MA_AGIQA_CPU_DTYPE``), both prompts
   run on two sample images: tokens per prompt (576 image tokens for LLaVA-1.5), finite vectors, and how far
   apart the two prompts' vectors are under each ``semantic.pooling`` (cosine; random weights say little);
2. ``python -m jobs.score --model ckpt --allow-untrained`` on ``--images`` sample images (one model actor):
   wall time, seconds per image, the processes' peak memory, finite scores.
The run stops (exit 2) when the machine's available memory falls below ``--min-free-gb``.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STORED = REPO / "tests" / "data" / "mllm"
SAMPLE = REPO / "samples" / "agiqa3k" / "images"
# family -> (stored config folder, registered model config)
FAMILIES = {"llava": ("llava-1.5-7b-hf", "ma-agiqa-paper"), "qwen2-vl": ("qwen2-vl-2b-instruct", "ma-agiqa-qwen2-vl")}
GB = 1024 ** 3


# -- memory ---------------------------------------------------------------------------------------------------
def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return pids


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


class MemoryWatch:
    """Samples the RSS of a process and all its descendants (a job's Ray workers too) every 0.2 s and keeps
    the peak; below ``min_free`` bytes of available memory it calls ``on_low`` once (stops the run)."""

    def __init__(self, pid: int | None = None, min_free: int = 0, on_low=None):
        self.pid, self.min_free, self.on_low = pid or os.getpid(), min_free, on_low
        self.peak, self.low = 0, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, sum(_rss(p) for p in _tree(self.pid)))
            if self.min_free and not self.low and available_bytes() < self.min_free:
                self.low = True
                if self.on_low:
                    self.on_low()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def _abort_low_memory():
    print(f"available memory below the limit ({available_bytes() / GB:.1f} GB left): stopping", file=sys.stderr, flush=True)
    os._exit(2)


# -- the model, its processor, the checkpoints ------------------------------------------------------------------
def stored_config(family: str, layers: int | None = None, image_side: int | None = None):
    """The family's transformers config from its stored config.json; ``layers``: that many layers in the
    language model and the vision tower, every width unchanged, and ``image_side``: LLaVA's tower at that
    side (smoke runs)."""
    from transformers import AutoConfig

    d = json.loads((STORED / FAMILIES[family][0] / "config.json").read_text())
    if image_side and family == "llava":
        d["vision_config"]["image_size"] = image_side
    if layers:
        if family == "llava":
            d["text_config"]["num_hidden_layers"] = d["vision_config"]["num_hidden_layers"] = layers
        else:  # Qwen2-VL's flat layout
            d["num_hidden_layers"] = d["max_window_layers"] = d["vision_config"]["depth"] = layers
    return AutoConfig.for_model(d.pop("model_type"), **d)


def special_tokens(family: str) -> dict[str, int]:
    """Each special token the family's processor and template write, at the id its stored config gives it
    (Llama's <unk>, <s>, </s> are 0, 1, 2; Qwen2's ids are those of its tokenizer)."""
    d = json.loads((STORED / FAMILIES[family][0] / "config.json").read_text())
    if family == "llava":
        return {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": d["image_token_index"], "<pad>": d["pad_token_id"]}
    return {
        "<|endoftext|>": d["bos_token_id"], "<|im_start|>": d["bos_token_id"] + 1, "<|im_end|>": d["eos_token_id"],
        "<|vision_start|>": d["vision_start_token_id"], "<|vision_end|>": d["vision_end_token_id"],
        "<|vision_pad|>": d["vision_token_id"], "<|image_pad|>": d["image_token_id"], "<|video_pad|>": d["video_token_id"],
    }


def build_tokenizer(family: str):
    """A byte-level BPE trained here on a small corpus (``ma_agiqa.tiny``), its ids then filled with unused
    tokens up to the special tokens' ids, so that every special token has the model's id and the vocabulary
    spans the model's embedding rows. Text tokenises into other ids and counts than the model's own
    tokenizer (the text around the image is 25-50 tokens either way); the image tokens are the model's."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ma_agiqa.tiny import _train_tokenizer

    specials = special_tokens(family)
    low = [t for t, i in sorted(specials.items(), key=lambda kv: kv[1]) if i < 16]  # Llama's, trained in at 0-2
    trained = json.loads(_train_tokenizer(low, vocab_size=512).backend_tokenizer.to_str())["model"]
    vocab = dict(trained["vocab"])
    high = sorted((i, t) for t, i in specials.items() if t not in vocab)
    while len(vocab) < high[0][0]:
        vocab[f"<unused_{len(vocab)}>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[tuple(m) if isinstance(m, list) else tuple(m.split()) for m in trained["merges"]]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    for i, name in high:
        while tok.get_vocab_size() < i:
            tok.add_special_tokens([AddedToken(f"<|unused_{tok.get_vocab_size()}|>", special=True)])
        tok.add_special_tokens([AddedToken(name, special=True)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    if family == "llava":
        fast.add_special_tokens({"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                                 "additional_special_tokens": ["<image>"]})
    else:
        fast.add_special_tokens({"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>",
                                 "additional_special_tokens": [t for t in specials if t not in ("<|endoftext|>", "<|im_end|>")]})
    wrong = {t: (i, fast.convert_tokens_to_ids(t)) for t, i in specials.items() if fast.convert_tokens_to_ids(t) != i}
    if wrong:
        raise AssertionError(f"special tokens at the wrong ids (wanted, got): {wrong}")
    return fast


def build_processor(family: str, max_pixels: int | None = None, image_side: int | None = None):
    """The family's processor: its stored image processor (``image_side``/``max_pixels`` shrink it for smoke
    runs), the local tokenizer, its chat template."""
    from transformers import AutoImageProcessor, LlavaProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    from ma_agiqa.tiny import LLAVA_CHAT_TEMPLATE, QWEN2_VL_CHAT_TEMPLATE

    directory = STORED / FAMILIES[family][0]
    image_processor = AutoImageProcessor.from_pretrained(directory)
    tokenizer = build_tokenizer(family)
    if family == "llava":
        if image_side:
            image_processor.size = {"shortest_edge": image_side}
            image_processor.crop_size = {"height": image_side, "width": image_side}
        settings = json.loads((directory / "processor_config.json").read_text())
        return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=LLAVA_CHAT_TEMPLATE,
                              **{k: settings[k] for k in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")})
    if max_pixels:
        image_processor = AutoImageProcessor.from_pretrained(directory, max_pixels=max_pixels,
                                                             size={"shortest_edge": 56 * 56, "longest_edge": max_pixels})
    video = Qwen2VLVideoProcessor(patch_size=image_processor.patch_size, merge_size=image_processor.merge_size,
                                  temporal_patch_size=image_processor.temporal_patch_size)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video,
                            chat_template=QWEN2_VL_CHAT_TEMPLATE)


def build_mllm(config, device: str = "cpu", dtype=None, seed: int = 0):
    """The task model (LM head included, as published checkpoints hold it) with random weights: built on the
    meta device, each tensor then allocated on ``device`` in ``dtype`` and set by transformers' initialisers
    (the rotary tables too), as ``from_pretrained`` does for weights a checkpoint lacks. Peak memory: the
    model in ``dtype``, no float32 copy."""
    import torch
    from transformers import AutoModelForImageTextToText

    dtype = dtype or torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.to_empty(device=device)
    torch.manual_seed(seed)
    model.initialize_weights()
    model.tie_weights()
    return model.eval()


def save_checkpoint(family: str, model, processor, ckpt: Path) -> Path:
    """``ckpt/semantic``: the MLLM as ``save_pretrained`` writes it (sharded safetensors); ``ckpt``: the
    registered config's ma-agiqa checkpoint, heads as initialised, its MLLM that folder (the checkpoint's own
    ``semantic/``, so saving copies nothing). The quality backbone is built with random weights (no download)
    and saved in the file."""
    from ma_agiqa import get_config
    from ma_agiqa.model import _build

    model.save_pretrained(ckpt / "semantic", max_shard_size="2GB")
    processor.save_pretrained(ckpt / "semantic")
    cfg = get_config(FAMILIES[family][1])
    cfg.semantic.model_id = "semantic"
    heads = _build(cfg, str(ckpt), "cpu", with_semantic=False, with_prompt=False, load_backbone=False)
    heads.save_pretrained(ckpt)
    return ckpt


# -- the checks ---------------------------------------------------------------------------------------------
def prompt_report(ex, images) -> dict:
    """Tokens per prompt, finite vectors, and the cosine between the two prompts' vectors under each pooling."""
    import torch

    from ma_agiqa.config import POOLINGS
    from ma_agiqa.semantic import pool_hidden

    t = time.perf_counter()
    hidden = ex.hidden_states(images)
    seconds = time.perf_counter() - t
    tokens = {k: {"total": [int(n) for n in inp["attention_mask"].sum(1)],
                  "image": [int(n) for n in (inp["input_ids"] == ex.image_token_id).sum(1)],
                  "padded_to": int(inp["input_ids"].shape[1])} for k, (_, inp) in hidden.items()}
    cosines, finite = {}, True
    a, b = list(hidden)[:2]
    for pooling in POOLINGS:
        vec = {k: pool_hidden(h.float(), inp["attention_mask"], pooling, inp["input_ids"] == ex.image_token_id)
               for k, (h, inp) in hidden.items()}
        finite &= all(bool(torch.isfinite(v).all()) for v in vec.values())
        cosines[pooling] = [round(float(c), 4) for c in torch.nn.functional.cosine_similarity(vec[a], vec[b], dim=1)]
    return {"images": len(images), "two_prompts_forward_s": round(seconds, 1), "tokens_per_prompt": tokens,
            "hidden_dtype": str(next(iter(hidden.values()))[0].dtype), "vectors_finite": finite,
            f"cosine {a} vs {b} per image, by pooling": cosines}


def write_manifest(images: list[Path], path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"{i:05d}-{p.stem}", "uri": str(p)}) + "\n" for i, p in enumerate(images)))
    return path


def score_job(ckpt: Path, images: list[Path], work: Path, extra: list[str], env: dict, min_free: int = 0) -> dict:
    """``python -m jobs.score --model ckpt --allow-untrained`` on ``images``, timed from outside, with the
    memory of its whole process tree; the scores read back from its table."""
    import pyarrow.parquet as pq

    out = work / "scores"
    cmd = [sys.executable, "-m", "jobs.score", "--manifest", str(write_manifest(images, work / "manifest.jsonl")),
           "--output", str(out), "--model", str(ckpt), "--allow-untrained", *extra]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with MemoryWatch(proc.pid, min_free, on_low=proc.kill) as watch:
        log = proc.communicate()[0]
    wall = time.perf_counter() - t
    result = {"command": " ".join(["python", "-m", "jobs.score", *cmd[3:]]), "returncode": proc.returncode,
              "wall_s": round(wall, 1), "peak_rss_gb_process_tree": round(watch.peak / GB, 2),
              "stopped_for_low_memory": watch.low}
    if proc.returncode != 0:
        result["log_tail"] = log[-3000:]
        return result
    summary = json.loads((out / "_summary.json").read_text())
    table = pq.read_table(out, columns=["score", "status"])
    scores = [s for s in table["score"].to_pylist() if s is not None]
    result.update(
        images=len(images), rows_ok=int(sum(s == "ok" for s in table["status"].to_pylist())),
        scores_finite=bool(scores) and all(abs(s) < float("inf") for s in scores), scores=[round(s, 4) for s in scores],
        seconds_per_image_wall=round(wall / len(images), 2), job_summary={k: summary.get(k) for k in (
            "elapsed_s", "images_per_s", "model_stages", "semantic_actors", "quality_actors", "gpus_per_actor", "model_id")},
    )
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(FAMILIES), default="llava")
    p.add_argument("--work", type=Path, default=Path("/tmp/ma-agiqa-real-size"))
    p.add_argument("--images", type=int, default=4, help="sample images scored through the job")
    p.add_argument("--min-free-gb", type=float, default=6.0, help="stop when available memory falls below this")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint (else deleted at the end)")
    p.add_argument("--smoke", action="store_true",
                   help="the same steps on 2 layers at the real widths, a small image side, 2 images (CI: the script still runs)")
    args = p.parse_args()
    if args.smoke:
        args.images = min(args.images, 2)
        args.work = args.work.with_name(args.work.name + "-smoke")
    try:
        measure(args)
    finally:
        if args.smoke:  # a smoke run's folder is scratch, however it ends: its result is the JSON it printed
            shutil.rmtree(args.work, ignore_errors=True)


def measure(args):
    small = {"layers": 2, "image_side": 112} if args.smoke else {}
    small_processor = {"max_pixels": 112 * 112, "image_side": 112} if args.smoke else {}
    import torch

    from ma_agiqa.images import decode_image
    from ma_agiqa.model import load_semantic
    from ma_agiqa.semantic import CPU_DTYPE_ENV

    min_free = int(args.min_free_gb * GB)
    work = args.work / args.config
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    ckpt = work / "ckpt"
    report = {"config": args.config, "smoke": args.smoke, "registered": FAMILIES[args.config][1], "stored_config": f"tests/data/mllm/{FAMILIES[args.config][0]}",
              "command": " ".join(["python", "benchmarks/real_size.py", *sys.argv[1:]]), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "memory_available_gb_at_start": round(available_bytes() / GB, 1)}

    with MemoryWatch(min_free=min_free, on_low=_abort_low_memory) as watch:
        t = time.perf_counter()
        model = build_mllm(stored_config(args.config, **small))
        build_s = time.perf_counter() - t
        processor = build_processor(args.config, **small_processor)
        report["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
        report["build"] = {"seconds": round(build_s, 1), "dtype": str(next(model.parameters()).dtype)}
        t = time.perf_counter()
        save_checkpoint(args.config, model, processor, ckpt)
        report["build"]["save_s"] = round(time.perf_counter() - t, 1)
        report["build"]["peak_rss_gb"] = round(watch.peak / GB, 2)
        shards = sorted((ckpt / "semantic").glob("*.safetensors"))
        report["saved"] = {"shards": len(shards), "gb": round(sum(s.stat().st_size for s in shards) / GB, 2),
                           "files": sorted(f.name for f in (ckpt / "semantic").iterdir())}
        del model
        gc.collect()

    os.environ[CPU_DTYPE_ENV] = "bfloat16"  # as the job's actors get it below: the float32 weights would not fit
    with MemoryWatch(min_free=min_free, on_low=_abort_low_memory) as watch:
        t = time.perf_counter()
        ex = load_semantic(ckpt)
        report["load"] = {"seconds": round(time.perf_counter() - t, 1), "dtype": str(ex.dtype)}
        images = [decode_image(p.read_bytes()) for p in sorted(SAMPLE.glob("*.jpg"))[:2]]
        report["prompts"] = prompt_report(ex, images)
        report["load"]["peak_rss_gb (load + 2 images, both prompts)"] = round(watch.peak / GB, 2)
        del ex
        gc.collect()

    report["job"] = score_job(ckpt, sorted(SAMPLE.glob("*.jpg"))[: args.images], work,
                              ["--quality-actors", "1", "--batch-size", str(min(args.images, 4))],
                              {CPU_DTYPE_ENV: "bfloat16"}, min_free)
    report["peak_rss_gb_this_process"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2, 2)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
    print(json.dumps(report, indent=2))
    (work / "report.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
