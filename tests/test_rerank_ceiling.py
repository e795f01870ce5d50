"""The ceiling benchmark's rankings, checked on hand-made cases."""

import numpy as np

from bench.rerank_ceiling import mean_ap, merged, oracle_expansion


def test_merge_moves_only_references_above_the_hinge():
    refs = ["a", "b", "c"]
    order, scores = np.array([[0, 1, 2]]), np.array([[0.9, 0.8, 0.7]])
    inliers = {"q": {"b": 25, "c": 60}}  # a: unverified; b: 5 above the hinge, c: 40
    lists = merged(["q"], refs, order, scores, inliers, t=20, w=0.01)
    # keys: a 0.9, b 0.8 + 0.05 = 0.85, c 0.7 + 0.40 = 1.10
    assert lists == {"q": ["c", "a", "b"]}


def test_oracle_expansion_puts_the_first_relevant_reference_first_and_sorts_by_its_cosine():
    refs = ["a", "b", "c", "d"]
    desc = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.8, 0.6]], np.float32)
    order, scores = np.array([[0, 1, 2, 3]]), np.array([[0.5, 0.4, 0.3, 0.2]])
    final = {"q": ["a", "b", "c", "d"]}
    truth = {"q": {"b", "c"}}
    lists = oracle_expansion(["q"], refs, order, scores, desc, final, truth, beta=1.0)
    # anchor b; the rest by score + cos(., b): a 0.5 + 0, c 0.3 + 0.8, d 0.2 + 0.6
    assert lists == {"q": ["b", "c", "d", "a"]}
    assert mean_ap(lists, truth, {"all": ["q"]}) == [1.0]
    assert mean_ap(final, truth, {"all": ["q"]}) == [(1 / 2 + 2 / 3) / 2]
