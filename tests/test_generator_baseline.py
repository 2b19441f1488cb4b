"""benchmarks/generator_baseline.py's metadata baselines on frames whose answer is known: a prompt's prediction
is its training images' mean, and leaving a generator out never reads that generator's MOS."""
import sys

import numpy as np
import pandas as pd
import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from generator_baseline import each_generator, mean_prediction  # noqa: E402


def frame(held_out_mos):
    # five alike images per generator and prompt: the val part leave-one-generator-out draws from A and B (10 %)
    # moves no prompt's mean far enough to change C's ranking
    rows = 5 * [("A", "p1", 1.0), ("A", "p2", 3.0), ("A", "p3", 2.0), ("B", "p1", 2.0), ("B", "p2", 4.0), ("B", "p3", 0.0)]
    rows += [("C", p, m) for p, m in zip(["p1", "p2", "p3", "p4"], held_out_mos)]
    return pd.DataFrame(rows, columns=["generator", "prompt", "mos"])


def test_a_prompt_is_predicted_by_its_training_images_whatever_the_held_out_scores():
    for held_out in ([0.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]):
        df = frame(held_out)
        train, test = df[df["generator"] != "C"], df[df["generator"] == "C"]
        # p1..p3: the mean of A's and B's image; p4, which no training image has: the training mean
        np.testing.assert_allclose(mean_prediction(train, test, "prompt"), [1.5, 3.5, 1.0, 2.0])


def test_leaving_a_generator_out_ranks_it_by_the_other_generators_prompts():
    # predictions for C: p3 1.0 < p1 1.5 < p4 2.0 < p2 3.5
    assert each_generator(frame([2.0, 4.0, 1.0, 3.0]), "prompt")["C"]["srcc"] == pytest.approx(1.0)
    assert each_generator(frame([3.0, 1.0, 4.0, 2.0]), "prompt")["C"]["srcc"] == pytest.approx(-1.0)
    # a generator's own mean predicts every one of its images alike: no ranking, said rather than a NaN
    by_generator = each_generator(frame([2.0, 4.0, 1.0, 3.0]), "generator")
    assert by_generator["C"] == {"n": 4, "ranks": False} and "median" not in by_generator
