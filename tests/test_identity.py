"""A model's identity (the score table's ``model`` column, the resume key), read from its files without
building it; no scoring with random heads unless asked; checkpoints on object storage."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import ma_agiqa
from ma_agiqa import create_model, get_config
from ma_agiqa.checkpoint import UNTRAINED, identity, is_trained, model_id
from ma_agiqa.config import ModelConfig

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def _trained(tmp_path, name="tiny-random"):
    """A tiny checkpoint whose heads differ from their initialisation, as after training."""
    model = create_model(name, with_semantic=False)
    with torch.no_grad():
        model.moe.regress.bias.add_(0.5)
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


@pytest.mark.parametrize("change", [
    {"prompts": {"coherence": "Is this image coherent?", "semantic": "Does it mean something?"}},
    {"prompt_order": "image-first"},
    {"pooling": "last"},
    {"framing": "processor"},
    {"dtype": "float16"},
    {"revision": "0123abc"},
])
def test_the_id_changes_with_what_changes_a_score(tmp_path, change):
    model, ckpt = _trained(tmp_path)
    before = model_id(ckpt)
    assert before == model.model_id
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["semantic"].update(change)
    if "prompts" in change:
        for expert, name in zip(cfg["moe"]["experts"], change["prompts"]):
            expert["name"] = name
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert model_id(ckpt) != before


def test_the_id_covers_weights_backbone_and_mllm():
    cfg = get_config("tiny-random")
    base = identity(cfg, "abc")
    assert identity(cfg, "abd") != base  # the heads
    assert identity(dataclasses.replace(cfg, quality=dataclasses.replace(cfg.quality, backbone="vit_small_patch8_224")), "abc") != base
    other = dataclasses.replace(cfg, semantic=dataclasses.replace(cfg.semantic, model_id="builtin:tiny-random-qwen2-vl"))
    assert identity(other, "abc") != base  # the MLLM
    # and nothing else: the config built anew and read back from JSON, with other training settings, the same id
    again = ModelConfig.from_dict(json.loads(json.dumps(get_config("tiny-random").to_dict())))
    again.train = dataclasses.replace(again.train, lr=again.train.lr * 2, epochs=again.train.epochs + 1)
    assert again is not cfg and identity(again, "abc") == base
    paper = get_config("ma-agiqa-paper")
    assert identity(paper, UNTRAINED) != identity(
        dataclasses.replace(paper, semantic=dataclasses.replace(paper.semantic, revision="a" * 40)), UNTRAINED)


def test_ids_are_read_from_files_without_building_a_model(tmp_path):
    """The driver learns an id from the checkpoint's files (and a registered config's from its config alone):
    ma_agiqa.model, timm and torch stay unimported."""
    model, ckpt = _trained(tmp_path)
    code = (
        "import json, sys\n"
        "from ma_agiqa.checkpoint import model_id\n"
        f"ids = [model_id({str(ckpt)!r}), model_id('ma-agiqa-paper'), model_id('ma-agiqa-offline')]\n"
        "print(json.dumps({'ids': ids, 'loaded': [m for m in ('ma_agiqa.model', 'torch', 'timm', 'transformers') if m in sys.modules]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["loaded"] == []
    assert result["ids"][0] == model.model_id  # from the files' bytes alone = from the tensors that wrote them
    assert result["ids"][1].startswith("ma-agiqa-paper@") and result["ids"][2].startswith("ma-agiqa-offline@")


def test_the_id_follows_each_byte_of_the_weights(tmp_path):
    """One flipped bit of a stored tensor gives another id, the same from the file (``model_id``) and from the
    model loaded from it (its tensors); the loaded model saved again, unchanged, keeps it."""
    model, ckpt = _trained(tmp_path)
    weights = ckpt / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the file ends with the last tensor's bytes
    weights.write_bytes(bytes(data))
    flipped = model_id(ckpt)
    loaded = ma_agiqa.from_pretrained(ckpt, with_semantic=False)
    assert flipped != model.model_id and loaded.model_id == flipped
    loaded.save_pretrained(tmp_path / "again")
    assert model_id(tmp_path / "again") == flipped


def test_a_registered_config_and_its_model_share_an_id():
    assert create_model("tiny-random", with_semantic=False).model_id == model_id("tiny-random")
    assert create_model("tiny-random-qwen2-vl", with_semantic=False).model_id == model_id("tiny-random-qwen2-vl")
    assert model_id("tiny-random") != model_id("tiny-random-qwen2-vl")


# -- no silent random heads -----------------------------------------------------------------------------------
def test_heads_never_trained_are_known_as_such(tmp_path):
    assert not is_trained("tiny-random") and not is_trained("ma-agiqa-paper")
    assert is_trained("ma-agiqa-offline")  # ships trained heads
    untrained = create_model("tiny-random", with_semantic=False)
    assert not untrained.trained
    untrained.save_pretrained(tmp_path / "u")
    assert not is_trained(tmp_path / "u") and model_id(tmp_path / "u") == untrained.model_id == model_id("tiny-random")
    model, ckpt = _trained(tmp_path)
    assert model.trained and is_trained(ckpt)
    assert ma_agiqa.from_pretrained(ckpt, with_semantic=False).model_id == model.model_id != model_id("tiny-random")


def test_scoring_with_untrained_heads_is_refused_unless_asked(tmp_path, capsys):
    from jobs import score

    argv = ["--manifest", str(REPO / "samples/agiqa3k/manifest.jsonl"), "--image-root", str(REPO / "samples/agiqa3k"),
            "--output", str(tmp_path / "o")]
    create_model("tiny-random", with_semantic=False).save_pretrained(tmp_path / "untrained")
    for model in ("tiny-random", str(tmp_path / "untrained")):
        with pytest.raises(score.JobConfigError, match="never trained.*--allow-untrained"):
            score.run(score.parse_args([*argv, "--model", model]))
    assert score.main([*argv, "--model", "tiny-random"]) == 2
    assert "--allow-untrained" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before anything ran
    assert score.parse_args([*argv, "--allow-untrained"]).allow_untrained


# -- checkpoints on object storage ----------------------------------------------------------------------------
def test_a_checkpoint_on_s3_is_fetched_once_per_node(s3_server, tmp_path, monkeypatch, agiqa_images):
    import boto3
    import fsspec

    from ma_agiqa.checkpoint import fetch_checkpoint

    model = create_model("tiny-random")
    with torch.no_grad():
        model.moe.regress.bias.add_(0.5)
    model.save_pretrained(tmp_path / "ckpt")
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="models")
    for f in sorted((tmp_path / "ckpt").rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), "models", f"ckpt/{f.relative_to(tmp_path / 'ckpt')}")
    monkeypatch.setenv("MA_AGIQA_CACHE", str(tmp_path / "cache"))
    fsspec.config.conf.pop("s3", None)
    uri = "s3://models/ckpt/"
    assert model_id(uri) == model.model_id and is_trained(uri)
    local = fetch_checkpoint(uri)
    assert local.parent == tmp_path / "cache" / "checkpoints" and (local / "semantic" / "config.json").is_file()
    stamp = (local / "model.safetensors").stat().st_mtime_ns
    loaded = ma_agiqa.from_pretrained(uri)
    assert fetch_checkpoint(uri) == local and (local / "model.safetensors").stat().st_mtime_ns == stamp  # not fetched again
    assert torch.equal(loaded.score_images(agiqa_images[:2])["score"], model.score_images(agiqa_images[:2])["score"])
    assert loaded.model_id == model.model_id
    # a checkpoint overwritten in place is fetched again
    with torch.no_grad():
        model.moe.regress.bias.add_(0.25)
    model.save_pretrained(tmp_path / "ckpt")
    s3.upload_file(str(tmp_path / "ckpt" / "model.safetensors"), "models", "ckpt/model.safetensors")
    assert fetch_checkpoint(uri) != local and model_id(uri) == model.model_id
    with pytest.raises(KeyError, match="no checkpoint"):
        model_id("s3://models/nothing-here/")


def test_the_job_scores_with_a_checkpoint_on_s3(s3_server, tmp_path):
    """jobs.score --model s3://...: the driver reads the config and id from the fetched copy, each actor fetches it
    into its node's cache (here the same machine, so once), and the rows carry the checkpoint's id."""
    import os

    import boto3
    import ray

    from helpers import SAMPLE, read_table
    from jobs import score

    model, ckpt = _trained(tmp_path)
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="jobmodels")
    for f in sorted(ckpt.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), "jobmodels", f"run/{f.relative_to(ckpt)}")
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {
        k: os.environ[k] for k in ("MA_AGIQA_CACHE", *s3_server) if k in os.environ}})
    try:
        summary = score.run(score.parse_args([
            "--manifest", str(SAMPLE / "manifest.jsonl"), "--image-root", str(SAMPLE), "--output", str(tmp_path / "o"),
            "--model", "s3://jobmodels/run/", "--limit", "4", "--batch-size", "4",
        ]))
    finally:
        ray.shutdown()
    table = read_table(str(tmp_path / "o"))
    assert summary["ok"] == 4 and set(table["model"].to_pylist()) == {model.model_id}
