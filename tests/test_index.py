"""The persistent index (`pipeline.index`, ``run_pipeline.py index`` / ``query``) and its
faiss search (`stages.global_embed.ann`)."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline import index as run_index
from pipeline.run import RunConfig, run
from stages.common import logger
from stages.common.dataset import load_dataset
from stages.global_embed import ann


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _clustered(n_refs, n_queries, dim, seed=0):
    """References around 50 random centres, queries near random references."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((50, dim))
    refs = _unit(centres[rng.integers(0, 50, n_refs)] + 0.3 * rng.standard_normal((n_refs, dim)))
    queries = _unit(refs[rng.integers(0, n_refs, n_queries)] + 0.05 * rng.standard_normal((n_queries, dim)))
    return refs, queries


def _exact_top(queries, refs, k):
    sims = queries @ refs.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(sims, order, axis=1)


def test_index_kind_follows_the_size_threshold():
    conf = dict(ann.default_conf, exact_below=500)
    assert ann.kind(499, conf) == "flat"
    assert ann.kind(500, conf) == "pca"
    refs, _ = _clustered(600, 1, 32)
    assert ann.is_exact(ann.build(refs[:499], conf))
    assert not ann.is_exact(ann.build(refs, dict(conf, pca_dim=8)))


def test_pca_index_matches_exact_top_k_on_a_clustered_set():
    refs, queries = _clustered(3000, 40, 64)
    conf = dict(ann.default_conf, exact_below=1000, pca_dim=16, k_factor=10)
    index = ann.build(refs, conf)
    assert not ann.is_exact(index)
    ids, scores = ann.search_shortlist(index, refs, queries, 10, conf)
    truth, truth_scores = _exact_top(queries, refs, 10)
    assert (ids == truth).mean() == 1.0
    np.testing.assert_allclose(scores, truth_scores, atol=1e-5)  # re-scored exactly, not PQ/PCA scores


def test_rescore_takes_the_max_over_query_descriptors_and_drops_duplicates():
    refs = np.eye(4, dtype=np.float32)
    # query 0: two descriptors, along refs 1 and 2 (0.8) and ref 3 (0.6); query 1: ref 0 only
    queries = np.array([[[0, 0.8, 0, 0.6], [0, 0, 1, 0]], [[1, 0, 0, 0], [1, 0, 0, 0]]], np.float32)
    candidates = np.array([[3, 1, 1, 2, -1], [0, -1, -1, -1, -1]], np.int64)
    ids, scores = ann.rescore(queries, refs, candidates, 3)
    assert ids.tolist() == [[2, 1, 3], [0, -1, -1]]
    np.testing.assert_allclose(scores[0], [1.0, 0.8, 0.6], rtol=1e-6)
    assert scores[1, 0] == pytest.approx(1.0) and np.isinf(scores[1, 1:]).all()


def test_pca_query_path_ranks_over_the_candidates_exactly(tmp_path):
    """`global_shortlist` with an approximate index: every query ranked over the union of the
    candidates, in exact score order, the true top references first."""
    refs, queries = _clustered(800, 3, 32, seed=1)
    conf = dict(ann.default_conf, exact_below=100, pca_dim=8)
    names = [f"r{i:04d}" for i in range(len(refs))]
    meta = {"references": names, "indexed": list(range(len(refs))), "unreadable": {},
            "index": {"kind": "pca", "conf": conf, "depth": 20}}
    loaded = run_index.LoadedIndex(tmp_path, meta, RunConfig(), ann.build(refs, conf), refs, None)
    ref_names, order, scores = run_index.global_shortlist(loaded, queries[:, None])
    truth, _ = _exact_top(queries, refs, 20)
    assert set(ref_names) >= {names[j] for j in truth.ravel()}
    for i in range(len(queries)):
        assert [ref_names[j] for j in order[i, :20]] == [names[j] for j in truth[i]]
        assert np.all(np.diff(scores[i]) <= 0)


@pytest.fixture(scope="module")
def demo_index(demo_data, weights_cache, tmp_path_factory):
    """The batch run and an index of the demo with the same conf (test_pipeline's full run)."""
    rc = RunConfig(cache=weights_cache, top_k=4, expand_to=12, expand_below=1 - 1e-9, workers=1)
    dataset = load_dataset(demo_data)
    batch = tmp_path_factory.mktemp("batch")
    run(dataset, batch, rc)
    folder = tmp_path_factory.mktemp("index")
    run_index.build(dataset, folder, rc)
    return dataset, batch, folder


@pytest.fixture
def private_cache(demo_index, tmp_path):
    """A copy of the session cache, for tests that put bad photos in it (other tests read
    every entry of the global store)."""
    import shutil

    copy = tmp_path / "cache"
    shutil.copytree(run_index.load(demo_index[2]).rc.cache, copy, ignore=shutil.ignore_patterns("demo"))
    return copy


@pytest.fixture
def restore_logger():
    """`run_pipeline.py`'s main sets up the package logger; later tests capture its records
    (test_progress) and need it as they found it."""
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]


def test_query_gives_the_batch_runs_ranking(demo_index, tmp_path):
    dataset, batch, folder = demo_index
    meta = json.loads((folder / run_index.INDEX_JSON).read_text())
    assert meta["index"]["kind"] == "flat" and meta["references"] == list(dataset.references)
    batch_rankings = json.loads((batch / "rankings.json").read_text())
    names = ["motorcycle_right", "astronaut_view2", "chelsea_view1"]
    result = run_index.query(run_index.load(folder), [dataset.queries[n] for n in names], tmp_path)
    assert list(result["rankings"]) == names and result["skipped"] == {}
    for name in names:
        assert result["rankings"][name] == batch_rankings[name]
    assert json.loads((tmp_path / "rankings.json").read_text()) == result["rankings"]


def test_query_names_a_bad_image(demo_index, private_cache, tmp_path):
    dataset, _, folder = demo_index
    bad = tmp_path / "photos" / "broken.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"not a jpeg at all")
    good = dataset.queries["chelsea_view1"]
    result = run_index.query(run_index.load(folder, private_cache), [bad, good], tmp_path / "out")
    assert list(result["rankings"]) == ["chelsea_view1"]
    assert list(result["skipped"]) == ["broken"]
    assert json.loads((tmp_path / "out" / "skipped.json").read_text())["queries"] == result["skipped"]
    with pytest.raises(run_index.QueryImageError, match="missing.jpg: no such file"):
        run_index.query_names([tmp_path / "missing.jpg"])
    with pytest.raises(run_index.QueryImageError, match="named like references"):
        run_index.query(run_index.load(folder), [dataset.references["coffee"]], tmp_path / "out2")


def test_query_command_exit_codes(demo_index, private_cache, tmp_path, capsys, restore_logger):
    from pipeline.cli import main

    dataset, _, folder = demo_index
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG garbage")
    assert main(["query", "--index", str(folder), "--cache", str(private_cache), "--output", str(tmp_path / "q"),
                 str(bad)]) == 1
    assert "broken: not ranked" in capsys.readouterr().err
    assert main(["query", "--index", str(tmp_path / "nowhere"), str(dataset.queries["chelsea_view1"])]) == 2
    assert main(["query", "--index", str(folder), "--output", str(tmp_path / "q"),
                 str(dataset.queries["chelsea_view1"])]) == 0
    assert capsys.readouterr().out.startswith("chelsea_view1: chelsea ")


def test_load_refuses_a_damaged_index(demo_index, tmp_path):
    import shutil

    _, _, folder = demo_index
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    Path(copy / run_index.FAISS_FILE).write_bytes(b"truncated")
    with pytest.raises(run_index.IndexFolderError, match="incomplete or damaged"):
        run_index.load(copy)


def test_pca_index_of_the_demo_gives_the_batch_ranking(demo_index, tmp_path):
    """The approximate path end to end (saved, memory-mapped, re-scored): with every
    reference a candidate, the ranking is the batch run's."""
    dataset, batch, _ = demo_index
    rc = RunConfig(cache=run_index.load(demo_index[2]).rc.cache, top_k=4, expand_to=12, expand_below=1 - 1e-9,
                   workers=1)
    folder = tmp_path / "pca"
    run_index.build(dataset, folder, rc, ann_conf={"pca_dim": 8}, force_kind="pca")
    loaded = run_index.load(folder)
    assert loaded.meta["index"]["kind"] == "pca" and isinstance(loaded.ref_desc, np.memmap)
    batch_rankings = json.loads((batch / "rankings.json").read_text())
    result = run_index.query(loaded, [dataset.queries["motorcycle_right"]], tmp_path / "out")
    assert result["rankings"]["motorcycle_right"] == batch_rankings["motorcycle_right"]
