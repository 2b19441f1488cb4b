"""Training and evaluation on tiny-random with real AGIQA-3K images; loaders on fixture label files."""
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from ma_agiqa.datasets import load_dataset, split_frame


def write_agiqa3k_fixture(root, agiqa_dir, n=24):
    """A label file in AGIQA-3K's published layout (data.csv, images beside it) for n real images."""
    labels = pd.read_csv(agiqa_dir / "labels.csv")
    labels = labels.groupby(labels["name"].str.rsplit("_", n=1).str[0]).head(3).head(n)
    root.mkdir(parents=True, exist_ok=True)
    for name in labels["name"]:
        os.symlink(agiqa_dir / "images" / name, root / name)
    labels.drop(columns="split").to_csv(root / "data.csv", index=False)
    return labels


def test_agiqa3k_loader_reads_the_published_layout(tmp_path, agiqa_dir):
    labels = write_agiqa3k_fixture(tmp_path / "agiqa3k", agiqa_dir, n=12)
    df = load_dataset("agiqa3k", str(tmp_path / "agiqa3k"))
    assert list(df.columns) == ["image_id", "uri", "mos", "prompt", "generator", "split"]
    assert len(df) == 12 and df["split"].isna().all()
    first = labels.iloc[0]
    assert df["uri"][0] == str(tmp_path / "agiqa3k" / first["name"])
    assert df["mos"][0] == pytest.approx(first["mos_quality"])
    assert df["generator"][0] == first["name"].rsplit("_", 1)[0]
    align = load_dataset("agiqa3k", str(tmp_path / "agiqa3k"), target="align")
    assert align["mos"][0] == pytest.approx(first["mos_align"])
    # our copy: labels.csv with a split column, images under images/
    ours = load_dataset("agiqa3k", str(agiqa_dir))
    assert set(ours["split"]) == {"train", "val"} and ours["uri"][0].endswith("images/" + ours["image_id"][0] + ".jpg")


def test_split_by_prompt_keeps_prompts_on_one_side(agiqa_dir):
    df = load_dataset("agiqa3k", str(agiqa_dir))
    train, val = split_frame(df, seed=3, by_prompt=True)
    assert len(train) + len(val) == len(df)
    assert not set(train["prompt"]) & set(val["prompt"])
    given_train, given_val = split_frame(df)
    assert (given_train["split"] == "train").all() and len(given_val) == (df["split"] == "val").sum()


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"MA_AGIQA_CACHE": os.environ["MA_AGIQA_CACHE"]}})
    yield
    ray.shutdown()


def test_train_cache_evaluate_and_score_agree(local_ray, tmp_path, agiqa_dir, monkeypatch):
    from jobs import evaluate, score, train
    from ma_agiqa import create_model
    from ma_agiqa.training import forward_rows, prepare
    from ma_agiqa.training import train as train_model

    root = tmp_path / "agiqa3k"
    labels = write_agiqa3k_fixture(root, agiqa_dir, n=24)
    split = pd.DataFrame({"image_id": labels["name"].str.rsplit(".", n=1).str[0],
                          "split": ["train"] * 16 + ["val"] * 8})
    split.to_csv(tmp_path / "split.csv", index=False)
    cache = tmp_path / "cache"

    # one epoch lowers the loss on a fixed batch
    df = load_dataset("agiqa3k", str(root))
    model = create_model("tiny-random", with_semantic=False)
    inputs, stats = prepare(model, "tiny-random", df, cache)
    assert stats == {"semantic_cached": 0, "semantic_computed": 24}
    fixed = np.arange(8)

    def loss():
        model.eval()
        with torch.no_grad():
            pred, _ = forward_rows(model, inputs, fixed)
        return float(torch.mean((pred - torch.from_numpy(inputs.mos[fixed])) ** 2))

    before = loss()
    model.cfg.train.epochs, model.cfg.train.lr, model.cfg.train.batch_size = 1, 1e-3, 4
    train_model(model, inputs, inputs, log=lambda _: None)
    assert loss() < before

    # jobs.train: the MLLM's vectors come from the cache now; the scoring job must not run
    def no_mllm(*a, **k):
        raise AssertionError("the MLLM ran although its vectors are cached")

    monkeypatch.setattr(score, "run", no_mllm)
    out = tmp_path / "ckpt"
    assert train.main(["--data-root", str(root), "--model", "tiny-random", "--output", str(out), "--split-file",
                       str(tmp_path / "split.csv"), "--epochs", "2", "--cache-dir", str(cache)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["cache"]["train"]["semantic_computed"] == 0 and metrics["cache"]["train"]["semantic_cached"] == 16
    monkeypatch.undo()

    # the checkpoint scores the same through jobs.evaluate and jobs.score
    split.assign(split="val").to_csv(tmp_path / "all.csv", index=False)
    ev = evaluate.evaluate(evaluate.parse_args(["--model", str(out), "--data-root", str(root), "--split", "all",
                                                "--cache-dir", str(cache)]))
    assert ev["n"] == 24 and set(ev["per_generator"]) == set(df["generator"])
    manifest = tmp_path / "m.jsonl"
    df[["image_id", "uri"]].rename(columns={"image_id": "id"}).to_json(manifest, orient="records", lines=True)
    score.run(score.parse_args(["--manifest", str(manifest), "--output", str(tmp_path / "scores"), "--model", str(out)]))
    from helpers import read_table

    scored = {r["image_id"]: r["score"] for r in read_table(str(tmp_path / "scores")).to_pylist()}
    for image_id, value in ev["predictions"].items():
        assert scored[image_id] == pytest.approx(value, abs=1e-4)
