"""Database-side augmentation and alpha query expansion on small hand-computed cases."""

import numpy as np
import pytest

from stages.global_embed.expansion import alpha_query_expansion, database_side_augmentation
from stages.global_embed.rank import rank_globally

# Four unit references in 2-D: r0 . r1 = 0.8, r1 . r2 = 0.6, r0 . r2 = 0, r3 = -r0.
REFS = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0]], np.float32)


def unit(*v):
    v = np.array(v, np.float64)
    return v / np.linalg.norm(v)


def test_dba_hand_computed():
    out = database_side_augmentation(REFS, k=1, alpha=1.0)
    np.testing.assert_allclose(out[0], unit(1 + 0.8 * 0.8, 0.8 * 0.6), atol=1e-6)  # + 0.8 r1
    np.testing.assert_allclose(out[1], unit(0.8 + 0.8, 0.6), atol=1e-6)  # + 0.8 r0 (0.8 > 0.6)
    np.testing.assert_allclose(out[2], unit(0.6 * 0.8, 1 + 0.6 * 0.6), atol=1e-6)  # + 0.6 r1
    np.testing.assert_allclose(out[3], REFS[3], atol=1e-6)  # nearest has cosine 0: weight 0
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-6)


def test_dba_alpha_and_k():
    out = database_side_augmentation(REFS, k=2, alpha=2.0)
    # r0's two nearest others: r1 (0.8 -> 0.64) and r2 (0 -> 0)
    np.testing.assert_allclose(out[0], unit(1 + 0.64 * 0.8, 0.64 * 0.6), atol=1e-6)
    np.testing.assert_array_equal(database_side_augmentation(REFS, k=0), REFS)
    np.testing.assert_allclose(database_side_augmentation(REFS, k=50), database_side_augmentation(REFS, k=3))
    twice = database_side_augmentation(REFS, k=1, iterations=2)
    np.testing.assert_allclose(twice, database_side_augmentation(database_side_augmentation(REFS, k=1), k=1),
                               atol=1e-6)


def test_dba_of_exact_duplicates_keeps_them():
    refs = np.array([[0.6, 0.8], [0.6, 0.8], [1, 0]], np.float32)
    out = database_side_augmentation(refs, k=1)
    np.testing.assert_allclose(out[:2], refs[:2], atol=1e-6)  # each one's neighbour is its twin


def test_alpha_query_expansion_hand_computed():
    query = np.array([[1, 0]], np.float32)
    out = alpha_query_expansion(query, REFS, k=2, alpha=1.0)  # top 2: r0 (1.0), r1 (0.8)
    np.testing.assert_allclose(out[0], unit(1 + 1 + 0.8 * 0.8, 0.8 * 0.6), atol=1e-6)
    out = alpha_query_expansion(query, REFS, k=2, alpha=3.0)
    np.testing.assert_allclose(out[0], unit(2 + 0.512 * 0.8, 0.512 * 0.6), atol=1e-6)
    np.testing.assert_array_equal(alpha_query_expansion(query, REFS, k=0), query)


def test_alpha_query_expansion_with_regions_adds_the_same_references_to_each_region():
    regions = np.array([[[1, 0], [0, 1]]], np.float32)  # best scores: r0 1, r1 0.8, r2 1, r3 0
    out = alpha_query_expansion(regions, REFS, k=2, alpha=1.0)  # r0 and r2 (ties: index order)
    np.testing.assert_allclose(out[0, 0], unit(2, 1), atol=1e-6)
    np.testing.assert_allclose(out[0, 1], unit(1, 2), atol=1e-6)


@pytest.mark.parametrize("bad", [{"k": -1}, {"k": 1, "alpha": -1.0}, {"k": 1, "iterations": -1}])
def test_dba_rejects_negative_settings(bad):
    with pytest.raises(ValueError, match="DBA"):
        database_side_augmentation(REFS, **bad)


def test_ranking_with_dba_hand_computed():
    # a = (1, 0), b = (0, 1), c = (0.6, 0.8); query (0.8, 0.6). Plain: c 0.96 > a 0.8 > b 0.6.
    # DBA k=1: a' ~ a + 0.6 c = (1.36, 0.48), c' ~ c + 0.8 b = (0.6, 1.6), b' ~ b + 0.8 c:
    # a' . q = 1.376 / 1.4422 = 0.954 > c' . q = 1.44 / 1.7088 = 0.843 > b' . q.
    features = {n: {"descriptor": unit(*v).astype(np.float32)} for n, v in
                {"a": (1, 0), "b": (0, 1), "c": (0.6, 0.8)}.items()}
    features["q"] = {"descriptor": unit(0.8, 0.6).astype(np.float32),
                     "region_descriptors": unit(0.8, 0.6).astype(np.float32)[None]}
    names = ["a", "b", "c"]
    off = {"dba_k": 0, "dba_alpha": 1.0, "dba_iterations": 1, "qe_k": 0, "qe_alpha": 3.0}
    plain, plain_scores = rank_globally(["q"], names, features, None, True, None)
    assert [names[i] for i in plain[0]] == ["c", "a", "b"]
    np.testing.assert_array_equal(rank_globally(["q"], names, features, None, True, off)[0], plain)
    order, scores = rank_globally(["q"], names, features, None, True, dict(off, dba_k=1))
    assert [names[i] for i in order[0]] == ["a", "c", "b"]
    np.testing.assert_allclose(scores[0, :2], [1.376 / np.hypot(1.36, 0.48), 1.44 / np.hypot(0.6, 1.6)], atol=1e-5)


def test_verified_query_expansion_hand_computed():
    from stages.rerank.verified_qe import expand

    # Five references in 2-D; the merged ranking of the one query is [0, 1, 2, 3, 4] and
    # reference 1 is its confident verification. Below it: score + d_1 . d_r, d_1 = (0, 1):
    # r2 0.5 + 0.0 = 0.5, r3 0.4 + 0.6 = 1.0, r4 0.3 + 0.8 = 1.1 -> [4, 3, 2].
    refs = np.array([[1, 0], [0, 1], [1, 0], [0.8, 0.6], [0.6, 0.8]], np.float32)
    order = np.array([[0, 1, 2, 3, 4]])
    scores = np.array([[0.9, 0.2, 0.5, 0.4, 0.3]], np.float32)
    confident = np.array([[False, True, False, False, False]])
    np.testing.assert_array_equal(expand(order, scores, confident, refs, n=1), [[0, 1, 4, 3, 2]])
    np.testing.assert_array_equal(expand(order, scores, confident, refs, n=0), order)
    np.testing.assert_array_equal(expand(order, scores, np.zeros_like(confident), refs, n=1), order)
    # two confident references (1 and 3): the expansion d_1 + d_3 = (0.8, 1.6) ranks what is
    # below position 3: only r4 is left
    both = confident | (np.arange(5) == 3)
    np.testing.assert_array_equal(expand(order, scores, both, refs, n=2), order)
    # with n = 1 only the first confident one expands; an unreadable reference (-inf) stays last
    scores[0, 4] = -np.inf
    np.testing.assert_array_equal(expand(order, scores, both, refs, n=1), [[0, 1, 3, 2, 4]])


def test_verified_query_expansion_rejects_mismatched_shapes():
    from stages.rerank.verified_qe import expand

    with pytest.raises(ValueError, match="disagree"):
        expand(np.zeros((1, 3), int), np.zeros((1, 2)), np.zeros((1, 3), bool), np.zeros((3, 2)), 1)


def test_dba_applies_to_whitened_descriptors_only(demo_data, weights_cache, tmp_path):
    from pipeline.run import RunConfig, run
    from stages.common.dataset import load_dataset
    from stages.common.shortlist import read_ranking

    def scores(whitening, dba_k):
        expansion = {"dba_k": dba_k, "dba_alpha": 1.0, "dba_iterations": 1, "qe_k": 0, "qe_alpha": 3.0}
        rc = RunConfig(stages=("global",), cache=weights_cache, whitening=whitening, expansion=expansion)
        out = tmp_path / f"{whitening}-{dba_k}"
        run(load_dataset(demo_data), out, rc)
        return read_ranking(out / "global_ranking.npz")["scores"]

    # unwhitened (the demo has no training classes, so "auto" is none too): DBA is skipped
    np.testing.assert_array_equal(scores("none", 20), scores("none", 0))
    # PCA-whitened: DBA changes the scores (each reference moves towards its neighbours)
    assert not np.allclose(scores("pca", 3), scores("pca", 0))
