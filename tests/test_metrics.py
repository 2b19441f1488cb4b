import numpy as np
import pytest
from scipy import stats

from ma_agiqa.metrics import fit_logistic, iqa_metrics, logistic4


def test_rank_metrics_match_scipy():
    rng = np.random.default_rng(0)
    mos = rng.uniform(1, 5, 200)
    pred = mos + rng.normal(0, 0.8, 200)
    m = iqa_metrics(pred, mos)
    assert m["srcc"] == pytest.approx(stats.spearmanr(pred, mos)[0])
    assert m["krcc"] == pytest.approx(stats.kendalltau(pred, mos)[0])
    assert m["n"] == 200
    # the logistic fit can only help a linear correlation
    assert m["plcc"] >= stats.pearsonr(pred, mos)[0] - 1e-9


def test_logistic_fit_linearises_a_monotonic_nonlinear_predictor():
    pred = np.linspace(-3, 3, 100)
    mos = logistic4(pred, 5.0, 1.0, 0.3, 0.7)  # MOS a logistic of the prediction: rank-perfect, not linear
    assert stats.pearsonr(pred, mos)[0] < 0.99
    m = iqa_metrics(pred, mos)
    assert m["srcc"] == pytest.approx(1.0) and m["krcc"] == pytest.approx(1.0)
    assert m["plcc"] > 0.9999 and m["rmse"] < 0.01
    np.testing.assert_allclose(fit_logistic(pred, mos), mos, atol=0.01)


def test_known_small_case():
    m = iqa_metrics([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert m["srcc"] == pytest.approx(-1.0) and m["krcc"] == pytest.approx(-1.0)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        iqa_metrics([1.0, float("nan"), 2.0], [1, 2, 3])
    with pytest.raises(ValueError, match="one length"):
        iqa_metrics([1, 2, 3], [1, 2])
    assert np.isnan(iqa_metrics([1, 2], [1, 2])["srcc"])
