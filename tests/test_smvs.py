"""Real photos (../shared/data/smvs_dvd): the full default pipeline, also with every query
turned upside down. Slow (about 10 minutes on 2 cores with an empty cache); `.ci/run` runs it
where the data set exists."""

import json
from pathlib import Path

import cv2
import pytest

from pipeline.cli import main

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "smvs_dvd"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present")]


def test_default_pipeline_on_smvs_dvd(tmp_path, weights_cache):
    assert main(["--data", str(DATA), "--output", str(tmp_path), "--cache", str(weights_cache)]) == 0
    rankings = json.loads((tmp_path / "rankings.json").read_text())
    references = sorted(p.stem for p in (DATA / "test/test_data/reference").iterdir())
    assert len(rankings) == 100
    assert all(sorted(r) == references for r in rankings.values())
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert metrics["rerank"]["mAP"] >= 0.99
    assert metrics["rerank"]["mAP"] > metrics["global"]["mAP"] + 0.3
    stats = json.loads((tmp_path / "verification_stats.json").read_text())
    assert stats["roc_auc_inliers"] > 0.9 and stats["true_pairs"] > 0


def upside_down_copy(root: Path) -> Path:
    """smvs_dvd with every query photo turned by 180 degrees (references, training classes
    and ground truth linked, not copied)."""
    (root / "test" / "test_data" / "query").mkdir(parents=True)
    (root / "train").symlink_to(DATA / "train")
    (root / "test" / "test_data" / "reference").symlink_to(DATA / "test" / "test_data" / "reference")
    (root / "test" / "ground_truth.csv").symlink_to(DATA / "test" / "ground_truth.csv")
    for path in sorted((DATA / "test" / "test_data" / "query").iterdir()):
        image = cv2.rotate(cv2.imread(str(path)), cv2.ROTATE_180)
        assert cv2.imwrite(str(root / "test" / "test_data" / "query" / path.name), image,
                           [cv2.IMWRITE_JPEG_QUALITY, 95])
    return root


def test_upside_down_queries_still_find_their_covers(tmp_path, weights_cache):
    data = upside_down_copy(tmp_path / "data")
    assert main(["--data", str(data), "--output", str(tmp_path / "out"), "--cache", str(weights_cache)]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())["metrics"]
    assert metrics["rerank"]["mAP"] >= 0.99
