"""Metric tests with hand-computed expected values (every number is derived in a comment)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from duallora.metrics import accuracy_row, build_matrix, compute_metrics, validate_accuracy_matrix

NAN = float("nan")

# Task 0 rose from 90 to 95 after task 1, then fell to 80: its forgetting must use the max (95),
# not the diagonal (90). Task 1 is the newest old task (i = T-2) and must be included.
R3 = np.array(
    [
        [90.0, NAN, NAN],
        [95.0, 70.0, NAN],
        [80.0, 60.0, 85.0],
    ]
)
SIZES3 = [100, 50, 200]


def test_three_tasks_unequal_sizes():
    m = compute_metrics(R3, SIZES3)
    # (80*100 + 60*50 + 85*200) / 350 = (8000 + 3000 + 17000) / 350 = 28000 / 350 = 80.0
    assert m["final_accuracy"] == pytest.approx(80.0)
    # (80 + 60 + 85) / 3 = 225 / 3 = 75.0   (differs from the sample-weighted 80.0)
    assert m["final_accuracy_task_mean"] == pytest.approx(75.0)
    # A_0 = 90
    # A_1 = (95*100 + 70*50) / 150 = 13000 / 150 = 86.666...
    # A_2 = 80.0 (above)
    assert m["accuracy_after_task"] == pytest.approx([90.0, 13000 / 150, 80.0])
    # task means: 90; (95 + 70)/2 = 82.5; 75.0
    assert m["accuracy_after_task_task_mean"] == pytest.approx([90.0, 82.5, 75.0])
    # (90 + 13000/150 + 80) / 3 = (170 + 260/3) / 3 = (770/3) / 3 = 770/9 = 85.555...
    assert m["average_incremental_accuracy"] == pytest.approx(770 / 9)
    # task 0: max(90, 95) - 80 = 15 ; task 1: max(70) - 60 = 10 ; (15 + 10) / 2 = 12.5
    # (the diagonal-only formula would give 10.0; skipping task 1 would give 15.0; dividing by T: 8.33)
    assert m["forgetting"] == pytest.approx(12.5)
    # ((80 - 90) + (60 - 70)) / 2 = -10.0
    assert m["backward_transfer"] == pytest.approx(-10.0)
    assert m["task_id_accuracy"] is None


def test_return_types_are_python_floats():
    m = compute_metrics(R3, SIZES3, task_id_accuracy=np.float32(50.0))
    for key in ("final_accuracy", "final_accuracy_task_mean", "average_incremental_accuracy",
                "forgetting", "backward_transfer", "task_id_accuracy"):
        assert type(m[key]) is float, key
    assert all(type(v) is float for v in m["accuracy_after_task"])
    assert all(type(v) is float for v in m["accuracy_after_task_task_mean"])
    assert m["task_id_accuracy"] == 50.0


def test_forgetting_max_over_all_earlier_rows_four_tasks():
    R = build_matrix(
        [
            [50.0],
            [60.0, 80.0],
            [70.0, 75.0, 90.0],
            [40.0, 85.0, 30.0, 100.0],
        ]
    )
    m = compute_metrics(R, [10, 10, 10, 10])
    # task 0: max(50, 60, 70) - 40 = 30
    # task 1: max(80, 75) - 85 = -5     (improved: negative, not clamped)
    # task 2: max(90) - 30 = 60         (newest old task)
    # (30 - 5 + 60) / 3 = 85 / 3 = 28.333...
    assert m["forgetting"] == pytest.approx(85 / 3)
    # ((40-50) + (85-80) + (30-90)) / 3 = (-10 + 5 - 60) / 3 = -65/3
    assert m["backward_transfer"] == pytest.approx(-65 / 3)
    # equal sizes: weighted == task mean; final = (40+85+30+100)/4 = 255/4 = 63.75
    assert m["final_accuracy"] == pytest.approx(63.75)
    assert m["final_accuracy_task_mean"] == pytest.approx(63.75)


def test_single_task():
    m = compute_metrics([[87.5]], [30], task_id_accuracy=100.0)
    assert m["final_accuracy"] == 87.5
    assert m["final_accuracy_task_mean"] == 87.5
    assert m["average_incremental_accuracy"] == 87.5
    assert m["accuracy_after_task"] == [87.5]
    assert m["accuracy_after_task_task_mean"] == [87.5]
    assert m["forgetting"] is None
    assert m["backward_transfer"] is None
    assert m["task_id_accuracy"] == 100.0


def test_upper_triangle_is_ignored():
    R = R3.copy()
    R[0, 1] = R[0, 2] = R[1, 2] = 0.0  # some code bases fill unseen tasks with 0
    assert compute_metrics(R, SIZES3) == compute_metrics(R3, SIZES3)


def test_accuracy_row():
    # 45/50 = 90% ; 0/7 = 0% ; 3/4 = 75%
    assert accuracy_row([45, 0, 3], [50, 7, 4]) == [90.0, 0.0, 75.0]
    assert accuracy_row([np.int64(1)], [np.int64(8)]) == [12.5]


@pytest.mark.parametrize(
    "correct, totals",
    [([1, 2], [3]), ([1], [0]), ([5], [4]), ([-1], [4]), ([1.5], [4]), ([1], [4.0]), ([True], [2])],
)
def test_accuracy_row_invalid(correct, totals):
    with pytest.raises(ValueError):
        accuracy_row(correct, totals)


def test_build_matrix():
    R = build_matrix([[90], [95, 70], [80, 60, 85]])
    assert R.shape == (3, 3)
    assert R.dtype == np.float64
    np.testing.assert_array_equal(R, R3)  # NaN positions compare equal
    assert math.isnan(R[0, 1]) and math.isnan(R[0, 2]) and math.isnan(R[1, 2])


@pytest.mark.parametrize("rows", [[], [[1.0, 2.0]], [[1.0], [2.0]], [[1.0], [2.0, 3.0, 4.0]]])
def test_build_matrix_invalid(rows):
    with pytest.raises(ValueError):
        build_matrix(rows)


@pytest.mark.parametrize(
    "R, match",
    [
        (np.zeros((2, 3)), "square"),
        (np.zeros(3), "square"),
        (np.zeros((0, 0)), "square"),
        ([[50.0, NAN], [NAN, 50.0]], "finite"),  # NaN below the diagonal
        ([[NAN]], "finite"),  # NaN on the diagonal
        ([[50.0, NAN], [float("inf"), 50.0]], "finite"),
        ([[100.5]], r"\[0, 100\]"),
        ([[50.0, NAN], [-1.0, 50.0]], r"\[0, 100\]"),
        ([["a"]], "numeric"),
    ],
)
def test_invalid_matrix(R, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(R, [1] * (len(R) if len(np.shape(R)) else 1))
    with pytest.raises(ValueError):
        validate_accuracy_matrix(R)


@pytest.mark.parametrize(
    "sizes",
    [[100, 50], [100, 50, 200, 1], [100, 0, 200], [100, -5, 200], [100, 50.0, 200], [True, 50, 200], "abc", 3],
)
def test_invalid_task_sizes(sizes):
    with pytest.raises(ValueError, match="task_sizes"):
        compute_metrics(R3, sizes)


@pytest.mark.parametrize("tid", [-1.0, 100.1, float("nan"), "90", True])
def test_invalid_task_id_accuracy(tid):
    with pytest.raises(ValueError, match="task_id_accuracy"):
        compute_metrics(R3, SIZES3, task_id_accuracy=tid)


def test_input_not_modified():
    R = R3.copy()
    compute_metrics(R, SIZES3)
    np.testing.assert_array_equal(R, R3)
