"""Continual-learning metrics against matrices computed by hand."""

import math

import pytest

from trace_transfer.errors import ConfigError
from trace_transfer.evaluation.continual import CONVENTIONS, continual_metrics, format_matrix_markdown

# Three tasks (math, medical, code). Row 0 before, rows 1..3 after each stage.
R3 = [
    [0.10, 0.20, 0.30],
    [0.90, 0.25, 0.35],
    [0.60, 0.80, 0.40],
    [0.50, 0.70, 0.95],
]


def test_three_task_matrix_by_hand():
    m = continual_metrics(R3)
    # AA = (0.50 + 0.70 + 0.95) / 3
    assert m["aa"] == pytest.approx(2.15 / 3)
    # BWT = ((0.50 - 0.90) + (0.70 - 0.80)) / 2 = -0.25
    assert m["bwt"] == pytest.approx(-0.25)
    # FWT = ((R[1][2] - R[0][2]) + (R[2][3] - R[0][3])) / 2 = ((0.25-0.20) + (0.40-0.30)) / 2 = 0.075
    assert m["fwt"] == pytest.approx(0.075)
    # forgetting: task 1 max(0.90, 0.60) - 0.50 = 0.40; task 2 max(0.25, 0.80) - 0.70 = 0.10; task 3 None
    assert m["forgetting"][0] == pytest.approx(0.40)
    assert m["forgetting"][1] == pytest.approx(0.10)
    assert m["forgetting"][2] is None
    assert m["mean_forgetting"] == pytest.approx(0.25)
    assert m["plasticity"] == pytest.approx([0.90, 0.80, 0.95])
    assert m["num_tasks"] == 3 and m["num_stages"] == 3
    assert m["conventions"] == CONVENTIONS


def test_forgetting_excludes_row_zero():
    # A pretrained base already knows task 1 (0.99); training never reaches it again. Row 0 is not a
    # stage, so forgetting is measured from the best post-stage score (0.7), not from 0.99.
    R = [[0.99, 0.0], [0.7, 0.8], [0.3, 0.9]]
    m = continual_metrics(R)
    assert m["forgetting"][0] == pytest.approx(0.4)
    assert m["bwt"] == pytest.approx(-0.4)


def test_no_forgetting_gives_zero_bwt():
    R = [[0, 0], [1, 0], [1, 1]]
    m = continual_metrics(R)
    assert m["bwt"] == 0 and m["mean_forgetting"] == 0 and m["aa"] == 1


def test_single_task_has_no_transfer_terms():
    m = continual_metrics([[0.2], [0.7]])
    assert m["aa"] == pytest.approx(0.7)
    assert m["bwt"] is None and m["fwt"] is None
    assert m["plasticity"] == [0.7]


def test_joint_run_has_only_aa():
    m = continual_metrics([[0.1, 0.2, 0.3], [0.6, 0.7, 0.8]])
    assert m["aa"] == pytest.approx(0.7)
    assert m["bwt"] is None and m["fwt"] is None and m["mean_forgetting"] is None
    assert "one stage per task" in m["note"]


@pytest.mark.parametrize("R", [[[0.1, 0.2]], [[0.1, 0.2], [0.3]], [[], []]])
def test_invalid_matrices_raise(R):
    with pytest.raises(ConfigError):
        continual_metrics(R)


def test_markdown_table():
    md = format_matrix_markdown(R3, ["math", "medical", "code"])
    lines = md.splitlines()
    assert lines[0] == "| | math | medical | code | avg |"
    assert lines[2].startswith("| before | 0.100 | 0.200 | 0.300 | 0.200 |")
    assert lines[-1].startswith("| after stage 3 | 0.500 | 0.700 | 0.950 |")
    assert math.isclose(float(lines[-1].split("|")[-2]), 2.15 / 3, abs_tol=1e-3)
    with pytest.raises(ConfigError):
        format_matrix_markdown(R3, ["a", "b"])


def test_lower_is_better_tasks_are_not_averaged_with_accuracies():
    # columns: accuracy, perplexity, accuracy
    R = [[0.1, 9.0, 0.2], [0.9, 8.0, 0.3], [0.6, 5.0, 0.4], [0.5, 7.0, 0.8]]
    m = continual_metrics(R, higher_is_better=[True, False, True])
    assert m["averaged_tasks"] == [0, 2]
    assert m["aa"] == pytest.approx((0.5 + 0.8) / 2)
    assert m["bwt"] == pytest.approx(0.5 - 0.9)  # only task 1 (task 2 is perplexity)
    assert m["fwt"] == pytest.approx(0.4 - 0.2)  # only task 3
    # perplexity forgetting: best (lowest) after stage 1..2 is 5.0, final 7.0 -> forgot 2.0
    assert m["forgetting"][1] == pytest.approx(2.0)
    assert m["mean_forgetting"] == pytest.approx(0.9 - 0.5)
    # default: every task averaged, as before
    assert continual_metrics(R)["averaged_tasks"] == [0, 1, 2]
