"""`run_pipeline.py --engine ray`: the demo ranked by Ray workers gives the local engine's
rankings, and without Ray installed the command says how to install it."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_engine_ray_without_ray_says_how_to_install_it(tmp_path):
    # `import ray` fails in the child as it does where Ray is not installed (None in sys.modules)
    code = ("import sys; sys.modules['ray'] = None; from pipeline.cli import main; "
            f"sys.exit(main(['--engine', 'ray', '--cache', {str(tmp_path / 'cache')!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "pip install -r requirements-ray.txt" in done.stderr
    assert not (tmp_path / "cache").exists(), "nothing should run before the engine is known to be usable"


def test_ray_options_need_the_ray_engine(capsys):
    from pipeline.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--ray-address", "auto"])
    assert exit_info.value.code == 2
    assert "--engine ray" in capsys.readouterr().err


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements-ray.txt)")
    ray.init(num_cpus=2, include_dashboard=False)
    yield ray
    ray.shutdown()


def test_the_ray_engine_ranks_the_demo_as_the_local_engine(local_ray, demo_data, weights_cache, tmp_path):
    """The demo plus an unreadable query and reference (skipped by the stage code on a worker
    as in one process), with upright queries only (a quarter of the local-feature time)."""
    from pipeline.cli import main

    shutil.copytree(demo_data, tmp_path / "demo")
    for kind in ("query", "reference"):
        (tmp_path / "demo" / "test" / "test_data" / kind / f"broken_{kind}.jpg").write_bytes(b"\xff\xd8 not a JPEG")
    data = ["--data", str(tmp_path / "demo"), "--query-rotations", "0"]
    assert main([*data, "--cache", str(weights_cache), "--output", str(tmp_path / "local")]) == 0
    # A cache of its own (the converted weights copied), so that the Ray workers compute every feature.
    ray_cache = tmp_path / "ray-cache"
    shutil.copytree(weights_cache / "weights", ray_cache / "weights")
    assert main([*data, "--engine", "ray", "--cache", str(ray_cache), "--output", str(tmp_path / "ray")]) == 0

    local = json.loads((tmp_path / "local" / "rankings.json").read_text())
    assert json.loads((tmp_path / "ray" / "rankings.json").read_text()) == local
    skipped = json.loads((tmp_path / "ray" / "skipped.json").read_text())
    assert skipped == json.loads((tmp_path / "local" / "skipped.json").read_text())
    assert (list(skipped["queries"]), list(skipped["references"])) == (["broken_query"], ["broken_reference"])
    assert local["broken_query"] == sorted(local["broken_query"])
    assert all(ranked[-1] == "broken_reference" for q, ranked in local.items() if q != "broken_query")
    from stages.common.cache import FeatureStore

    for stage in ("global", "local", "rerank"):  # written by the workers, every query in each store
        (folder,) = (ray_cache / stage).iterdir()
        store = FeatureStore.open(folder)
        assert all(query in store for query in local if query != "broken_query"), stage
