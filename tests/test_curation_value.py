"""benchmarks/curation_value.py's figures on scores whose answer is known: a perfect ranking is the oracle, a
reversed one keeps the worst images, and the per-prompt pick reads each prompt's images only."""
import sys

import numpy as np
import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from curation_value import curation_value  # noqa: E402


def test_a_perfect_ranking_is_the_oracle_and_a_reversed_one_keeps_the_bottom():
    mos = np.random.default_rng(0).normal(size=40)
    perfect = curation_value(mos * 3 + 1, mos)  # any increasing map of MOS ranks alike
    for f in ("top_10%", "top_30%", "top_50%"):
        assert perfect[f]["oracle_overlap"] == 1.0 and perfect[f]["bottom_quartile_survivors"] == 0.0
        assert perfect[f]["gain_captured"] == pytest.approx(1.0)
    worst = curation_value(-mos, mos)["top_30%"]
    assert worst["oracle_overlap"] == 0.0 and worst["gain_captured"] < 0
    assert worst["bottom_quartile_survivors"] == 1.0  # 12 kept cover the 10 of the bottom quartile


def test_the_top_scored_image_of_a_prompt_is_judged_within_its_prompt():
    mos = np.array([1.0, 2.0, 3.0, 0.0, 5.0])
    score = np.array([0.0, 9.0, 1.0, 8.0, 7.0])  # a: picks 2.0 over 3.0 (miss); b: picks 0.0 over 5.0 (miss)
    prompts = np.array(["a", "a", "a", "b", "b"])
    out = curation_value(score, mos, prompts)["per_prompt"]
    assert out["prompts"] == 2 and out["top_scored_is_best"] == 0.0
    fixed = curation_value(np.array([0.0, 1.0, 9.0, 0.0, 7.0]), mos, prompts)["per_prompt"]
    assert fixed["top_scored_is_best"] == 1.0
    assert fixed["random_pick_is_best"] == pytest.approx((1 / 3 + 1 / 2) / 2, abs=1e-4)
    single = curation_value(score[:1], mos[:1], prompts[:1])["per_prompt"]
    assert single["prompts"] == 0  # one image: no choice to make
