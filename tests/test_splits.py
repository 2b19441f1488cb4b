"""Train / val / test splits: val chooses the epoch, test reports; the reference's 70/10/20 procedure by name."""
import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import refused

from ma_agiqa.datasets import reference_split, split_frame, split_table, split_three


def frame(n: int = 50, prompts: int = 10, split=None) -> pd.DataFrame:
    return pd.DataFrame({
        "image_id": [f"img_{i:04d}" for i in range(n)], "uri": [f"/x/{i}.jpg" for i in range(n)],
        "mos": np.linspace(0, 5, n), "prompt": [f"prompt {i % prompts}" for i in range(n)],
        "generator": ["g"] * n, "split": split,
    })


def ids(part: pd.DataFrame) -> set:
    return set(part["image_id"])


def test_reference_split_is_the_reference_procedure():
    df = frame(2385)
    train, val, test = reference_split(df)
    # MA-AGIQA's dataset_general(type='random', set_seed=20), written out: shuffle 0..n-1 with Python's random
    # seeded with 20, cut at int(0.7 n) and int(0.8 n)
    order = list(range(2385))
    random.seed(20)
    random.shuffle(order)
    assert (len(train), len(val), len(test)) == (1669, 239, 477)
    assert ids(train) == {df["image_id"][i] for i in order[:1669]}
    assert ids(val) == {df["image_id"][i] for i in order[1669:1908]}
    assert ids(test) == {df["image_id"][i] for i in order[1908:]}
    assert list(test["image_id"]) == sorted(test["image_id"])  # rows keep the label file's order
    other = reference_split(df, seed=21)[2]
    assert ids(other) != ids(test)


@pytest.mark.parametrize("by_prompt", [False, True])
def test_seeded_three_way_split_is_disjoint_and_keeps_the_two_way_val(by_prompt):
    df = frame(200, prompts=40)
    train, val, test = split_three(df, seed=3, by_prompt=by_prompt, val_fraction=0.2, test_fraction=0.2)
    assert not ids(train) & ids(val) and not ids(train) & ids(test) and not ids(val) & ids(test)
    assert ids(train) | ids(val) | ids(test) == ids(df)
    assert len(test) > 0 and len(train) > len(val)
    assert ids(val) == ids(split_frame(df, seed=3, by_prompt=by_prompt)[1])  # same seed, same val
    if by_prompt:
        parts = [set(p["prompt"]) for p in (train, val, test)]
        assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
        assert len(parts[2]) == 8  # 20 % of the 40 prompts
    else:
        assert len(test) == 40
    again = split_three(df, seed=3, by_prompt=by_prompt, val_fraction=0.2, test_fraction=0.2)
    assert all(ids(a) == ids(b) for a, b in zip(again, (train, val, test)))


def test_without_a_test_fraction_the_test_part_is_empty_and_train_unchanged():
    df = frame()
    train, val, test = split_three(df, seed=5, test_fraction=0.0)
    two = split_frame(df, seed=5)
    assert test.empty and ids(train) == ids(two[0]) and ids(val) == ids(two[1])


def test_label_file_split_with_test_rows():
    df = frame(10, split=["train"] * 6 + ["val"] * 2 + ["test"] * 2)
    train, val, test = split_three(df)
    assert (len(train), len(val), len(test)) == (6, 2, 2) and set(test["split"]) == {"test"}
    two = split_frame(df)  # the two-way split as before: test rows join val
    assert len(two[1]) == 4
    only_test = frame(10, split=["train"] * 8 + ["test"] * 2)  # no val rows: its test rows are the val part
    assert [len(p) for p in split_three(only_test)] == [8, 2, 0]
    with pytest.raises(ValueError, match="no split column"):
        split_three(frame())
    with pytest.raises(ValueError, match="training part"):
        split_three(df, seed=1, val_fraction=0.5, test_fraction=0.5)


def test_split_table_names_every_row():
    df = frame(20)
    parts = split_three(df, seed=1, val_fraction=0.2, test_fraction=0.3)
    table = split_table(*parts)
    assert len(table) == 20 and table["image_id"].is_unique
    assert table["split"].value_counts().to_dict() == {"train": 10, "test": 6, "val": 4}


# -- jobs.evaluate on a run's own parts ---------------------------------------------------------------------
SAMPLE_IMAGES = sorted((Path(__file__).resolve().parents[1] / "samples" / "agiqa3k" / "images").glob("*.jpg"))


@pytest.fixture
def small_dataset(tmp_path):
    """12 real AGIQA-3K images in the dataset's layout, with a label file split train/val only."""
    names = [p.name for p in SAMPLE_IMAGES[:12]]
    (tmp_path / "images").mkdir()
    for n in names:
        (tmp_path / "images" / n).symlink_to(SAMPLE_IMAGES[0].parent / n)
    pd.DataFrame({"name": names, "prompt": ["a photo"] * 12, "mos_quality": np.linspace(0, 4, 12),
                  "mos_align": 1.0, "split": ["train"] * 8 + ["val"] * 4}).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path, [n.rsplit(".", 1)[0] for n in names]


def test_evaluate_scores_the_split_files_test_part(small_dataset, tmp_path):
    from jobs import evaluate

    root, image_ids = small_dataset
    split = pd.DataFrame({"image_id": image_ids, "split": ["train"] * 6 + ["val"] * 3 + ["test"] * 3})
    split.to_csv(tmp_path / "split.csv", index=False)
    common = ["--model", "ma-agiqa-offline-quality-stats", "--data-root", str(root), "--cache-dir", str(tmp_path / "cache")]
    test = evaluate.evaluate(evaluate.parse_args(common + ["--split", "test", "--split-file", str(tmp_path / "split.csv")]))
    assert test["n"] == 3 and set(test["predictions"]) == set(image_ids[9:])
    val = evaluate.evaluate(evaluate.parse_args(common + ["--split", "val", "--split-file", str(tmp_path / "split.csv")]))
    assert set(val["predictions"]) == set(image_ids[6:9])
    # the label file alone has no test rows: val and test both mean its val rows, as before
    labels = evaluate.evaluate(evaluate.parse_args(common + ["--split", "test"]))
    assert set(labels["predictions"]) == set(image_ids[8:])


# -- jobs.train: the reference split, a test part reported, config fields set -------------------------------
def test_train_reports_the_reference_splits_test_part(small_dataset, tmp_path):
    from jobs import evaluate, train

    root, image_ids = small_dataset
    out, cache = tmp_path / "run", tmp_path / "cache"
    assert train.main(["--data-root", str(root), "--model", "ma-agiqa-offline-quality-stats", "--output", str(out),
                       "--split", "reference", "--epochs", "1", "--cache-dir", str(cache),
                       "--set", "quality.stage_conv=true", "--set", "quality.views.antialias=false",
                       "--set", "moe.gate=linear"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["split"], metrics["n_train"], metrics["n_val"], metrics["n_test"]) == ("reference", 8, 1, 3)
    parts = pd.read_csv(out / "split.csv")
    expected = reference_split(pd.DataFrame({"image_id": image_ids}).assign(split=None))
    assert {name: set(parts[parts["split"] == name]["image_id"]) for name in ("train", "val", "test")} == {
        name: ids(p) for name, p in zip(("train", "val", "test"), expected)}
    saved = json.loads((out / "config.json").read_text())
    assert saved["quality"]["stage_conv"] is True and saved["quality"]["views"]["antialias"] is False
    assert saved["moe"]["gate"] == "linear" and saved["quality"]["tab_layout"] == "clean"
    # the test part, scored again from the checkpoint and the run's split.csv
    again = evaluate.evaluate(evaluate.parse_args(["--model", str(out), "--data-root", str(root), "--split", "test",
                                                   "--split-file", str(out / "split.csv"), "--cache-dir", str(cache)]))
    assert again["n"] == metrics["test"]["n"] == 3
    assert again["rmse"] == pytest.approx(metrics["test"]["rmse"], rel=1e-5)


def test_set_builds_on_the_registry_recipe_not_on_what_ships_under_the_name(monkeypatch, tmp_path):
    """A registered name trains the registry's recipe from scratch, --set or not: a checkpoint shipped under the
    name before the recipe changed (its config another) must not slip its config into a --set run."""
    import argparse

    from ma_agiqa import checkpoint, get_config
    from ma_agiqa.training.runs import config_overrides

    registry = get_config("tiny-random")
    stale = registry.to_dict()
    stale["moe"]["dropout"], stale["ensemble"] = 0.3, {"probe": True, "probe_weight": 0.6}
    (tmp_path / "shipped").mkdir()
    (tmp_path / "shipped" / "config.json").write_text(json.dumps(stale))
    monkeypatch.setattr(checkpoint, "shipped_checkpoint", lambda name: tmp_path / "shipped" if name == "tiny-random" else None)
    assert checkpoint.load_config("tiny-random").moe.dropout == 0.3  # what a scoring run of the name loads
    args = argparse.Namespace(model="tiny-random", backbone="config", set=["moe.gate=linear"], trainable_stages=None)
    moe = config_overrides(args)["moe"]
    assert moe.gate == "linear" and moe.dropout == registry.moe.dropout
    args.set = ["ensemble.heads=1"]
    assert config_overrides(args).get("ensemble", registry.ensemble) == registry.ensemble


def test_train_fine_tunes_a_checkpoint_directory_with_set(small_dataset, tmp_path, capsys):
    """--set on a checkpoint directory fine-tunes that checkpoint with the change (its weights, not a fresh
    start); a change its tensors do not fit is one line, exit 2."""
    from safetensors.torch import load_file

    from jobs import train

    root, _ = small_dataset
    common = ["--data-root", str(root), "--epochs", "1", "--cache-dir", str(tmp_path / "cache")]
    first = tmp_path / "first"
    assert train.main(common + ["--model", "ma-agiqa-offline-quality-stats", "--output", str(first)]) == 0
    again = tmp_path / "again"
    assert train.main(common + ["--model", str(first), "--output", str(again), "--set", "moe.dropout=0.2", "--lr", "0"]) == 0
    assert json.loads((again / "config.json").read_text())["moe"]["dropout"] == 0.2
    before, after = load_file(str(first / "model.safetensors")), load_file(str(again / "model.safetensors"))
    learnt = [k for k in before if "running_" not in k and "num_batches" not in k]  # BatchNorm's statistics move at lr 0
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in learnt)  # lr 0: as loaded
    refused(train.main, common + ["--model", str(first), "--output", str(tmp_path / "x"), "--set", "moe.width=64"],
            capsys, "does not fit with moe changed.*another shape")
    # stages made trainable: the file has none of the backbone, so they come from its source, the heads from the file
    from ma_agiqa import create_model
    from ma_agiqa.checkpoint import load_config, shipped_checkpoint

    q = load_config(str(first)).quality
    staged = create_model(str(first), with_semantic=False, quality=dataclasses.replace(q, trainable_stages=1))
    assert staged.cfg.quality.trainable_stages == 1
    assert all(torch.equal(v, before[k]) for k, v in staged.trainable_state_dict().items() if k in learnt)
    # an ensemble checkpoint is not one model to fine-tune: one line, before any data is read
    ensemble = shipped_checkpoint("ma-agiqa-offline-quality")
    refused(train.main, common + ["--model", str(ensemble), "--output", str(tmp_path / "y")], capsys,
            "is an ensemble checkpoint .*head-K runs")
    assert not (tmp_path / "y").exists()


def test_train_set_rejects_unknown_fields(small_dataset, tmp_path, capsys):
    from jobs import train

    root, _ = small_dataset
    for bad, message in (("quality.no_such=1", "no field 'no_such'"), ("train.lr=1", "expected quality"),
                         ("quality.stage_conv", "expected quality")):
        refused(train.main, ["--data-root", str(root), "--model", "ma-agiqa-offline-quality-stats", "--output", str(tmp_path / "x"), "--set", bad], capsys, message)
    refused(train.main, ["--data-root", str(root), "--model", "ma-agiqa-offline-quality-stats", "--output", str(tmp_path / "x"), "--split", "reference", "--test-fraction", "0.2"], capsys, "--test-fraction applies")
