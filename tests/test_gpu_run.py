"""benchmarks/gpu_run.py --smoke end to end on CPU, and the real-size builders it shares with
benchmarks/real_size.py (no download: stored configs, a local tokenizer with the models' special ids)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from real_size import build_mllm, build_processor, special_tokens, stored_config  # noqa: E402


@pytest.mark.parametrize("family, image_tokens", [("llava", 576), ("qwen2-vl", 324)])
def test_the_local_processor_writes_the_models_tokens(family, image_tokens):
    """Every special token at its config id, the vocabulary within the embedding, and the real image-token
    count for a 512 px square image: 24 x 24 for LLaVA-1.5 at 336 px, 18 x 18 for Qwen2-VL."""
    from PIL import Image

    processor = build_processor(family)
    config = stored_config(family)
    tokenizer = processor.tokenizer
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in special_tokens(family)} == special_tokens(family)
    assert len(tokenizer) <= config.get_text_config().vocab_size
    image_id = getattr(config, "image_token_id", None) or config.image_token_index
    assert processor.image_token_id == image_id
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Is it?"}]}],
                                         add_generation_prompt=True)
    ids = processor(images=[Image.new("RGB", (512, 512))], text=[text], return_tensors="pt")["input_ids"][0]
    assert int((ids == image_id).sum()) == image_tokens


def test_the_meta_build_is_transformers_build_in_bf16():
    """Built on the meta device and initialised in place: the same buffers (rotary tables) and the same
    norms and biases as transformers' own build, every weight in bf16 (no float32 copy made)."""
    from transformers import AutoModelForImageTextToText

    config = stored_config("qwen2-vl", layers=1)  # two rotary tables (text M-RoPE, vision)
    built = build_mllm(config)
    reference = AutoModelForImageTextToText.from_config(stored_config("qwen2-vl", layers=1), dtype=torch.bfloat16)
    assert {p.dtype for p in built.parameters()} == {torch.bfloat16}
    ours, theirs = dict(built.named_buffers()), dict(reference.named_buffers())
    assert sorted(ours) == sorted(theirs) and any("inv_freq" in k for k in ours)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    params, ref_params = dict(built.named_parameters()), dict(reference.named_parameters())
    for name, p in params.items():
        if p.dim() == 1:  # norms (ones) and biases (zeros)
            assert torch.equal(p, ref_params[name]), name
        else:
            assert 0.01 < float(p.detach().float().std()) < 0.04, name  # initializer_range 0.02, not uninitialised memory


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_the_smoke_run_records_every_field(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "benchmarks/gpu_run.py", "--smoke", "--out", str(out), "--work", str(work)],
                   cwd=REPO, env=env, check=True, timeout=1200, capture_output=True)
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]  # no checkpoint in --out
    data = json.loads((out / "results.json").read_text())
    envr = data["environment"]
    assert envr["device"] == "cpu" and envr["torch"] == torch.__version__ and envr["transformers"]
    for family, registered in (("llava", "ma-agiqa-paper"), ("qwen2-vl", "ma-agiqa-qwen2-vl")):
        sem = data["semantic"][family]
        assert sem["registered"] == registered
        assert sem["dtype"] == {"weights": "torch.bfloat16", "last_hidden_state": "torch.bfloat16"}
        assert _finite(sem["tflop_per_image (model_forward --flops, real size)"])
        assert any("scaled_dot_product" in op for op in sem["attention_ops"])
        assert all(t["image"] > 0 and t["total"] > t["image"] for t in sem["tokens_per_prompt"].values())
        assert sorted(sem["by_batch_size"], key=int) == ["1", "2"]
        for rates in sem["by_batch_size"].values():
            for key in ("images_per_s", "model_images_per_s (processor time taken out)", "achieved_tflops", "utilisation"):
                assert _finite(rates[key]) and rates[key] > 0, (family, key)
    assert len(data["quality"]) == 2
    for rates in data["quality"].values():
        assert _finite(rates["images_per_s"]) and rates["images_per_s"] > 0 and rates["dtype"] == "torch.float32"
    job = data["job"]
    assert job["returncode"] == 0 and job["images"] == 8 and job["summary"]["ok"] == 8
    assert _finite(job["summary"]["images_per_s"]) and _finite(job["wall_s"])
    assert _finite(data["overhead"]["job_over_stages"]) and data["overhead"]["job_over_stages"] > 0
    table = (out / "results.md").read_text()
    assert table.count("| semantic ma-agiqa-paper |") == 2 and "jobs.score end to end, 8 images" in table
