"""The training loss's batch-level terms (--plcc-loss, --rank-loss): what each adds, and where they are refused."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ma_agiqa.config import TrainConfig
from ma_agiqa.training import training_loss

REPO = Path(__file__).resolve().parents[1]
MOS = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])


def loss(pred, plcc=0.0, rank=0.0, mos=MOS, std=2.0):
    return training_loss(pred, mos, std, len(mos), TrainConfig(plcc_loss=plcc, rank_loss=rank)).item()


def test_without_terms_the_loss_is_the_mse_on_normalised_mos():
    pred = torch.tensor([1.5, 2.0, 2.0, 5.0, 4.0])
    assert loss(pred) == pytest.approx((((pred - MOS) / 2.0) ** 2).mean().item(), rel=1e-6)


def test_the_plcc_term_is_zero_for_an_affine_prediction_and_two_for_a_reversed_one():
    mse = lambda p: loss(p)  # noqa: E731
    affine = 0.5 * MOS + 1.0
    assert loss(affine, plcc=1.0) - mse(affine) == pytest.approx(0.0, abs=1e-6)
    reversed_ = MOS.flip(0)
    assert loss(reversed_, plcc=3.0) - mse(reversed_) == pytest.approx(6.0, abs=1e-5)


def test_the_rank_term_rewards_the_right_order_and_ignores_ties():
    right, wrong = MOS * 10, MOS.flip(0) * 10  # far apart: the logistic loss saturates
    assert loss(right, rank=1.0) - loss(right) < 0.01
    assert loss(wrong, rank=1.0) - loss(wrong) == pytest.approx(10.0, abs=0.01)  # mean |diff| / std over pairs
    tied = torch.full((4,), 3.0)
    pred = torch.tensor([0.0, 9.0, -4.0, 2.0])
    assert loss(pred, rank=5.0, mos=tied) == pytest.approx(loss(pred, mos=tied), rel=1e-6)


def test_the_terms_have_gradients_that_fix_the_order():
    pred = MOS.flip(0).clone().requires_grad_(True)
    training_loss(pred, MOS, 1.0, len(MOS), TrainConfig(plcc_loss=1.0, rank_loss=1.0)).backward()
    # the lowest-MOS image is predicted highest: descent lowers its score and raises the highest-MOS one's
    assert pred.grad[0] > 0 and pred.grad[-1] < 0


def test_a_batch_predicted_alike_gets_a_gradient_of_the_mse_size():
    """PLCC is undefined for constant predictions and its gradient grows as their spread shrinks."""
    for pred in (torch.zeros(4), torch.full((4,), 2.5) + torch.tensor([0.0, 1e-7, 0.0, -1e-7])):
        pred.requires_grad_(True)
        training_loss(pred, MOS[:4], 1.0, 4, TrainConfig(plcc_loss=1.0, rank_loss=1.0)).backward()
        assert torch.isfinite(pred.grad).all() and pred.grad.abs().max() < 10


@pytest.mark.parametrize("args, message", [
    (["--rank-loss", "-1"], "must be >= 0"),
    (["--plcc-loss", "nan"], "must be >= 0"),
    (["--plcc-loss", "1", "--workers", "2"], "train them in one process (--workers 1)"),
    (["--model", "ma-agiqa-offline-quality-stats", "--workers", "2"], "train it in one process (--workers 1)"),
])
def test_jobs_train_refuses_bad_loss_settings_before_reading_data(tmp_path, args, message):
    run = subprocess.run([sys.executable, "-m", "jobs.train", "--data-root", str(tmp_path / "none"), "--model", "tiny-random", "--output",
                          str(tmp_path / "out"), *args], cwd=REPO, capture_output=True, text=True)  # a later --model wins
    assert run.returncode != 0 and message in run.stderr
    assert not (tmp_path / "out").exists()


def test_a_negative_weight_is_refused_by_the_config_and_by_train():
    from ma_agiqa import create_model
    from ma_agiqa.training import Inputs, train

    with pytest.raises(ValueError, match="loss weights"):
        TrainConfig(rank_loss=-0.5)
    model = create_model("tiny-random", with_semantic=False, shipped=False)
    model.cfg.train.plcc_loss = -1.0  # set after construction, as jobs.train sets fields
    with pytest.raises(ValueError, match="loss weights"):
        train(model, Inputs(mos=MOS.numpy()), Inputs(mos=MOS.numpy()), log=lambda _: None)


def test_a_training_state_of_another_loss_is_not_resumed():
    from ma_agiqa import create_model
    from ma_agiqa.training import Inputs, run_key

    model = create_model("tiny-random", with_semantic=False, shipped=False)
    data = Inputs(mos=MOS.numpy())
    plain = run_key(model, data, data)
    model.cfg.train.rank_loss = 1.0
    ranked = run_key(model, data, data)
    model.cfg.train.rank_loss, model.cfg.train.plcc_loss = 0.0, 0.5
    assert len({plain, ranked, run_key(model, data, data)}) == 3
    model.cfg.train.plcc_loss = 0.0
    assert run_key(model, data, data) == plain
