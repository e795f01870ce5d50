"""Bounded memory (issue 14): stage 1 keeps each query's first positions and the
descriptors that regenerate the rest; rankings.json, nsml_results.json and the metrics are
produced a batch of queries at a time. Everything must equal the whole-matrix path."""

import json

import numpy as np
import pytest

from pipeline.evaluate import evaluate
from pipeline.outputs import StreamedRankings, write_rankings, write_streamed
from stages.common.cache import FeatureStore
from stages.common.shortlist import RankingFile, order_to_names, save_ranking
from stages.global_embed.rank import full_ranking, rank_globally, shortlist_globally
from stages.rerank import calibrate, merge, verified_qe

N_REFS, N_QUERIES, DIM, REGIONS = 40, 9, 5, 2
UNREADABLE_REFS = {"r03", "r17", "r39"}
UNREADABLE_QUERIES = {"q4"}


def whole_matrix_ranking(query_names, ref_names, features):
    """The ranking as it was computed before issue 14, as a reference: every score of
    every readable (query, reference), a stable argsort, unreadable references appended
    in index order, unreadable queries given range(R)."""
    ok_refs = [i for i, r in enumerate(ref_names) if r in features]
    failed = [i for i in range(len(ref_names)) if ref_names[i] not in features]
    order = np.tile(np.arange(len(ref_names)), (len(query_names), 1))
    scores = np.full(order.shape, -np.inf, np.float32)
    refs = np.stack([features[ref_names[i]]["descriptor"] for i in ok_refs])
    for q, name in enumerate(query_names):
        if name not in features:
            continue
        sims = (features[name]["region_descriptors"] @ refs.T).max(axis=0)
        sub = np.argsort(-sims, kind="stable")
        order[q] = np.concatenate([np.array(ok_refs)[sub], failed])
        scores[q, :len(ok_refs)] = sims[sub]
    return order, scores


@pytest.fixture
def features():
    """Small-integer descriptors (exact inner products, many ties), some images unreadable."""
    rng = np.random.default_rng(7)
    refs = [f"r{i:02d}" for i in range(N_REFS)]
    queries = [f"q{i}" for i in range(N_QUERIES)]
    feats = {}
    for r in refs:
        if r not in UNREADABLE_REFS:
            feats[r] = {"descriptor": rng.integers(-1, 2, DIM).astype(np.float32)}
    for q in queries:
        if q not in UNREADABLE_QUERIES:
            regions = rng.integers(-1, 2, (REGIONS, DIM)).astype(np.float32)
            feats[q] = {"descriptor": regions[0], "region_descriptors": regions}
    return queries, refs, feats


@pytest.mark.parametrize("keep", [1, 4, 36, 37, 38, 40, 100])
def test_regenerated_ranking_equals_the_whole_matrix_one(tmp_path, features, keep):
    """keep < readable references, = them (37), between them and R, = R, > R."""
    queries, refs, feats = features
    expected_order, expected_scores = whole_matrix_ranking(queries, refs, feats)
    short = shortlist_globally(queries, refs, feats, keep=keep)
    assert short["order"].shape == (N_QUERIES, min(keep, N_REFS))
    path = save_ranking(tmp_path / "global_ranking.npz", queries, refs, short["order"], short["scores"],
                        {k: v for k, v in short.items() if k not in ("order", "scores", "ranked_refs")})
    ranking = RankingFile(path)
    assert ranking.depth == min(keep, N_REFS) and ranking.complete == (keep >= N_REFS)
    for batch in (1, 4, 100):
        got = [ranking.full(rows) for rows, *_ in ranking.batches(batch)]
        order = np.concatenate([o for o, _ in got])
        scores = np.concatenate([s for _, s in got])
        np.testing.assert_array_equal(order, expected_order)
        np.testing.assert_array_equal(scores, expected_scores)
    np.testing.assert_array_equal(rank_globally(queries, refs, feats, keep=keep)[0], expected_order)
    np.testing.assert_array_equal(full_ranking(short, N_REFS)[0], expected_order)
    # ties exist across the cut, unreadable references are last in name order
    sims = expected_scores[0]
    assert (sims[:-1] == sims[1:])[np.isfinite(sims[1:])].any()
    assert [refs[j] for j in expected_order[0, -3:]] == sorted(UNREADABLE_REFS)
    assert expected_order[4].tolist() == list(range(N_REFS))  # the unreadable query


def test_a_ranking_file_without_descriptors_must_be_complete(tmp_path):
    order = np.zeros((1, 2), np.int32)
    with pytest.raises(ValueError, match="2 of 3 references"):
        save_ranking(tmp_path / "r.npz", ["q"], ["a", "b", "c"], order, np.zeros((1, 2), np.float32))


def _truth(queries, refs):
    rng = np.random.default_rng(1)
    truth = {q: set(rng.choice(refs, size=1 + i % 3, replace=False).tolist()) for i, q in enumerate(queries)}
    truth[queries[1]] = {"not-a-reference", refs[0]}  # a relevant name missing from the references
    del truth[queries[2]]  # a query without ground truth
    return truth


@pytest.mark.parametrize("batch", [1, 2, 50])
def test_streamed_outputs_equal_the_whole_ones(tmp_path, features, batch):
    """rankings.json and nsml_results.json byte for byte as from the whole dict, and the
    metrics of each stage as `evaluate` of the whole dict."""
    queries, refs, feats = features
    order, _ = whole_matrix_ranking(queries, refs, feats)
    second = order[:, ::-1].copy()  # another "stage": any permutation
    truth = _truth(queries, refs)
    batches = ((np.arange(s, min(s + batch, N_QUERIES)), {"global": order[s:s + batch], "rerank": second[s:s + batch]})
               for s in range(0, N_QUERIES, batch))
    got = write_streamed(tmp_path / "streamed", queries, refs, batches, ("global", "rerank"), truth, keep=True)
    whole = {"global": order_to_names(order, queries, refs), "rerank": order_to_names(second, queries, refs)}
    write_rankings(tmp_path / "whole", whole["rerank"])
    for name in ("rankings.json", "nsml_results.json"):
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    assert got["metrics"] == {s: evaluate(whole[s], truth) for s in whole}
    assert got["rankings"] == whole
    assert set(got["aps"]["global"]) == set(truth)
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == ["nsml_results.json", "rankings.json"]


def test_streamed_outputs_of_no_query_and_a_failed_stream(tmp_path):
    got = write_streamed(tmp_path, [], ["a"], iter(()), ("global",), {}, keep=True)
    assert json.loads((tmp_path / "rankings.json").read_text()) == {}
    assert json.loads((tmp_path / "nsml_results.json").read_text()) == []
    assert got["metrics"]["global"]["n_queries"] == 0

    def broken():
        yield np.array([0]), {"global": np.array([[0]])}
        raise RuntimeError("disk full")

    before = (tmp_path / "rankings.json").read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        write_streamed(tmp_path, ["q"], ["a"], broken(), ("global",))
    assert (tmp_path / "rankings.json").read_bytes() == before  # the old file stays whole
    assert not list(tmp_path.glob(".tmp-*"))


def test_streamed_rankings_mapping(features):
    queries, refs, feats = features
    order, _ = whole_matrix_ranking(queries, refs, feats)
    lazy = StreamedRankings(queries, refs, lambda rows: order[rows], batch=4)
    whole = order_to_names(order, queries, refs)
    assert len(lazy) == N_QUERIES and list(lazy) == queries
    assert lazy["q3"] == whole["q3"] and dict(lazy.items()) == whole and lazy == whole


def test_merge_of_a_kept_shortlist_equals_the_whole_matrix_merge(tmp_path, features):
    """`merge.main` on a ranking kept to 6 positions (verified pairs down to rank 5, verified
    query expansion on) writes what reranking the whole matrices writes."""
    queries, refs, feats = features
    order, scores = whole_matrix_ranking(queries, refs, feats)
    rng = np.random.default_rng(5)
    store = FeatureStore(tmp_path / "cache", "rerank", {"name": "synthetic"}, "k")
    inliers, lines = {}, []
    for q, name in enumerate(queries):
        if name in UNREADABLE_QUERIES:
            continue
        top = [refs[j] for j in order[q, :6] if refs[j] not in UNREADABLE_REFS]
        counts = rng.choice([0, 5, 40, 90], size=len(top)).astype(np.int32)
        store.write(name, {"ref_names": np.array(top), "inliers": counts})
        inliers[name] = dict(zip(top, counts.tolist(), strict=True))
        lines += [f"{name}\t{r}\n" for r in top]
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("".join(lines))
    ref_desc = np.zeros((N_REFS, DIM), np.float32)
    for j, r in enumerate(refs):
        if r in feats:
            ref_desc[j] = feats[r]["descriptor"]
    desc_path = tmp_path / "reference_descriptors.npz"
    np.savez(desc_path, ref_names=np.array(refs), descriptors=ref_desc.astype(np.float16))
    conf = dict(merge.default_conf, verified_qe=1, verified_qe_probability=0.5)

    short = shortlist_globally(queries, refs, feats, keep=6)
    ranking_path = save_ranking(tmp_path / "global_ranking.npz", queries, refs, short["order"], short["scores"],
                                {k: v for k, v in short.items() if k not in ("order", "scores", "ranked_refs")})
    out = merge.main(conf, ranking_path, [pairs], store.dir, tmp_path, None, desc_path)

    depth = merge.verified_depth(queries, refs, order, inliers)
    expected = merge.rerank(order, scores, merge.align_inliers(queries, refs, order, inliers, depth), depth,
                            conf["rule"], conf["min_inliers"], conf["weight"], calibrate.DEFAULT)
    by_ref, confident = merge.confident_pairs(queries, refs, {"order": order, "scores": scores}, inliers,
                                              calibrate.DEFAULT, conf["verified_qe_probability"])
    assert confident.any(), "the case should expand some queries"
    expected = verified_qe.expand(expected, by_ref, confident, ref_desc, conf["verified_qe"])
    assert json.loads(out.read_text()) == order_to_names(expected, queries, refs)
    assert not np.array_equal(expected[:, 6:], order[:, 6:]), "the expansion should reorder below the kept positions"


def test_a_run_above_the_in_memory_size_returns_lazy_rankings(demo_data, weights_cache, tmp_path, monkeypatch):
    """Above `IN_MEMORY_NAMES` the run returns a `StreamedRankings`; it reads as
    rankings.json, and the report and metrics come out as from the in-memory run."""
    from pipeline import outputs
    from pipeline import run as run_module
    from pipeline.run import RunConfig, run
    from stages.common.dataset import load_dataset

    dataset = load_dataset(demo_data)
    rc = RunConfig(stages=("global",), cache=weights_cache, report=3)
    small = run(dataset, tmp_path / "small", rc)
    monkeypatch.setattr(run_module, "IN_MEMORY_NAMES", 0)
    large = run(dataset, tmp_path / "large", rc)
    assert isinstance(large["rankings"], outputs.StreamedRankings) and isinstance(small["rankings"], dict)
    assert large["rankings"] == small["rankings"] == json.loads((tmp_path / "large" / "rankings.json").read_text())
    assert large["metrics"] == small["metrics"] and large["metrics"]["global"]["n_queries"] > 0
    assert large["report"] is not None and large["report"].exists()
    for name in ("rankings.json", "nsml_results.json"):
        assert (tmp_path / "large" / name).read_bytes() == (tmp_path / "small" / name).read_bytes()
