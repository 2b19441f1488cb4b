"""Cheap checks first: a hub that cannot be reached and a checkpoint store that cannot be read are one line
and exit 2 before Ray starts; the driver reads a remote checkpoint's config and weights header, not its
weights; a local MLLM folder is named by its content."""
import hashlib
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ma_agiqa import create_model
from ma_agiqa.checkpoint import HEADER_FILE, WEIGHTS_FILE, WEIGHTS_HASH_KEY, model_id

REPO = Path(__file__).resolve().parents[1]


def score_cli(tmp_path, *args, env=None):
    """``python -m jobs.score`` in a subprocess with a one-image manifest: (exit code, stderr)."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\nimages/a.jpg\n")
    run_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    out = subprocess.run([sys.executable, "-m", "jobs.score", "--manifest", str(manifest), "--output",
                          str(tmp_path / "out"), *args], cwd=REPO, env=run_env, capture_output=True, text=True, timeout=300)
    return out.returncode, out.stderr


def one_line_refusal(rc, err, *words):
    """Exit 2 and one error line, the last (botocore's INFO lines about where it found credentials aside)."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err[-2000:]
    for word in words:
        assert word in errors[0], errors[0]


@pytest.mark.parametrize("allow", [False, True])
def test_a_hub_model_offline_is_refused_in_one_line(tmp_path, allow):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-hf"), "MA_AGIQA_CACHE": str(tmp_path / "cache")}
    rc, err = score_cli(tmp_path, "--model", "ma-agiqa-paper", *(["--allow-untrained"] if allow else []), env=env)
    if allow:  # past the untrained check: the MLLM's config is needed, and cannot be had
        one_line_refusal(rc, err, "llava-hf/llava-1.5-7b-hf", "config.json", "HF_HOME", "--model DIR")
    else:  # untrained heads are refused first, with no network at all
        one_line_refusal(rc, err, "never trained", "--allow-untrained")
    assert not (tmp_path / "out").exists()


# -- checkpoints on object storage ----------------------------------------------------------------------------
def upload(s3_server, local: Path, bucket: str, prefix: str):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"])
    if bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=bucket)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            s3.upload_file(str(f), bucket, f"{prefix}/{f.relative_to(local)}")


def trained_tiny(directory: Path):
    model = create_model("tiny-random")
    with torch.no_grad():
        model.moe.regress.bias.add_(0.5)
    model.save_pretrained(directory)
    return model


def test_the_driver_reads_a_remote_checkpoint_header_not_its_weights(s3_server, tmp_path, monkeypatch):
    import fsspec

    from ma_agiqa.scoring.model_ref import resolve_model

    model = trained_tiny(tmp_path / "ckpt")
    upload(s3_server, tmp_path / "ckpt", "heads", "ckpt")
    monkeypatch.setenv("MA_AGIQA_CACHE", str(tmp_path / "cache"))
    fsspec.config.conf.pop("s3", None)
    resolved = resolve_model("s3://heads/ckpt/")
    held = {str(p.relative_to(resolved.directory)) for p in resolved.directory.rglob("*") if p.is_file()}
    assert HEADER_FILE in held and "config.json" in held and "semantic/config.json" in held  # what framing reads
    assert not [f for f in held if f.endswith(".safetensors")]  # neither the heads' nor the MLLM's weights
    assert resolved.trained and resolved.model_id == model.model_id == model_id(tmp_path / "ckpt")
    assert (resolved.directory / HEADER_FILE).stat().st_size < (tmp_path / "ckpt" / WEIGHTS_FILE).stat().st_size
    assert sorted(p.name for p in (tmp_path / "cache" / "checkpoints").iterdir()) == [resolved.directory.name]


def test_a_checkpoint_saved_before_the_header_recorded_its_hash_is_read_whole(s3_server, tmp_path, monkeypatch):
    """An older checkpoint's header has no weights hash: the driver fetches it whole to name it, as before."""
    import fsspec
    from safetensors.numpy import load_file, save_file
    from safetensors import safe_open

    from ma_agiqa.checkpoint import LOADED_KEY
    from ma_agiqa.scoring.model_ref import resolve_model

    trained_tiny(tmp_path / "ckpt")
    path = tmp_path / "ckpt" / WEIGHTS_FILE
    with safe_open(str(path), framework="numpy") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in (WEIGHTS_HASH_KEY, LOADED_KEY)}
    save_file(load_file(str(path)), str(path), metadata=meta)
    before = model_id(tmp_path / "ckpt")  # its MLLM folder, recorded nowhere, named by its content
    upload(s3_server, tmp_path / "ckpt", "heads", "old")
    monkeypatch.setenv("MA_AGIQA_CACHE", str(tmp_path / "cache"))
    fsspec.config.conf.pop("s3", None)
    resolved = resolve_model("s3://heads/old/")
    assert resolved.directory.name.endswith(".head") and resolved.model_id == before
    assert len(list((tmp_path / "cache" / "checkpoints").iterdir())) == 2  # the header, then the whole


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["no-bucket", "bad-credentials", "endpoint-down"])
def test_an_unreadable_checkpoint_store_is_one_line(s3_server, tmp_path, case):
    trained_tiny(tmp_path / "ckpt")
    upload(s3_server, tmp_path / "ckpt", "heads", "ckpt")
    env = {"MA_AGIQA_CACHE": str(tmp_path / "cache"), "AWS_MAX_ATTEMPTS": "2"}
    uri = "s3://heads/ckpt/"
    if case == "no-bucket":
        uri = "s3://no-such-bucket/ckpt/"
    elif case == "bad-credentials":  # moto checks no signatures; credentials that cannot be found at all
        env.update({"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
                    "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"})
    else:
        env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    rc, err = score_cli(tmp_path, "--model", uri, env=env)
    one_line_refusal(rc, err, f"--model {uri}", "cannot be read" if case != "no-bucket" else "")
    assert not (tmp_path / "out").exists()


# -- identity from content ------------------------------------------------------------------------------------
def names_and_sizes(path: Path) -> str:
    """The fingerprint a folder had before content counted: its config and its weight files' names and sizes."""
    h = hashlib.sha256((path / "config.json").read_bytes() if (path / "config.json").exists() else b"")
    for f in sorted(path.glob("*")):
        if f.suffix in (".safetensors", ".bin", ".pt", ".pth"):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def test_builtin_and_packaged_models_keep_their_names(tmp_path):
    """The tiny and offline configs' ids do not move: their MLLM and prompt encoder (built from code,
    installed with a package) are still named by their files' names and sizes."""
    from ma_agiqa import get_config
    from ma_agiqa.hub import fingerprint, resolve

    for model_id_ in ("builtin:tiny-random-vlm", "builtin:tiny-random-sentence", get_config("ma-agiqa-offline").prompt.model_id):
        assert fingerprint(model_id_) == names_and_sizes(Path(resolve(model_id_)))


def test_a_fine_tuned_mllm_of_the_same_shape_is_another_model(tmp_path, monkeypatch):
    """Two local MLLM folders differing only in their weights' values get different ids; the content is hashed
    once per node (cached by path, size and mtime)."""
    import dataclasses

    from ma_agiqa import get_config
    from ma_agiqa.checkpoint import UNTRAINED, identity
    from ma_agiqa.hub import fingerprint, resolve

    monkeypatch.setenv("MA_AGIQA_CACHE", str(tmp_path / "cache"))
    base = Path(resolve("builtin:tiny-random-vlm"))
    shutil.copytree(base, tmp_path / "a")
    shutil.copytree(base, tmp_path / "b")
    weights = sorted((tmp_path / "b").glob("*.safetensors"))[0]
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: same names, same sizes
    weights.write_bytes(bytes(data))
    assert names_and_sizes(tmp_path / "a") == names_and_sizes(tmp_path / "b")
    cfg = get_config("tiny-random")
    ids = [identity(dataclasses.replace(cfg, semantic=dataclasses.replace(cfg.semantic, model_id=str(tmp_path / d))), UNTRAINED)
           for d in "ab"]
    assert ids[0] != ids[1]
    digests = list((tmp_path / "cache" / "file-digests").iterdir())
    assert len(digests) == 2
    stamp = [d.stat().st_mtime_ns for d in digests]
    fingerprint(str(tmp_path / "a"))
    assert [d.stat().st_mtime_ns for d in digests] == stamp and len(list(digests[0].parent.iterdir())) == 2  # not hashed again
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # touched: hashed anew
    fingerprint(str(tmp_path / "b"))
    assert len(list(digests[0].parent.iterdir())) == 3


def test_registered_hub_mllms_name_a_revision():
    """Every registered hub MLLM is pinned (no ``@None`` in its id), and the revision is part of the id."""
    import dataclasses

    from ma_agiqa import get_config, list_models
    from ma_agiqa.checkpoint import UNTRAINED, identity
    from ma_agiqa.hub import is_local

    hub = [get_config(n) for n in list_models() if get_config(n).semantic is not None and not is_local(get_config(n).semantic.model_id)]
    assert hub
    for cfg in hub:
        assert cfg.semantic.revision, cfg.name
        other = dataclasses.replace(cfg, semantic=dataclasses.replace(cfg.semantic, revision="0" * 40))
        assert identity(other, UNTRAINED) != identity(cfg, UNTRAINED)
