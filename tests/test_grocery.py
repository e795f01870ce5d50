"""Real product photos in stores (../shared/data/grocery_store): reranking helps the packaged
products and leaves the produce it cannot verify within noise; unrelated catalogue shots on
one white canvas never verify. Slow; `.ci/run` runs it where the data sets exist."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.evaluate import evaluate
from stages.common.conf import resolve
from stages.common.dataset import read_ground_truth
from stages.common.images import read_image
from stages.common.pca import learn_pca_whitening
from stages.local_delf import extract as local_extract
from stages.local_delf.backends import DenseLite0
from stages.rerank import calibrate, verify

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DATA = SHARED / "grocery_store"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present")]


def test_reranking_helps_packages_and_keeps_produce_near_global(tmp_path, weights_cache):
    assert main(["--data", str(DATA), "--output", str(tmp_path), "--cache", str(weights_cache)]) == 0
    rankings = json.loads((tmp_path / "rankings.json").read_text())
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["rerank"]["mAP"] > metrics["global"]["mAP"]
    from pipeline.evaluate import load_rankings

    global_rankings = load_rankings(tmp_path / "global_ranking.npz")
    truth = {kind: read_ground_truth(DATA / "test" / f"ground_truth_{kind}.csv") for kind in ("packages", "produce")}
    scores = {kind: (evaluate(rankings, t)["mAP"], evaluate(global_rankings, t)["mAP"]) for kind, t in truth.items()}
    # measured 0.6074 vs 0.5512 (merge alone 0.5725, then the verified query expansion)
    assert scores["packages"][0] > scores["packages"][1] + 0.03, scores
    # Produce cannot be verified (other fruit of the variety): a handful of its pairs pass
    # the calibration's hinge, so the order stays within noise of the global one. Not >=
    # global: measured 0.6864 vs 0.6902, the largest loss a query whose photo of the
    # orange peppers' stall verifies (60 inliers) with a green pepper held in front of it.
    assert scores["produce"][0] >= scores["produce"][1] - 0.005, scores
    assert (tmp_path / "calibration.json").exists()
    from tests.test_report import Page  # the report is on by default with ground truth: the 20 worst queries

    page = Page((tmp_path / "report.html").read_text())
    assert len(page.rows) == 20 and page.svgs == 2
    assert page.images and all((tmp_path / src).is_file() for src in page.images)


# Unrelated products: 10 DVD covers without the printed Blu-ray banner (covers that share it,
# or two variants of one brand's carton, share a printed design and rightly verify on it) and
# the product shots of 10 training classes of different brands and kinds.
UNRELATED_COVERS = ["dvd_060", "dvd_062", "dvd_066", "dvd_067", "dvd_073", "dvd_075", "dvd_080", "dvd_083",
                    "dvd_087", "dvd_093"]
UNRELATED_CLASSES = ["038", "042", "044", "049", "006", "010", "016", "023", "061", "067"]


def catalogue_shots() -> dict[str, np.ndarray]:
    """10 DVD cover scans and 10 iconic grocery product shots, each scaled to 300 px and pasted
    at the same place of one 1000 x 800 white canvas."""
    covers = [SHARED / "smvs_dvd" / "test" / "test_data" / "reference" / f"{n}.jpg" for n in UNRELATED_COVERS]
    icons = [DATA / "train" / "train_data" / c / "iconic.jpg" for c in UNRELATED_CLASSES]
    shots = {}
    for path in covers + icons:
        rgb = read_image(path)
        rgb = cv2.resize(rgb, None, fx=300 / max(rgb.shape[:2]), fy=300 / max(rgb.shape[:2]))
        canvas = np.full((800, 1000, 3), 255, np.uint8)
        canvas[250:250 + rgb.shape[0], 350:350 + rgb.shape[1]] = rgb
        shots[path.parent.name if path.stem == "iconic" else path.stem] = canvas
    return shots


@pytest.mark.skipif(not (SHARED / "smvs_dvd").is_dir(), reason="needs ../shared/data/smvs_dvd too")
def test_unrelated_white_background_shots_never_verify(weights_cache):
    shots = catalogue_shots()
    assert len(shots) == 20
    local_conf = resolve(local_extract.default_conf, local_extract.confs, "delf-lite0")
    backend = DenseLite0(local_conf, weights_cache)
    raw = {n: local_extract._describe_raw(backend, rgb, [0]) for n, rgb in shots.items()}
    pca = learn_pca_whitening(np.concatenate([f["descriptors"] for f in raw.values()]), 40, shrinkage=1.0)
    refs = {n: local_extract._finish(f, pca) for n, f in raw.items()}
    queries = {n: local_extract.describe(backend, rgb, local_conf["query_rotations"], pca,
                                         local_conf["rotated_scales"]) for n, rgb in shots.items()}
    conf = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv")
    counts = {(a, b): verify.verify_pair(queries[a], refs[b], conf) for a in shots for b in shots}
    wrong = {pair: n for pair, n in counts.items() if pair[0] != pair[1] and n > calibrate.DEFAULT["min_inliers"]}
    assert not wrong
    # a copy verifies, unless the product is too smooth to have keypoints (an orange on white:
    # verification abstains and the global descriptor decides)
    textured = [n for n in shots if len(refs[n]["keypoints_xy"]) >= 40]
    assert len(textured) >= 15
    assert all(counts[(n, n)] > calibrate.DEFAULT["min_inliers"] for n in textured)
