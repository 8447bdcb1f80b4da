"""Faithfulness to the papers and the authors' code (issue 11): metrics, strengths, the
scoring pass, parameter counts, KeepLoRA's basis, DAC's loss and setting, CC beside the rest."""

import math

import numpy as np
import pytest

from lorsu_demo.evaluate import AccuracyMatrix


def mtil_metrics(acc: list[list[float]]) -> dict[str, float]:
    """MTIL's definition, written out loop by loop: acc[j][i] is set i (in training order) after
    session j+1; Transfer of set i >= 1 is its mean over the sessions before it."""
    sessions, sets = len(acc), len(acc[0])
    avg = [sum(acc[j][i] for j in range(sessions)) / sessions for i in range(sets)]
    transfer = [sum(acc[j][i] for j in range(i)) / i for i in range(1, sets)]
    return {
        "avg": sum(avg) / sets,
        "last": sum(acc[-1]) / sets,
        "transfer": sum(transfer) / len(transfer),
    }


def test_matrix_figures_follow_mtil_on_a_hand_made_matrix():
    # Four sessions; the sets' columns are not in training order, and a control is never
    # trained. Row 0 is the base model, which MTIL's figures do not use.
    sets = ["c", "a", "control", "d", "b"]
    trained_at = {"a": 1, "b": 2, "c": 3, "d": 4}
    rows = [
        [30.0, 20.0, 90.0, 10.0, 40.0],  # base
        [31.0, 70.0, 88.0, 12.0, 45.0],  # after session 1 (a)
        [35.0, 60.0, 85.0, 15.0, 80.0],  # after session 2 (b)
        [75.0, 55.0, 86.0, 14.0, 70.0],  # after session 3 (c)
        [65.0, 50.0, 80.0, 66.0, 72.0],  # after session 4 (d)
    ]
    matrix = AccuracyMatrix(sets, rows, trained_at)
    order = sorted(trained_at, key=trained_at.get)
    in_order = [[row[sets.index(s)] for s in order] for row in rows[1:]]
    expected = mtil_metrics(in_order)
    summary = matrix.summary()
    for key in ("avg", "last", "transfer"):
        assert summary[key] == pytest.approx(expected[key]), key
    # The old figures (with the base row, Transfer from the first set) differ here.
    with_base = np.array([[row[sets.index(s)] for s in order] for row in rows])
    assert not math.isclose(summary["avg"], float(with_base.mean()))
    # Forgetting counts only the rows from a set's training on: b was 45 before training,
    # 80 after it, 72 now; a control counts every row.
    forgetting = matrix.forgetting()
    assert forgetting["b"] == pytest.approx(80 - 72)
    assert forgetting["a"] == pytest.approx(70 - 50)
    assert forgetting["d"] == 0.0
    assert forgetting["control"] == pytest.approx(90 - 80)
    # A set first measured after session 1 still gets a Transfer from what was measured.
    late = AccuracyMatrix(
        ["a", "b"],
        [[10.0, math.nan], [50.0, math.nan], [45.0, 20.0], [40.0, 60.0]],
        {"a": 1, "b": 3},
    )
    assert late.summary()["transfer"] == pytest.approx(20.0)
