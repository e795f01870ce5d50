"""End to end on the demo dataset (built from scikit-image photos): outputs, metrics, cache reuse."""

import json

import numpy as np
import pytest

from pipeline import nsml
from pipeline.run import RunConfig, run
from stages.common.dataset import load_dataset


@pytest.fixture(scope="module")
def global_run(demo_data, weights_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    rc = RunConfig(stages=("global",), cache=weights_cache, top_k=5)
    return load_dataset(demo_data), out, rc, run(load_dataset(demo_data), out, rc)


@pytest.fixture(scope="module")
def full_run(demo_data, weights_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    # expand_below 1 - 1e-9: only the demo's best-verified queries (a same-product probability
    # of 1 - 1e-9 takes 200+ inliers under the default calibration) stay in the top 4
    rc = RunConfig(cache=weights_cache, top_k=4, expand_to=12, expand_below=1 - 1e-9, workers=1)
    return load_dataset(demo_data), out, rc, run(load_dataset(demo_data), out, rc)


def test_all_stages_on_the_demo(full_run):
    dataset, out, rc, result = full_run
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"global", "rerank"}
    assert metrics["rerank"]["mAP"] == pytest.approx(1.0)
    for ranked in json.loads((out / "rankings.json").read_text()).values():
        assert sorted(ranked) == sorted(dataset.references)
    assert set(result["timings"]) == {"global", "local", "rerank"}


def test_unverified_queries_are_verified_deeper(full_run):
    """Queries whose best top-4 reference has a same-product probability below expand_below
    get ranks 5-8 verified, and the others do not."""
    from pipeline.run import best_probability
    from stages.common.cache import FeatureStore
    from stages.common.shortlist import read_pairs, read_ranking
    from stages.rerank import calibrate
    from stages.rerank.inliers import load_inliers

    dataset, out, rc, result = full_run
    first = read_pairs(out / "pairs-global-top4.txt")
    (inlier_dir,) = list((rc.cache / "rerank").iterdir())
    counts = load_inliers(FeatureStore.open(inlier_dir), first)
    ranking = read_ranking(out / "global_ranking.npz")
    row = {q: i for i, q in enumerate(ranking["query_names"].tolist())}
    weak = sorted(q for q in counts if best_probability(calibrate.DEFAULT, ranking, row, counts, q) < rc.expand_below)
    assert weak, "the fixture's expand_below should leave some queries unverified"
    deeper = read_pairs(out / "pairs-global-top4-window4.txt")
    assert sorted(deeper) == weak
    assert all(len(refs) == 4 and not set(refs) & set(first[q]) for q, refs in deeper.items())


def test_full_rerun_computes_nothing(full_run, monkeypatch):
    dataset, out, rc, first = full_run
    from stages.global_embed import extract as g
    from stages.local_delf import extract as loc
    from stages.rerank import verify as v

    calls = []
    for module, name in ((g, "describe"), (loc, "describe"), (v, "verify_prepared")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _o=original, **k: calls.append(1) or _o(*a, **k))
    again = run(dataset, out, rc)
    assert calls == []
    assert again["rankings"] == first["rankings"]


def test_rankings_are_full_permutations(global_run):
    dataset, out, _, result = global_run
    rankings = json.loads((out / "rankings.json").read_text())
    assert list(rankings) == list(dataset.queries)
    for ranked in rankings.values():
        assert sorted(ranked) == sorted(dataset.references)


def test_nsml_results_structure(global_run):
    dataset, out, _, _ = global_run
    results = json.loads((out / "nsml_results.json").read_text())
    assert [r[0] for r in results] == list(range(len(dataset.queries)))
    assert [r[1][0] for r in results] == list(dataset.queries)
    assert all(sorted(r[1][1]) == sorted(dataset.references) for r in results)


def test_metrics_and_shortlist_written(global_run):
    dataset, out, rc, result = global_run
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert set(metrics) == {"global"}
    assert metrics["global"]["n_queries"] == len(dataset.queries)
    # synthetic views of the bundled photos: the ImageNet descriptor finds most of them first
    assert metrics["global"]["Recall@1"] >= 0.8
    pairs = (out / f"pairs-global-top{rc.top_k}.txt").read_text().splitlines()
    assert len(pairs) == rc.top_k * len(dataset.queries)
    assert json.loads((out / "skipped.json").read_text()) == {"queries": {}, "references": {}}


def test_rerun_reuses_the_cache(global_run, monkeypatch):
    dataset, out, rc, first = global_run
    from stages.global_embed import extract

    calls = []
    original = extract.describe
    monkeypatch.setattr(extract, "describe", lambda *a, **k: calls.append(1) or original(*a, **k))
    again = run(dataset, out, rc)
    assert calls == []
    assert again["rankings"] == first["rankings"]


def test_nsml_infer_contract(global_run, tmp_path):
    dataset, _, rc, result = global_run
    nsml.configure(config=rc)
    out = nsml.infer([str(p) for p in dataset.queries.values()], [str(p) for p in dataset.references.values()])
    assert isinstance(out, list) and len(out) == len(dataset.queries)
    for i, (index, (query, refs)) in enumerate(out):
        assert index == i and isinstance(query, str) and isinstance(refs, list)
        assert sorted(refs) == sorted(dataset.references)
    assert {q: refs for _, (q, refs) in out} == result["rankings"]
    # db omitted: the reference folder beside the queries' folder is read
    assert nsml.infer([str(p) for p in dataset.queries.values()]) == out


def test_global_descriptors_are_unit_norm(global_run):
    _, _, rc, _ = global_run
    from stages.common.cache import FeatureStore

    folders = list((rc.cache / "global").iterdir())
    assert len(folders) == 1
    store = FeatureStore.open(folders[0])
    names = sorted(store.names())
    d = np.stack([store.read(n)["descriptor"] for n in names])
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)
