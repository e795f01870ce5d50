"""Every stage reruns alone from the command line, from cached inputs, and the chain of
stage commands gives the pipeline's rankings."""

import json

import pytest

from pipeline.run import RunConfig, check_stages, run
from stages.common.dataset import load_dataset
from stages.global_embed import extract as global_extract
from stages.global_embed import rank as global_rank
from stages.local_delf import extract as local_extract
from stages.rerank import merge as rerank_merge
from stages.rerank import verify as rerank_verify


def printed_paths(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def test_stage_commands_chain_to_the_pipeline_rankings(demo_data, weights_cache, tmp_path, capsys):
    cache = str(weights_cache)
    expected = run(load_dataset(demo_data), tmp_path / "pipeline", RunConfig(cache=weights_cache, workers=1))
    capsys.readouterr()
    out = tmp_path / "stages"

    global_extract.cli(["--data", str(demo_data), "--cache", cache])
    (global_dir,) = printed_paths(capsys)
    global_rank.cli(["--data", str(demo_data), "--features", global_dir, "--output", str(out)])
    ranking, pairs = printed_paths(capsys)
    assert ranking.endswith("global_ranking.npz") and pairs.endswith("pairs-global-top100.txt")
    local_extract.cli(["--data", str(demo_data), "--pairs", pairs, "--cache", cache])
    (local_dir,) = printed_paths(capsys)
    rerank_verify.cli(["--pairs", pairs, "--features", local_dir, "--cache", cache, "--workers", "1"])
    (inlier_dir,) = printed_paths(capsys)
    rerank_merge.cli(["--ranking", ranking, "--pairs", pairs, "--inliers", inlier_dir, "--output", str(out),
                      "--descriptors", str(out / "reference_descriptors.npz")])
    (rankings,) = printed_paths(capsys)

    assert json.loads(open(rankings).read()) == expected["rankings"]
    assert (out / "rankings.json").read_bytes() == (tmp_path / "pipeline" / "rankings.json").read_bytes()


@pytest.mark.parametrize("stages", [("global", "rerank"), ("local",), ("rerank", "global", "local"), (), ("glob",)])
def test_run_refuses_a_stage_combination_that_cannot_run(stages, tmp_path):
    with pytest.raises(ValueError):
        check_stages(stages)
    with pytest.raises(ValueError, match="stage"):
        run(load_dataset_stub(tmp_path), tmp_path / "out", RunConfig(stages=stages))
    assert not (tmp_path / "out").exists()


def load_dataset_stub(tmp_path):
    from stages.common.dataset import Dataset

    return Dataset(tmp_path, {"q": tmp_path / "q.jpg"}, {"r": tmp_path / "r.jpg"})


@pytest.mark.parametrize("stages", [("global",), ("global", "local"), ("global", "local", "rerank")])
def test_the_stage_prefixes_are_accepted(stages):
    assert check_stages(stages) == stages
