import pytest

from pah_edge.workstation.metrics import average_accuracy, backward_transfer, forgetting, summarize

# Three tasks; task 0 peaks after task 1 (0.95) and ends at 0.80; task 1 drops 0.90 -> 0.85.
ACC = [[0.90], [0.95, 0.90], [0.80, 0.85, 0.70]]


def test_average_accuracy_is_mean_of_last_row():
    assert average_accuracy(ACC) == pytest.approx((0.80 + 0.85 + 0.70) / 3)


def test_forgetting_uses_best_earlier_accuracy():
    assert forgetting(ACC) == pytest.approx(((0.95 - 0.80) + (0.90 - 0.85)) / 2)


def test_bwt_compares_with_just_learned_accuracy():
    assert backward_transfer(ACC) == pytest.approx(((0.80 - 0.90) + (0.85 - 0.90)) / 2)


def test_single_task_has_no_forgetting():
    assert summarize([[0.7]]) == {"acc_matrix": [[0.7]], "average_accuracy": 0.7, "forgetting": 0.0, "bwt": 0.0}
