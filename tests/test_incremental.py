"""Adding references to a warm cache: only the new references' features, and only the pairs
that involve them or that a changed shortlist brings, are computed (issue 14)."""

import os
import re
import shutil

import cv2
import pytest

from pipeline.run import RunConfig, run
from stages.common.cache import FeatureStore
from stages.common.dataset import load_dataset
from stages.common.shortlist import read_pairs
from tests.conftest import collected_logs

REFERENCE = "test/test_data/reference"


def logged_run(dataset, out, rc):
    with collected_logs() as lines:
        return run(dataset, out, rc), lines


def counted(lines, pattern) -> int:
    """The sum of the first number of every log line matching `pattern`."""
    return sum(int(m.group(1)) for line in lines if (m := re.match(pattern, line)))


def all_pairs(out) -> set[tuple[str, str]]:
    return {(q, r) for path in out.glob("pairs-global-top*.txt") for q, refs in read_pairs(path).items() for r in refs}


def store_names(cache, stage) -> set[str]:
    (folder,) = (cache / stage).iterdir()
    return FeatureStore.open(folder).names() - {"pca"}


@pytest.fixture(scope="module")
def grown(demo_data, weights_cache, tmp_path_factory):
    """The demo set run cold, then again warm after two references were added to its folder."""
    from stages.common.backbone import efficientnet_lite as lite

    lite.imagenet_weights(weights_cache)
    tmp = tmp_path_factory.mktemp("incremental")
    data = tmp / "data"
    shutil.copytree(demo_data, data)
    cache = tmp / "cache"
    shutil.copytree(weights_cache / "weights", cache / "weights", copy_function=os.link)
    rc = RunConfig(cache=cache, top_k=4, expand_to=8, expand_below=1 - 1e-9, workers=1)
    first, _ = logged_run(load_dataset(data), tmp / "out1", rc)
    before = {stage: store_names(cache, stage) for stage in ("global", "local")}
    pairs_before = all_pairs(tmp / "out1")
    pca = next((cache / "local").iterdir()) / "pca.npz"
    pca_bytes = pca.read_bytes()
    # two new references, distractors: bundled scikit-image photos the demo does not use
    from skimage import data as photos

    cv2.imwrite(str(data / REFERENCE / "clock.jpg"), photos.clock())
    cv2.imwrite(str(data / REFERENCE / "cell.jpg"), photos.cell())
    second, lines = logged_run(load_dataset(data), tmp / "out2", rc)
    return {"cache": cache, "before": before, "pairs_before": pairs_before, "pairs_after": all_pairs(tmp / "out2"),
            "lines": lines, "first": first, "second": second, "pca": pca, "pca_bytes": pca_bytes}


def test_adding_two_references_computes_two_global_descriptors(grown):
    assert counted(grown["lines"], r"global descriptors: (\d+) of \d+ images to compute") == 2
    assert store_names(grown["cache"], "global") - grown["before"]["global"] == {"clock", "cell"}


def test_adding_references_keeps_the_pca_and_computes_only_newly_shortlisted_local_features(grown):
    assert grown["pca"].read_bytes() == grown["pca_bytes"]  # the same store, the same pinned PCA
    new_local = store_names(grown["cache"], "local") - grown["before"]["local"]
    shortlisted_before = {r for _, r in grown["pairs_before"]}
    shortlisted_now = {r for _, r in grown["pairs_after"]}
    assert new_local == shortlisted_now - shortlisted_before
    assert counted(grown["lines"], r"local features: (\d+) of \d+ queries to extract") == 0
    assert counted(grown["lines"], r"local features: (\d+) of \d+ references to extract") == len(new_local)
    changed = {q for q, _ in grown["pairs_after"] ^ grown["pairs_before"]}
    assert len(new_local) <= 2 + len(changed)


def test_adding_references_verifies_only_the_new_pairs(grown):
    new_pairs = grown["pairs_after"] - grown["pairs_before"]
    assert new_pairs, "the new references should enter some shortlist"
    assert counted(grown["lines"], r"geometric verification: (\d+) of \d+ pairs to compute") == len(new_pairs)
    assert {r for _, r in new_pairs} & {"clock", "cell"}


def test_the_grown_run_ranks_every_reference(grown):
    for ranked in grown["second"]["rankings"].values():
        assert len(ranked) == len(set(ranked)) == 16
    assert grown["second"]["metrics"]["rerank"]["mAP"] == pytest.approx(grown["first"]["metrics"]["rerank"]["mAP"])
