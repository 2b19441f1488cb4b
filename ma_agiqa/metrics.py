"""IQA metrics, in one place: SRCC, PLCC after the standard 4-parameter logistic fit, KRCC, RMSE.

PLCC and RMSE are computed after mapping predictions to the MOS scale with the logistic
f(x) = (b1 - b2) / (1 + exp(-(x - b3) / b4)) + b2 (VQEG), fitted by trust-region least squares
(Levenberg-Marquardt stalls on this curve from the usual starting point), as IQA papers report them.
"""
from __future__ import annotations

import warnings

import numpy as np
from scipy import optimize, stats


def logistic4(x, b1, b2, b3, b4):
    with np.errstate(over="ignore"):
        return (b1 - b2) / (1.0 + np.exp(-(x - b3) / b4)) + b2


def fit_logistic(pred: np.ndarray, mos: np.ndarray) -> np.ndarray:
    """Predictions mapped onto the MOS scale; the identity if the fit fails."""
    p0 = [mos.max(), mos.min(), float(np.mean(pred)), float(np.std(pred)) or 1.0]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            params, _ = optimize.curve_fit(logistic4, pred, mos, p0=p0, maxfev=20000, method="trf")
        return logistic4(pred, *params)
    except (RuntimeError, ValueError):
        return pred


def iqa_metrics(pred, mos) -> dict:
    """{srcc, plcc, krcc, rmse, n} of predictions against MOS (NaN predictions are an error, not skipped)."""
    pred = np.asarray(pred, dtype=np.float64)
    mos = np.asarray(mos, dtype=np.float64)
    if pred.shape != mos.shape or pred.ndim != 1:
        raise ValueError(f"pred {pred.shape} and mos {mos.shape} must be 1-D and of one length")
    if not np.isfinite(pred).all():
        raise ValueError("predictions contain NaN or inf")
    n = len(pred)
    if n < 3:
        return {"srcc": float("nan"), "plcc": float("nan"), "krcc": float("nan"), "rmse": float("nan"), "n": n}
    mapped = fit_logistic(pred, mos)
    return {
        "srcc": float(stats.spearmanr(pred, mos)[0]),
        "plcc": float(stats.pearsonr(mapped, mos)[0]),
        "krcc": float(stats.kendalltau(pred, mos)[0]),
        "rmse": float(np.sqrt(np.mean((mapped - mos) ** 2))),
        "n": n,
    }
