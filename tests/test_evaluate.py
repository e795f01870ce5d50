import numpy as np
import pytest

from pipeline.evaluate import average_precision, evaluate, relevant_ranks


def test_ap_single_relevant_at_rank_three():
    assert average_precision([3], 1) == pytest.approx(1 / 3)


def test_ap_several_relevant_hand_computed():
    # relevant at ranks 1, 3, 6 of 3: (1/1 + 2/3 + 3/6) / 3
    assert average_precision([6, 1, 3], 3) == pytest.approx((1 + 2 / 3 + 0.5) / 3)


def test_ap_counts_relevant_items_never_retrieved():
    # 4 relevant in the ground truth, only ranks 2 and 4 retrieved: (1/2 + 2/4) / 4
    assert average_precision([2, 4], 4) == pytest.approx(0.25)


def test_ap_none_retrieved_is_zero():
    assert average_precision([], 2) == 0.0


def test_ap_truncated_at_k():
    # ranks 1, 3, 6 of 3 relevant; at k=5 only 1 and 3 count: (1 + 2/3) / min(3, 5)
    assert average_precision([1, 3, 6], 3, k=5) == pytest.approx((1 + 2 / 3) / 3)
    # k smaller than the number of relevant items divides by k: (1 + 2/2) / 2
    assert average_precision([1, 2, 3], 3, k=2) == pytest.approx(1.0)
    assert average_precision([3], 1, k=2) == 0.0


def test_ap_rejects_inconsistent_input():
    with pytest.raises(ValueError):
        average_precision([1, 2], 1)
    with pytest.raises(ValueError):
        average_precision([], 0)


def test_relevant_ranks_are_one_based():
    assert relevant_ranks(["a", "b", "c", "d"], {"d", "b"}).tolist() == [2, 4]


def test_evaluate_hand_computed_means():
    rankings = {
        "q1": ["a", "b", "c", "d"],  # relevant {b}: AP 1/2, first hit at 2
        "q2": ["c", "a", "d", "b"],  # relevant {c, b}: AP (1 + 2/4) / 2 = 0.75
        "q3": ["d", "c", "b", "a"],  # no ground truth: left out
        "q4": ["b", "c", "d", "a"],  # relevant {a, x}: x is absent: AP (1/4) / 2 = 0.125
    }
    gt = {"q1": {"b"}, "q2": {"c", "b"}, "q4": {"a", "x"}}
    m = evaluate(rankings, gt, recall_ks=(1, 2, 4), map_at=2)
    assert m["n_queries"] == 3
    assert m["mAP"] == pytest.approx((0.5 + 0.75 + 0.125) / 3)
    # @2: q1 (1/2)/1; q2 (1/1)/2; q4 0
    assert m["mAP@2"] == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert m["Recall@1"] == pytest.approx(1 / 3)
    assert m["Recall@2"] == pytest.approx(2 / 3)
    assert m["Recall@4"] == pytest.approx(1.0)


def test_evaluate_without_any_ground_truth_is_nan():
    m = evaluate({"q": ["a"]}, {})
    assert m["n_queries"] == 0 and np.isnan(m["mAP"])


def test_roc_auc_hand_computed():
    """Positives 3, 2, 1 against negatives 2, 0: of the 6 pairs the positive wins 4 and
    ties 1 (2 vs 2), so AUC = (4 + 0.5) / 6; either side empty has no AUC."""
    from pipeline.analysis import roc_auc

    assert roc_auc([3, 2, 1], [2, 0]) == pytest.approx(4.5 / 6)
    assert roc_auc([1, 1], [1]) == pytest.approx(0.5)
    assert roc_auc([5], [1, 2, 9]) == pytest.approx(2 / 3)
    assert roc_auc([], [1]) is None and roc_auc([1], []) is None
