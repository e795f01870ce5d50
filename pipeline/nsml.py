"""The NAVER AI Hackathon 2018 (NSML) hook: ``bind_model`` registers save / load / infer.

The platform calls ``infer(queries, db)`` with image paths and scores the returned
``[(i, (query_name, [reference names, best first])), ...]`` by mAP. Names are file names
without extension. ``save(dir)`` / ``load(dir)`` store and restore what inference needs
beyond the code: a trained model directory, if one is in use (``run_pipeline.py train``).
"""

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from stages.common.dataset import Dataset
from stages.common.images import is_image_file

from .outputs import nsml_results
from .run import RunConfig, run

_state = {"config": RunConfig(), "model_dir": None}


def configure(config: RunConfig | None = None, model_dir: Path | None = None) -> None:
    """Sets the run config and (optionally) the trained model directory used by `infer`."""
    if config is not None:
        _state["config"] = config
    if model_dir is not None:
        _state["model_dir"] = Path(model_dir)


def _named(paths) -> dict[str, Path]:
    out = {}
    for p in sorted(Path(p) for p in paths):
        if p.stem in out:
            raise ValueError(f"two images share the name {p.stem!r}: {out[p.stem]} and {p}")
        out[p.stem] = p
    return out


def infer(queries, db=None, output_dir: Path | None = None) -> list[tuple[int, tuple[str, list[str]]]]:
    """Ranks every reference for every query, in the hackathon's return format.

    Args:
        queries: query image paths, or a data folder in the hackathon layout (then `db`
            is ignored and both sides are read from it).
        db: reference image paths; None reads the ``reference`` folder beside the
            queries' folder (what the hackathon baseline did).
        output_dir: where the run writes its files (a temporary folder by default).

    Returns:
        [(i, (query name, [every reference name, best first])), ...], i = 0..Q-1.
    """
    from stages.common.dataset import load_dataset

    if isinstance(queries, (str, Path)) and Path(queries).is_dir():
        dataset = load_dataset(queries)
    else:
        queries = [Path(q) for q in queries]
        if db is None:
            ref_dir = queries[0].parent.parent / "reference"
            db = [p for p in ref_dir.iterdir() if is_image_file(p)]
        dataset = Dataset(root=queries[0].parent.parent, queries=_named(queries), references=_named(db))
    config = _state["config"]
    if _state["model_dir"] is not None:
        config = replace(config, global_conf={**config.global_conf, "weights_dir": str(_state["model_dir"])},
                         local_conf={**config.local_conf, "weights_dir": str(_state["model_dir"])})
    with tempfile.TemporaryDirectory() as tmp:
        result = run(dataset, Path(output_dir or tmp), config)
    return nsml_results(result["rankings"])


def save(dir_name) -> None:
    """Stores the trained model directory in use (nothing to store without one)."""
    target = Path(dir_name)
    target.mkdir(parents=True, exist_ok=True)
    if _state["model_dir"] is not None:
        # The resume checkpoint (optimiser state) is not needed for inference.
        shutil.copytree(_state["model_dir"], target / "model", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("checkpoint"))


def load(dir_name) -> None:
    """Restores what `save` stored; a directory without a model keeps the ImageNet default."""
    model = Path(dir_name) / "model"
    _state["model_dir"] = model if model.is_dir() else None


def bind_model(nsml_module=None) -> None:
    """Registers save / load / infer with NSML (``nsml.bind``); a no-op outside NSML."""
    if nsml_module is None:
        try:
            import nsml as nsml_module  # only present on the NSML platform
        except ImportError:
            return
    nsml_module.bind(save=save, load=load, infer=infer)
