"""jobs.train as long runs need it: a killed run continues to the result an uninterrupted one gives, a finished
run is not trained again, and leave-one-generator-out splits hold each generator out whole."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import refused

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "samples" / "agiqa3k"


def tiny_inputs(cfg, n: int, seed: int):
    from ma_agiqa.training import Inputs

    rng = np.random.default_rng(seed)
    s = cfg.quality.views.size
    return Inputs(
        mos=rng.normal(3, 1, n).astype(np.float32),
        pixels=rng.integers(0, 256, (n, 1, 3, s, s), dtype=np.uint8),
        semantic={p: rng.normal(size=(n, cfg.semantic.hidden_size)).astype(np.float32) for p in cfg.semantic.prompts},
    )


def fresh_model(epochs: int = 3):
    from ma_agiqa import create_model

    torch.manual_seed(0)
    model = create_model("tiny-random", with_semantic=False, shipped=False)
    t = model.cfg.train
    t.epochs, t.batch_size, t.lr, t.scheduler, t.warmup_epochs = epochs, 4, 1e-3, "cosine-epoch", 1.0
    return model


def without_time(history) -> str:
    """The history as text without the epochs' durations (text: a NaN figure equals itself)."""
    return json.dumps([{k: v for k, v in row.items() if k != "seconds"} for row in history])


def test_a_stopped_training_resumes_to_the_uninterrupted_result(tmp_path):
    """Augmentation, dropout, warm-up and the cosine all draw on state that a resume must restore: the
    resumed run's history and weights equal the uninterrupted run's exactly."""
    from ma_agiqa.training import predict, train

    cfg = fresh_model().cfg
    train_in, val_in = tiny_inputs(cfg, 10, 1), tiny_inputs(cfg, 6, 2)
    whole = fresh_model()
    whole_result = train(whole, train_in, val_in, log=lambda _: None)

    state = tmp_path / "train_state.pt"
    first = fresh_model()
    part = train(first, train_in, val_in, log=lambda _: None, state_path=state, stop_after=1)
    assert not part["finished"] and len(part["history"]) == 1 and state.exists()
    lines = []
    resumed = fresh_model()  # a new process would start from the initial weights, as this one does
    result = train(resumed, train_in, val_in, log=lines.append, state_path=state)
    assert lines[0].startswith("resuming") and "after epoch 1 of 3" in lines[0]
    assert result["finished"] and result["best_epoch"] == whole_result["best_epoch"]
    assert without_time(result["history"]) == without_time(whole_result["history"])
    np.testing.assert_array_equal(predict(resumed, val_in), predict(whole, val_in))


def test_a_state_from_other_settings_is_refused(tmp_path):
    from ma_agiqa.training import train

    cfg = fresh_model().cfg
    train_in, val_in = tiny_inputs(cfg, 8, 1), tiny_inputs(cfg, 4, 2)
    state = tmp_path / "train_state.pt"
    train(fresh_model(), train_in, val_in, log=lambda _: None, state_path=state, stop_after=1)
    other = fresh_model()
    other.cfg.train.lr = 2e-3
    with pytest.raises(ValueError, match="another training run"):
        train(other, train_in, val_in, log=lambda _: None, state_path=state)
    with pytest.raises(ValueError, match="another training run"):  # other data: another split's targets
        train(fresh_model(), tiny_inputs(cfg, 8, 3), val_in, log=lambda _: None, state_path=state)


@pytest.fixture
def three_generators(tmp_path):
    """12 real AGIQA-3K images of three generators, with their published labels, in the dataset's layout."""
    labels = pd.read_csv(SAMPLE / "labels.csv")
    labels = labels[labels["name"].str.match(r"(AttnGAN|DALLE2|glide)_normal_")].reset_index(drop=True)
    assert len(labels) == 12
    root = tmp_path / "agiqa3k"
    (root / "images").mkdir(parents=True)
    for name in labels["name"]:
        (root / "images" / name).symlink_to(SAMPLE / "images" / name)
    labels.to_csv(root / "labels.csv", index=False)
    return root


def train_cmd(root: Path, output: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "jobs.train", "--data-root", str(root), "--model", "ma-agiqa-offline-quality-stats",
            "--output", str(output), "--cache-dir", str(cache), "--split-seed", "1", "--batch-size", "2",
            "--no-progress", *extra]


def test_a_killed_job_continues_and_a_finished_one_is_not_trained_again(three_generators, tmp_path):
    root, cache = three_generators, tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    whole = tmp_path / "whole"
    subprocess.run(train_cmd(root, whole, cache, "--epochs", "8"), check=True, cwd=REPO, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(root, killed, cache, "--epochs", "8"), cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = killed / "train_state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not (killed / "metrics.json").exists(), "the run ended before it could be killed"
    done_before = len((killed / "train.log").read_text().splitlines())
    assert 1 <= done_before < 8

    again = subprocess.run(train_cmd(root, killed, cache, "--epochs", "8"), cwd=REPO, env=env, capture_output=True,
                           text=True, check=True)
    assert f"resuming from {state} after epoch {done_before} of 8" in again.stdout
    assert not state.exists()  # finished: the state is gone, the checkpoint and metrics stay
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (whole, killed))
    assert without_time(a["history"]) == without_time(b["history"]) and a["test"] == b["test"]
    log = [json.loads(line) for line in (killed / "train.log").read_text().splitlines() if line.startswith("{")]
    assert [row["epoch"] for row in log] == list(range(1, 9))

    weights = killed / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    rerun = subprocess.run(train_cmd(root, killed, cache, "--epochs", "8"), cwd=REPO, env=env, capture_output=True,
                           text=True, check=True)
    assert "trained already" in rerun.stderr and weights.stat().st_mtime_ns == stamp


def test_each_generator_is_held_out_whole_and_scored_again_by_evaluate(three_generators, tmp_path, capsys):
    from jobs import evaluate, train

    root, out, cache = three_generators, tmp_path / "logo", tmp_path / "cache"
    common = ["--data-root", str(root), "--model", "ma-agiqa-offline-quality-stats", "--cache-dir", str(cache),
              "--epochs", "1", "--batch-size", "4", "--val-fraction", "0.25", "--no-progress"]
    # One of the runs made beforehand by --test-generator into its folder (as another process's share of the
    # work would be): --each-generator takes it as it is.
    first = out / "generator-AttnGAN_normal"
    assert train.main(common + ["--output", str(first), "--test-generator", "AttnGAN_normal"]) == 0
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert train.main(common + ["--output", str(out), "--each-generator"]) == 0
    assert capsys.readouterr().err.count("trained already") == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    summary = json.loads((out / "metrics.json").read_text())
    assert set(summary["by_generator"]) == {"AttnGAN_normal", "DALLE2_normal", "glide_normal"}
    assert set(summary["summary"]) >= {"test_srcc", "test_plcc"}
    for g, row in summary["by_generator"].items():
        run = out / f"generator-{g}"
        parts = pd.read_csv(run / "split.csv")
        generator = parts["image_id"].str.rsplit("_", n=1).str[0]
        assert set(generator[parts["split"] == "test"]) == {g} and (parts["split"] == "test").sum() == 4
        assert g not in set(generator[parts["split"] != "test"])
        assert (parts["split"] == "val").sum() == 2
        assert row["test_n"] == 4
        again = evaluate.evaluate(evaluate.parse_args(["--model", str(run), "--data-root", str(root), "--split", "test",
                                                       "--split-file", str(run / "split.csv"), "--cache-dir", str(cache)]))
        assert again["rmse"] == pytest.approx(row["test_rmse"], rel=1e-5)
    refused(train.main, common + ["--output", str(tmp_path / "x"), "--test-generator", "sdxl"], capsys, "no such generator")
    refused(train.main, common + ["--output", str(tmp_path / "z"), "--test-generator", "glide_normal", "--split", "reference"], capsys, "make their own split")
    refused(train.main, common + ["--output", str(tmp_path / "y"), "--each-generator", "--repeats", "2"], capsys, "use one of them")


def test_bfloat16_training_runs_under_autocast_and_keeps_float32_weights(tmp_path):
    """``precision="bfloat16"`` changes the training forward, not what is kept: the run differs from the
    float32 one (so autocast took effect) but starts near it, the weights stay float32, and it resumes exactly."""
    from ma_agiqa.training import predict, train

    cfg = fresh_model().cfg
    train_in, val_in = tiny_inputs(cfg, 10, 1), tiny_inputs(cfg, 6, 2)
    fp32 = fresh_model()
    fp32_result = train(fp32, train_in, val_in, log=lambda _: None)

    def bf16_model():
        model = fresh_model()
        model.cfg.train.precision = "bfloat16"
        return model

    whole = bf16_model()
    whole_result = train(whole, train_in, val_in, log=lambda _: None)
    losses = np.array([[h["loss"] for h in r["history"]] for r in (fp32_result, whole_result)])
    assert np.isfinite(losses).all()
    assert not np.array_equal(losses[0], losses[1])
    # the first epoch only: on ten random images the two runs' later epochs drift apart, as any rounding would
    np.testing.assert_allclose(losses[1, 0], losses[0, 0], rtol=0.01)
    assert all(p.dtype == torch.float32 for p in whole.parameters())
    assert "precision" in whole.cfg.to_dict()["train"] and "precision" not in fp32.cfg.to_dict()["train"]

    state = tmp_path / "train_state.pt"
    part = train(bf16_model(), train_in, val_in, log=lambda _: None, state_path=state, stop_after=1)
    assert len(part["history"]) == 1
    resumed = bf16_model()
    resumed_result = train(resumed, train_in, val_in, log=lambda _: None, state_path=state)
    assert without_time(resumed_result["history"]) == without_time(whole_result["history"])
    np.testing.assert_array_equal(predict(resumed, val_in), predict(whole, val_in))


def test_an_unknown_precision_is_refused():
    from ma_agiqa.config import TrainConfig

    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="float16")
    t = TrainConfig()
    t.precision = "fp16"  # as jobs.train sets fields after construction: train() checks again
    with pytest.raises(ValueError, match="precision"):
        t.check()


def test_epochs_below_one_are_refused_and_a_zero_rate_is_used_as_given(three_generators, tmp_path):
    """Options whose zero means zero: --epochs 0 is refused (nothing would be trained or chosen), --lr 0 is
    a rate like any other (the weights do not move), never the config's default."""
    from safetensors.torch import load_file

    from ma_agiqa import create_model

    root, cache = three_generators, tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run(train_cmd(root, tmp_path / "none", cache, "--epochs", "0"), cwd=REPO, env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "--epochs: must be >= 1, got 0" in refused.stderr
    assert not (tmp_path / "none").exists()

    out = tmp_path / "still"
    subprocess.run(train_cmd(root, out, cache, "--epochs", "1", "--lr", "0"), check=True, cwd=REPO, env=env,
                   capture_output=True)
    assert json.loads((out / "train_config.json").read_text())["train"]["lr"] == 0.0
    torch.manual_seed(0)  # as jobs.train seeds before building the model
    initial = dict(create_model("ma-agiqa-offline-quality-stats", with_semantic=False, shipped=False).named_parameters())
    saved = load_file(str(out / "model.safetensors"))
    trained = [k for k, p in initial.items() if p.requires_grad]
    assert trained and all(torch.equal(saved[k], initial[k].detach()) for k in trained)


def test_split_all_trains_on_every_labelled_image_and_keeps_the_last_epoch(three_generators, tmp_path, capsys):
    """The shipped weights' run (--split all): no val part to choose an epoch, so the last of --epochs is kept,
    and a stopped run resumes to it as a run with val does."""
    from jobs import train
    from ma_agiqa.training import predict
    from ma_agiqa.training import train as train_model

    root, out = three_generators, tmp_path / "all"
    common = ["--data-root", str(root), "--model", "ma-agiqa-offline-quality-stats", "--cache-dir", str(tmp_path / "cache"),
              "--batch-size", "4", "--no-progress"]
    assert train.main(common + ["--output", str(out), "--split", "all", "--epochs", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["split"], metrics["n_train"], metrics["n_val"], metrics["n_test"]) == ("all", 12, 0, 0)
    assert metrics["best_epoch"] == 3 and [h["epoch"] for h in metrics["history"]] == [1, 2, 3]
    assert all(h["val_srcc"] is None for h in metrics["history"]) and metrics["test"] is None
    assert set(pd.read_csv(out / "split.csv")["split"]) == {"train"}
    from jobs import evaluate

    ev = evaluate.evaluate(evaluate.parse_args(["--model", str(out), "--data-root", str(root), "--split", "all",
                                                "--cache-dir", str(tmp_path / "cache")]))
    assert ev["n"] == 12 and ev["played_a_role"] == {"trained": 12, "chose_the_epoch": 0}  # says it is no held-out figure
    for extra, refusal in ((["--repeats", "2"], "one split"), (["--split-seed", "3"], "one split")):
        refused(train.main, common + ["--output", str(tmp_path / "x"), "--split", "all", *extra], capsys, refusal)

    cfg = fresh_model().cfg
    train_in, probe = tiny_inputs(cfg, 10, 1), tiny_inputs(cfg, 6, 2)
    whole = fresh_model()
    result = train_model(whole, train_in, None, log=lambda _: None)
    assert result["best_epoch"] == 3  # the last, not the best by anything
    state = tmp_path / "train_state.pt"
    train_model(fresh_model(), train_in, None, log=lambda _: None, state_path=state, stop_after=2)
    resumed = fresh_model()
    again = train_model(resumed, train_in, None, log=lambda _: None, state_path=state)
    assert again["finished"] and without_time(again["history"]) == without_time(result["history"])
    np.testing.assert_array_equal(predict(resumed, probe), predict(whole, probe))


def test_an_ensemble_config_trains_its_heads_and_probe_in_one_command(three_generators, tmp_path, capsys):
    """--set ensemble.heads=2 --set ensemble.probe=true: two heads of seeds S and S + 1 (each a run of its own,
    the first the plain run), the probe fitted on the train rows, one checkpoint that from_pretrained loads and
    whose val figure is the assembled model's."""
    from jobs import ensemble as ensemble_job
    from jobs import evaluate, train
    from ma_agiqa import from_pretrained
    from ma_agiqa.training import predict

    root, cache = three_generators, tmp_path / "cache"
    common = ["--data-root", str(root), "--model", "ma-agiqa-offline-quality-stats", "--cache-dir", str(cache),
              "--batch-size", "4", "--epochs", "2", "--split-seed", "1", "--val-fraction", "0.34", "--no-progress"]
    out = tmp_path / "k2"
    assert train.main(common + ["--output", str(out), "--set", "ensemble.heads=2", "--set", "ensemble.probe=true"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    model = from_pretrained(out, with_semantic=False)
    assert (model.cfg.ensemble.heads, model.cfg.ensemble.probe) == (2, True)
    assert [h["seed"] for h in metrics["heads"]] == [20, 21] and metrics["probe_alpha"] is not None
    plain = tmp_path / "plain"
    assert train.main(common + ["--output", str(plain)]) == 0
    from ma_agiqa.training import Inputs

    size = model.cfg.quality.views.size  # head 0 is the plain run (to rounding: one of the two computed the maps)
    probe = Inputs(mos=np.zeros(3, np.float32),
                   pixels=np.random.default_rng(3).integers(0, 256, (3, 1, 3, size, size), dtype=np.uint8))
    np.testing.assert_allclose(predict(from_pretrained(out / "head-0", with_semantic=False), probe),
                               predict(from_pretrained(plain, with_semantic=False), probe), atol=1e-4)
    # the same as assembling the two runs by hand, with the strength the run chose
    by_hand = tmp_path / "by-hand"
    ensemble_job.run(ensemble_job.parse_args(["--member", str(out / "head-0"), "--member", str(out / "head-1"), "--probe",
                                              "--probe-alpha", str(metrics["probe_alpha"]), "--data-root", str(root),
                                              "--split-file", str(out / "split.csv"), "--cache-dir", str(cache),
                                              "--output", str(by_hand)]))
    assert from_pretrained(by_hand, with_semantic=False).model_id.split("@")[1] == model.model_id.split("@")[1]
    ev = evaluate.evaluate(evaluate.parse_args(["--model", str(out), "--data-root", str(root), "--split", "val",
                                                "--split-file", str(out / "split.csv"), "--cache-dir", str(cache)]))
    assert ev["srcc"] == pytest.approx(metrics["best"]["val_srcc"], abs=1e-6)
    assert json.loads((out / "train_config.json").read_text())["train"]["epochs"] == 2  # the heads' settings
    # K grown in place: the two finished heads are reused, only the third trains
    capsys.readouterr()
    assert train.main(common + ["--output", str(out), "--set", "ensemble.heads=3", "--set", "ensemble.probe=true"]) == 0
    reused = capsys.readouterr().err
    assert f"{out / 'head-0'}: trained already" in reused and f"{out / 'head-1'}: trained already" in reused
    assert f"{out / 'head-2'}: trained already" not in reused
    assert [h["seed"] for h in json.loads((out / "metrics.json").read_text())["heads"]] == [20, 21, 22]
    assert from_pretrained(out, with_semantic=False).cfg.ensemble.heads == 3
    # cheap checks first: refused before any head trains
    for extra, refusal in ((["--split", "all"], "give --probe-alpha"), (["--backbone", "trainable"], "frozen backbone")):
        refused(train.main, [a for a in common if a not in ("--split-seed", "1", "--val-fraction", "0.34")] + extra + ["--output", str(tmp_path / "x"), "--set", "ensemble.probe=true"], capsys, refusal)
        assert not (tmp_path / "x").exists()
