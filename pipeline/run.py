"""Chains the stages: global ranking -> local features -> geometric reranking, then writes
rankings, hackathon results and metrics. Each stage's features live in the cache, so any
stage can be rerun alone."""

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.global_embed import extract as global_extract
from stages.global_embed import search as global_search
from stages.global_embed.whitening import apply_whitening, learn_cached, learn_pair_whitening, learn_pca_whitening
from stages.local_delf import extract as local_extract
from stages.rerank import merge as rerank_merge
from stages.rerank import verify as rerank_verify

from . import logger
from .cache import FeatureStore, atomic_write_json, remove_stale_temp_files
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
    rerank_conf: dict = field(default_factory=lambda: dict(rerank_verify.default_conf, name="mnn-affine-opencv"))
    workers: int = 2
    top_k: int = 100
    expand_to: int = 300  # verify deeper, window by window, for queries left unverified
    expand_below: int = 30  # "unverified": the best shortlisted reference has fewer inliers
    whitening: str = "auto"  # auto | learned | pca | none
    whiten_dim: int = 512
    query_regions: bool = True
    cache: Path = Path("cache")
    overwrite: bool = False

    def as_dict(self) -> dict:
        return {"stages": list(self.stages), "global": self.global_conf, "local": self.local_conf,
                "rerank": self.rerank_conf, "top_k": self.top_k, "expand_to": self.expand_to,
                "expand_below": self.expand_below, "whitening": self.whitening,
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
                    train_labels, cache_dir: Path | None = None) -> tuple[str, dict | None]:
    """Chooses and learns the whitening of `mode`.

    "auto" learns from matching pairs of the training classes when there are any, and
    applies none otherwise (`run` also picks none with a trained model); "learned"
    demands training pairs; "pca" learns PCA whitening on the references (unsupervised).
    With `cache_dir`, a whitening learned before from the same descriptors is read back
    instead (`learn_cached`).

    Returns:
        (the mode applied, whitening dict or None).

    Raises:
        ValueError: "learned" without a class that has two training images.
    """
    has_pairs = train_desc is not None and len(train_desc) > 1 and len(set(train_labels)) < len(train_labels)
    if mode == "learned" or (mode == "auto" and has_pairs):
        if not has_pairs:
            raise ValueError("--whitening learned needs train/train_data/<class>/ with 2+ images in a class")
        return "learned", learn_cached(cache_dir, learn_pair_whitening, train_desc, list(train_labels), dim)
    if mode == "pca":
        if len(ref_desc) < 2:
            logger.warning("PCA whitening needs 2+ readable references, %d found: no whitening", len(ref_desc))
            return "none", None
        return "pca", learn_cached(cache_dir, learn_pca_whitening, ref_desc, dim, shrinkage=0.5)
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


def verify_with_expansion(rc: RunConfig, dataset: Dataset, out_dir: Path, pairs_path: Path, local_dir: Path,
                          order: np.ndarray, query_names: list[str], ref_names: list[str], timings: dict,
                          unreadable: set[str] = frozenset(), backend: local_extract.LazyBackend | None = None):
    """Stage 3 on the top-k shortlist, then on deeper windows for the queries it left unverified.

    A query none of whose top-k references reaches `expand_below` inliers probably has its
    match further down the global ranking (a weak global descriptor, a small or sideways product):
    the next `top_k` references of such queries are given local features and verified too,
    window after window, down to rank `expand_to`. Each window is a shortlist file
    ``pairs-global-top{k}-window{start}.txt`` next to the first; `unreadable` references
    (ranked last) are never verified.

    Returns:
        ({query: {reference: inliers}} over every verified pair, depth): the ranks below
        `depth` (>= top_k) were verified for no query.
    """
    inliers: dict[str, dict[str, int]] = {}
    window, start_rank, depth = pairs_path, 0, rc.top_k
    row = {q: i for i, q in enumerate(query_names)}
    shortlisted = list(global_search.read_pairs(pairs_path))
    readable_refs = [r for r in ref_names if r not in unreadable]
    n_readable = len(readable_refs)
    while True:
        start = time.perf_counter()
        inlier_dir = rerank_verify.main(rc.rerank_conf, window, local_dir, rc.cache, rc.overwrite, rc.workers)
        for query, counts in rerank_merge.load_inliers(inlier_dir, window).items():
            inliers.setdefault(query, {}).update(counts)
        timings["rerank"] = timings.get("rerank", 0.0) + time.perf_counter() - start
        unverified = [q for q in shortlisted if max(inliers.get(q, {}).values(), default=0) < rc.expand_below]
        start_rank += rc.top_k
        if not unverified or start_rank >= min(rc.expand_to, n_readable):
            if unverified:
                logger.info("%d queries still have no reference with %d+ inliers down to rank %d (their "
                            "references with %d+ inliers still go first)", len(unverified), rc.expand_below,
                            depth, rc.rerank_conf["merge"]["min_inliers"])
            return inliers, depth
        end_rank = min(start_rank + rc.top_k, rc.expand_to, len(ref_names))
        logger.info("%d queries have no reference with %d+ inliers in the top %d: verifying ranks %d-%d",
                    len(unverified), rc.expand_below, start_rank, start_rank + 1, end_rank)
        window = out_dir / f"pairs-global-top{rc.top_k}-window{start_rank}.txt"
        global_search.write_pairs(window, [(q, ref_names[j]) for q in unverified
                                           for j in order[row[q], start_rank:end_rank]
                                           if ref_names[j] not in unreadable])
        depth = end_rank
        start = time.perf_counter()
        local_extract.main(rc.local_conf, window, dataset.images, rc.cache, rc.overwrite, backend=backend,
                           references=readable_refs)
        timings["local"] = timings.get("local", 0.0) + time.perf_counter() - start


def report_skipped(store: FeatureStore, errors: dict[str, str], images: dict[str, Path], since: float) -> None:
    """Logs the unreadable images whose verdict came from the cache (entries written
    before `since`, a time.time()); those read in this run were logged as they failed."""
    for name, reason in errors.items():
        try:
            fresh = store.path(name).stat().st_mtime >= since
        except OSError:
            fresh = False
        if not fresh:
            logger.warning("skipping unreadable image %s: %s (recorded in the cache)", images[name], reason)


def run(dataset: Dataset, out_dir: Path, rc: RunConfig) -> dict:
    """Runs the requested stages on `dataset` and writes the outputs to `out_dir`.

    Writes ``rankings.json``, ``nsml_results.json``, ``config.json``, ``skipped.json``,
    ``global_ranking.npz``, ``pairs-global-top{k}.txt`` and, with ground truth,
    ``metrics.json`` ({stage: metrics}).

    Every query gets every reference exactly once. Unreadable images are listed in
    ``skipped.json`` ({"queries": {name: reason}, "references": {name: reason}}) and
    logged once each: an unreadable reference is ranked last (in name order) in every
    list and never verified; an unreadable query gets the references in name order. When
    the local stage cannot run (no readable pair, no reference with local features) the
    global ranking is kept, with a warning.

    Returns:
        {"metrics": {stage: metrics} (empty without ground truth), "timings": {stage: s},
         "skipped": {"queries": {...}, "references": {...}}, "rankings": final rankings}.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    query_names, ref_names = list(dataset.queries), list(dataset.references)
    atomic_write_json(out_dir / "config.json", {"data": str(dataset.root), **rc.as_dict()})
    timings, rankings_by_stage = {}, {}

    start, started_at = time.perf_counter(), time.time()
    whitening_mode = rc.whitening
    if whitening_mode == "auto" and rc.global_conf.get("weights_dir"):
        # A trained model's projection head is already learned on the training classes;
        # whitening learned again on those classes overfits them (smvs_dvd: mAP 0.68 -> 0.62).
        whitening_mode = "none"
    train, labels = train_images(dataset) if whitening_mode in ("auto", "learned") else ({}, {})
    images = {**dataset.images, **train}
    store_dir = global_extract.main(rc.global_conf, images, rc.cache, rc.overwrite)
    store = FeatureStore.open(store_dir)
    features, errors = load_from_store(store, images, images)
    report_skipped(store, errors, images, started_at)
    unreadable = set(errors)
    ok_train = [k for k in train if k in features]
    applied, whitening = learn_whitening(
        whitening_mode, rc.whiten_dim,
        np.stack([features[n]["descriptor"] for n in ref_names if n in features] or [np.zeros(1)]),
        np.stack([features[k]["descriptor"] for k in ok_train]) if ok_train else None,
        [labels[k] for k in ok_train], store_dir / "whitening")
    note = ""
    if applied == "none" and rc.whitening == "auto":
        note = (" (a trained model's projection head replaces it)" if whitening_mode == "none"
                else " (no training class with 2+ images to learn it from)")
    logger.info("global whitening: %s%s", applied, note)
    order, scores = rank_globally(query_names, ref_names, features, whitening, rc.query_regions)
    ranking_path, pairs_path = global_search.write_ranking(
        out_dir, query_names, ref_names, order, scores, rc.top_k, unreadable)
    timings["global"] = time.perf_counter() - start
    rankings_by_stage["global"] = order

    stages = rc.stages
    if len(stages) > 1 and not global_search.read_pairs(pairs_path):
        logger.warning("no readable query with a readable reference: local features and reranking skipped, "
                       "the global ranking is final")
        stages = ("global",)
    backend = local_extract.LazyBackend(rc.local_conf, rc.cache)  # shared by the shortlist windows
    if "local" in stages:
        start = time.perf_counter()
        try:
            local_dir = local_extract.main(rc.local_conf, pairs_path, dataset.images, rc.cache, rc.overwrite,
                                           backend=backend, references=[r for r in ref_names if r not in unreadable])
        except local_extract.PCAUnavailableError as e:
            logger.warning("%s: reranking skipped, the global ranking is final", e)
            stages = ("global",)
        timings["local"] = time.perf_counter() - start

    if "rerank" in stages:
        inliers, depth = verify_with_expansion(rc, dataset, out_dir, pairs_path, local_dir, order, query_names,
                                               ref_names, timings, unreadable, backend)
        merge = rc.rerank_conf["merge"]
        rankings_by_stage["rerank"] = rerank_merge.rerank(
            order, scores, rerank_merge.align_inliers(query_names, ref_names, order, inliers, depth),
            depth, merge["rule"], merge["min_inliers"], merge["weight"])

    skipped = {"queries": {n: errors[n] for n in query_names if n in errors},
               "references": {n: errors[n] for n in ref_names if n in errors}}
    atomic_write_json(out_dir / "skipped.json", skipped)
    if skipped["queries"] or skipped["references"]:
        logger.warning("%d unreadable queries (given the references in name order) and %d unreadable "
                       "references (ranked last): see %s", len(skipped["queries"]), len(skipped["references"]),
                       out_dir / "skipped.json")

    final = order_to_names(rankings_by_stage[list(rankings_by_stage)[-1]], query_names, ref_names)
    write_rankings(out_dir, final)
    metrics = {}
    if dataset.ground_truth is not None:
        for stage, stage_order in rankings_by_stage.items():
            metrics[stage] = evaluate(order_to_names(stage_order, query_names, ref_names), dataset.ground_truth)
        atomic_write_json(out_dir / "metrics.json", {"metrics": metrics, "timings_s": timings})
    return {"metrics": metrics, "timings": timings, "skipped": skipped, "rankings": final,
            "pairs": pairs_path, "config_hash": conf_hash(rc.as_dict())}
