"""Real photos (../shared/data/smvs_dvd): the full default pipeline. Slow (about 10 minutes on
2 cores with an empty cache); `.ci/run` runs it where the data set exists."""

import json
from pathlib import Path

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
    assert metrics["rerank"]["mAP"] >= 0.95
    assert metrics["rerank"]["mAP"] > metrics["global"]["mAP"] + 0.3
