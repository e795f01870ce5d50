"""Chains the stages: global ranking -> local features -> geometric reranking, then writes
rankings, hackathon results and metrics. Each stage's features live in the cache, so any
stage can be rerun alone."""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.global_embed import extract as global_extract
from stages.global_embed import search as global_search
from stages.global_embed.whitening import apply_whitening, learn_pair_whitening, learn_pca_whitening
from stages.local_delf import extract as local_extract

from . import logger
from .cache import FeatureStore, atomic_write_json
from .conf import conf_hash
from .dataset import Dataset
from .evaluate import evaluate
from .extraction import load_from_store
from .outputs import order_to_names, write_rankings

STAGES = ("global", "local", "rerank")


@dataclass
class RunConfig:
    """Everything a run needs besides the data: the resolved stage confs and the knobs."""

    stages: tuple[str, ...] = STAGES
    global_conf: dict = field(default_factory=lambda: dict(global_extract.default_conf, name="lite0-gem"))
    local_conf: dict = field(default_factory=lambda: dict(local_extract.default_conf, name="delf-lite0"))
    rerank_conf: dict | None = None
    top_k: int = 100
    whitening: str = "auto"  # auto | learned | pca | none
    whiten_dim: int = 512
    query_regions: bool = True
    cache: Path = Path("cache")
    overwrite: bool = False

    def as_dict(self) -> dict:
        return {"stages": list(self.stages), "global": self.global_conf, "local": self.local_conf,
                "rerank": self.rerank_conf, "top_k": self.top_k, "whitening": self.whitening,
                "whiten_dim": self.whiten_dim, "query_regions": self.query_regions}


def train_images(dataset: Dataset) -> tuple[dict[str, Path], dict[str, str]]:
    """Training images keyed ``train:<class>/<stem>`` (unique across classes) and their class."""
    images, labels = {}, {}
    for label, paths in dataset.train.items():
        for path in paths:
            key = f"train:{label}/{path.stem}"
            images[key], labels[key] = path, label
    return images, labels


def learn_whitening(mode: str, dim: int, ref_desc: np.ndarray, train_desc: np.ndarray | None,
                    train_labels) -> tuple[str, dict | None]:
    """Chooses and learns the whitening of `mode`.

    "auto" learns from matching pairs of the training classes when there are any, and
    applies none otherwise; "learned" demands training pairs; "pca" learns PCA whitening
    on the references (unsupervised).

    Returns:
        (the mode applied, whitening dict or None).

    Raises:
        ValueError: "learned" without a class that has two training images.
    """
    has_pairs = train_desc is not None and len(train_desc) > 1 and len(set(train_labels)) < len(train_labels)
    if mode == "learned" or (mode == "auto" and has_pairs):
        if not has_pairs:
            raise ValueError("--whitening learned needs train/train_data/<class>/ with 2+ images in a class")
        return "learned", learn_pair_whitening(train_desc, train_labels, dim)
    if mode == "pca":
        return "pca", learn_pca_whitening(ref_desc, dim, shrinkage=0.5)
    return "none", None


def rank_globally(query_names, ref_names, features: dict, whitening: dict | None = None,
                  query_regions: bool = True):
    """Ranks every reference for every query by global descriptor similarity.

    References without a descriptor (unreadable) are ranked last, in name order; a query
    without one gets the references in name order.

    Args:
        query_names: [Q] names; ref_names: [R] names.
        features: {name: {"descriptor": float32 [D], "region_descriptors": [G, D]}} for
            the readable images.
        whitening: applied to every descriptor when given (`apply_whitening`).
        query_regions: score a reference by the best of the query's region descriptors.

    Returns:
        (order int32 [Q, R], scores float32 [Q, R]; -inf where no score exists).
    """
    ok_refs = np.array([i for i, n in enumerate(ref_names) if n in features], dtype=np.int64)
    ok_queries = np.array([i for i, n in enumerate(query_names) if n in features], dtype=np.int64)
    order = np.tile(np.arange(len(ref_names), dtype=np.int32), (len(query_names), 1))
    scores = np.full(order.shape, -np.inf, np.float32)
    if len(ok_refs) == 0 or len(ok_queries) == 0:
        return order, scores
    key = "region_descriptors" if query_regions else "descriptor"
    ref_desc = np.stack([features[ref_names[i]]["descriptor"] for i in ok_refs])
    query_desc = np.stack([np.atleast_2d(features[query_names[i]][key]) for i in ok_queries])
    if whitening is not None:
        ref_desc = apply_whitening(ref_desc, whitening)
        query_desc = apply_whitening(query_desc.reshape(-1, query_desc.shape[-1]), whitening).reshape(
            query_desc.shape[0], query_desc.shape[1], -1)
    sub_order, sub_scores = global_search.rank_all(query_desc, ref_desc)
    failed_refs = np.setdiff1d(np.arange(len(ref_names)), ok_refs).astype(np.int32)
    n_ok = len(ok_refs)
    order[ok_queries[:, None], np.arange(n_ok)] = ok_refs[sub_order]
    order[ok_queries[:, None], np.arange(n_ok, len(ref_names))] = failed_refs
    scores[ok_queries[:, None], np.arange(n_ok)] = sub_scores
    return order, scores


def run(dataset: Dataset, out_dir: Path, rc: RunConfig) -> dict:
    """Runs the requested stages on `dataset` and writes the outputs to `out_dir`.

    Writes ``rankings.json``, ``nsml_results.json``, ``config.json``, ``skipped.json``,
    ``global_ranking.npz``, ``pairs-global-top{k}.txt`` and, with ground truth,
    ``metrics.json`` ({stage: metrics}).

    Returns:
        {"metrics": {stage: metrics} (empty without ground truth), "timings": {stage: s},
         "skipped": {"queries": {...}, "references": {...}}, "rankings": final rankings}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    query_names, ref_names = list(dataset.queries), list(dataset.references)
    atomic_write_json(out_dir / "config.json", {"data": str(dataset.root), **rc.as_dict()})
    timings, rankings_by_stage = {}, {}

    start = time.perf_counter()
    train, labels = train_images(dataset) if rc.whitening in ("auto", "learned") else ({}, {})
    images = {**dataset.images, **train}
    store_dir = global_extract.main(rc.global_conf, images, rc.cache, rc.overwrite)
    features, errors = load_from_store(FeatureStore.open(store_dir), images, images)
    ok_train = [k for k in train if k in features]
    applied, whitening = learn_whitening(
        rc.whitening, rc.whiten_dim,
        np.stack([features[n]["descriptor"] for n in ref_names if n in features] or [np.zeros(1)]),
        np.stack([features[k]["descriptor"] for k in ok_train]) if ok_train else None,
        [labels[k] for k in ok_train])
    logger.info("global whitening: %s", applied)
    order, scores = rank_globally(query_names, ref_names, features, whitening, rc.query_regions)
    ranking_path, pairs_path = global_search.write_ranking(
        out_dir, query_names, ref_names, order, scores, rc.top_k, {q for q in query_names if q not in features})
    timings["global"] = time.perf_counter() - start
    rankings_by_stage["global"] = order

    if "local" in rc.stages:
        start = time.perf_counter()
        local_dir = local_extract.main(rc.local_conf, pairs_path, dataset.images, rc.cache, rc.overwrite)
        timings["local"] = time.perf_counter() - start
        logger.info("local features in %s", local_dir)

    skipped = {"queries": {n: errors[n] for n in query_names if n in errors},
               "references": {n: errors[n] for n in ref_names if n in errors}}
    atomic_write_json(out_dir / "skipped.json", skipped)

    final = order_to_names(rankings_by_stage[list(rankings_by_stage)[-1]], query_names, ref_names)
    write_rankings(out_dir, final)
    metrics = {}
    if dataset.ground_truth is not None:
        for stage, stage_order in rankings_by_stage.items():
            metrics[stage] = evaluate(order_to_names(stage_order, query_names, ref_names), dataset.ground_truth)
        atomic_write_json(out_dir / "metrics.json", {"metrics": metrics, "timings_s": timings})
    return {"metrics": metrics, "timings": timings, "skipped": skipped, "rankings": final,
            "pairs": pairs_path, "config_hash": conf_hash(rc.as_dict())}
