"""Chains the stages: global descriptors -> global ranking -> local features -> geometric
verification -> merge, then writes the hackathon outputs and metrics. Each stage's `main`
returns the path of what it wrote, which is handed to the next (as hloc's pipelines do);
every stage caches its features, so any of them can be rerun alone."""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.common import logger
from stages.common.cache import atomic_write_json, remove_stale_temp_files
from stages.common.conf import conf_hash, resolve
from stages.common.dataset import Dataset
from stages.common.shortlist import RankingFile, read_pairs, read_ranking, write_pairs
from stages.global_embed import expansion as global_expansion
from stages.global_embed import extract as global_extract
from stages.global_embed import rank as global_rank
from stages.local_delf import extract as local_extract
from stages.rerank import calibrate as rerank_calibrate
from stages.rerank import inliers as rerank_inliers
from stages.rerank import merge as rerank_merge
from stages.rerank import verify as rerank_verify

from . import report as run_report
from .analysis import summary_line, verification_stats, verified_pairs
from .engines import Engine, LocalEngine
from .outputs import IN_MEMORY_NAMES, StreamedRankings, write_streamed

STAGES = ("global", "local", "rerank")


@dataclass
class RunConfig:
    """Everything a run needs besides the data: the resolved stage confs and the knobs."""

    stages: tuple[str, ...] = STAGES
    global_conf: dict = field(default_factory=lambda: resolve(global_extract.default_conf, global_extract.confs,
                                                              global_extract.DEFAULT_CONF))
    local_conf: dict = field(default_factory=lambda: dict(local_extract.default_conf, name="delf-lite0"))
    rerank_conf: dict = field(default_factory=lambda: dict(rerank_verify.default_conf, name="mnn-affine-opencv"))
    workers: int = 2
    top_k: int = 100
    # verify deeper, window by window, for queries left unverified; the global descriptor is not
    # rotation invariant (an upside-down smvs_dvd photo put its cover at rank 309 of 337)
    expand_to: int = 400
    expand_below: float = 0.5  # "unverified": no shortlisted reference is this likely the same product
    whitening: str = "auto"  # auto | learned | pca | none
    whiten_dim: int = 512
    query_regions: bool = True
    # DBA over the references and alpha-QE (`stages.global_embed.expansion`)
    expansion: dict = field(default_factory=lambda: dict(global_expansion.default_conf))
    cache: Path = Path("cache")
    overwrite: bool = False
    # learn the local-descriptor PCA again (`stages.local_delf.extract.PCASource`); it is kept
    # otherwise, so that adding references recomputes only their features
    relearn_pca: bool = False
    # queries shown in report.html (`pipeline.report`); 0: no report. The command line turns it
    # on for runs with ground truth; it changes no ranking, so it is not part of `as_dict`.
    report: int = 0

    @property
    def rank_conf(self) -> dict:
        """The conf of the global ranking step (`stages.global_embed.rank`)."""
        return {"name": self.whitening, "top_k": self.top_k, "keep": max(self.expand_to, self.top_k),
                "whitening": self.whitening,
                "whiten_dim": self.whiten_dim, "query_regions": self.query_regions, **self.expansion}

    def as_dict(self) -> dict:
        return {"stages": list(self.stages), "global": self.global_conf, "local": self.local_conf,
                "rerank": self.rerank_conf, "top_k": self.top_k, "expand_to": self.expand_to,
                "expand_below": self.expand_below, "whitening": self.whitening,
                "whiten_dim": self.whiten_dim, "query_regions": self.query_regions, "expansion": self.expansion}


def check_stages(stages) -> tuple[str, ...]:
    """Validates a stage combination: "global", then optionally "local", then "rerank", each
    needing the one before it (reranking verifies local features of the global shortlist).

    Raises:
        ValueError: an unknown stage, an empty tuple, or a stage without the one before it.
    """
    stages = tuple(stages)
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise ValueError(f"unknown stages {unknown or '(none given)'}; choose among {', '.join(STAGES)}")
    if stages != STAGES[:len(stages)]:
        missing = [s for s in STAGES[:STAGES.index(stages[-1])] if s not in stages]
        raise ValueError(f"stages {', '.join(stages)}: {stages[-1]} needs {', '.join(missing) or 'the stage order'} "
                         f"before it; run one of: global | global, local | global, local, rerank")
    return stages


def best_probability(calibration: dict, ranking: dict, row: dict, inliers: dict[str, dict[str, int]],
                     query: str) -> float:
    """The highest calibrated same-product probability among a query's verified references."""
    counts = inliers.get(query, {})
    if not counts:
        return 0.0
    i = row[query]
    names = ranking["ref_names"][ranking["order"][i]]
    scores = dict(zip(names.tolist(), ranking["scores"][i].tolist(), strict=True))
    refs = list(counts)
    return float(rerank_calibrate.probability(calibration, np.array([scores[r] for r in refs]),
                                              np.array([counts[r] for r in refs])).max())


def verify_with_expansion(rc: RunConfig, dataset: Dataset, out_dir: Path, ranking_path: Path, pairs_path: Path,
                          local_dir: Path, timings: dict, calibration: dict, unreadable: set[str] = frozenset(),
                          engine: Engine | None = None, pca_source=None) -> tuple[Path, list[Path]]:
    """Stage 3 on the top-k shortlist, then on deeper windows for the queries it left unverified.

    A query none of whose top-k references is likely the same product (calibrated
    probability below `expand_below`, see `stages.rerank.calibrate`) probably has its match
    further down the global ranking (a weak global descriptor, a small or sideways product):
    the next `top_k` references of such queries are given local features and verified too,
    window after window, down to rank `expand_to`. Each window is a shortlist file
    ``pairs-global-top{k}-window{start}.txt`` next to the first; `unreadable` references
    (ranked last) are never verified. `engine` runs the extraction and verification
    (default: a `LocalEngine` of `rc.workers`); `pca_source` is handed to the local stage.

    Returns:
        (the inlier cache folder, every shortlist file verified: the top-k one first,
         {query: {reference: inliers}} of those files, as `load_all_inliers` reads them).
    """
    engine = engine or LocalEngine(rc.workers)
    ranking = read_ranking(ranking_path)
    order, ref_names = ranking["order"], ranking["ref_names"].tolist()
    row = {q: i for i, q in enumerate(ranking["query_names"].tolist())}
    inliers: dict[str, dict[str, int]] = {}
    window, windows, start_rank, depth = pairs_path, [pairs_path], 0, rc.top_k
    shortlisted = list(read_pairs(pairs_path))
    n_readable = len([r for r in ref_names if r not in unreadable])
    while True:
        start = time.perf_counter()
        inlier_dir = engine.verify(rc.rerank_conf, window, local_dir, rc.cache, rc.overwrite)
        for query, counts in rerank_inliers.load_inliers(inlier_dir, window).items():
            inliers.setdefault(query, {}).update(counts)
        timings["rerank"] = timings.get("rerank", 0.0) + time.perf_counter() - start
        unverified = [q for q in shortlisted if rc.expand_below >= 1
                      or best_probability(calibration, ranking, row, inliers, q) < rc.expand_below]
        start_rank += rc.top_k
        if not unverified or start_rank >= min(rc.expand_to, n_readable):
            if unverified:
                logger.info("queries still without a reference of same-product probability %g+ down to rank %d: "
                            "%d", rc.expand_below, min(depth, n_readable), len(unverified))
            return inlier_dir, windows, inliers
        end_rank = min(start_rank + rc.top_k, rc.expand_to, len(ref_names))
        logger.info("queries without a reference of same-product probability %g+ in the top %d: %d; verifying "
                    "their ranks %d-%d", rc.expand_below, start_rank, len(unverified), start_rank + 1, end_rank)
        window = out_dir / f"pairs-global-top{rc.top_k}-window{start_rank}.txt"
        write_pairs(window, [(q, ref_names[j]) for q in unverified for j in order[row[q], start_rank:end_rank]
                             if ref_names[j] not in unreadable])
        windows.append(window)
        depth = end_rank
        start = time.perf_counter()
        engine.local_extract(rc.local_conf, window, dataset.images, rc.cache, rc.overwrite, pca_source=pca_source)
        timings["local"] = timings.get("local", 0.0) + time.perf_counter() - start


def calibrated(rc: RunConfig, stages) -> bool:
    """Whether this run fits the verification calibration: when it reranks (the calibrated
    probability decides the deeper windows, and the "calibrated" merge rule)."""
    return "rerank" in stages


def global_images(dataset: Dataset, rc: RunConfig, stages) -> dict[str, Path]:
    """The images stage 1 describes: queries and references, and the training images that
    the whitening or the verification calibration needs."""
    train, labels = dataset.training_images()
    if global_rank.needs_training_images(rc.rank_conf, rc.global_conf):
        return {**dataset.images, **train}
    if calibrated(rc, stages):
        classes = set(global_rank.calibration_classes(dataset, rc.global_conf))
        return {**dataset.images, **{k: p for k, p in train.items() if labels[k] in classes}}
    return dict(dataset.images)


def calibrate_verification(rc: RunConfig, dataset: Dataset, out_dir: Path, global_dir: Path, timings: dict,
                           pca_source, engine: Engine) -> Path | None:
    """Stages 1-3 on pairs of training images, then the calibration fitted on them
    (`stages.rerank.calibrate`).

    Returns:
        The ``calibration.json`` path, or None without usable training classes (the merge
        then applies `calibrate.DEFAULT`).
    """
    start = time.perf_counter()
    made = global_rank.calibration_pairs(rc.rank_conf, global_dir, dataset, out_dir,
                                         global_rank.calibration_classes(dataset, rc.global_conf))
    if made is None:
        return None
    pairs_path, arrays_path = made
    images = {**dataset.images, **dataset.training_images()[0]}
    local_dir = engine.local_extract(rc.local_conf, pairs_path, images, rc.cache, rc.overwrite,
                                     pca_source=pca_source)
    inlier_dir = engine.verify(rc.rerank_conf, pairs_path, local_dir, rc.cache, rc.overwrite)
    path = rerank_calibrate.main(rerank_calibrate.default_conf, arrays_path, inlier_dir, out_dir)
    timings["calibration"] = time.perf_counter() - start
    return path


def run(dataset: Dataset, out_dir: Path, rc: RunConfig, engine: Engine | None = None) -> dict:
    """Runs the requested stages on `dataset` and writes the outputs to `out_dir`.

    Writes ``rankings.json``, ``nsml_results.json``, ``config.json``, ``skipped.json``,
    ``global_ranking.npz``, ``pairs-global-top{k}.txt``, with reranking
    ``verification_stats.json`` (and, from training classes, ``pairs-calibration.txt``,
    ``calibration-pairs.npz`` and ``calibration.json``), with ground truth,
    ``metrics.json`` ({stage: metrics}) and, when ``rc.report`` > 0, ``report.html`` with
    its pictures in ``report_files/`` (`pipeline.report`), written last: a report that
    fails is logged and leaves every other output in place.

    Memory is bounded by a batch of queries, not by queries x references: stage 1 keeps
    each query's first ``max(expand_to, top_k)`` references (``global_ranking.npz``, with
    the descriptors that regenerate the rest), and ``rankings.json``,
    ``nsml_results.json`` and every stage's metrics are produced together a batch at a
    time (`outputs.write_streamed`).

    Every query gets every reference exactly once. Unreadable images are listed in
    ``skipped.json`` ({"queries": {name: reason}, "references": {name: reason}}) and
    logged once each: an unreadable reference is ranked last (in name order) in every
    list and never verified; an unreadable query gets the references in name order. When
    the local stage cannot run (no readable pair, no reference with local features) the
    global ranking is kept, with a warning.

    `engine` runs global extraction, local extraction and verification (`pipeline.engines`;
    default: a `LocalEngine` of `rc.workers`, i.e. this process); the rest runs here.

    Returns:
        {"metrics": {stage: metrics} (empty without ground truth), "timings": {stage: s},
         "skipped": {"queries": {...}, "references": {...}}, "rankings": the final rankings
         {query: [every reference, best first]} (a dict up to `outputs.IN_MEMORY_NAMES`
         query x reference names; above it an `outputs.StreamedRankings` mapping that
         regenerates a query's ranking when read, as rankings.json holds it),
         "verification": `analysis.verification_stats` or None without reranking,
         "report": the ``report.html`` path, or None (off, or it failed)}.

    Raises:
        ValueError: a stage combination `check_stages` refuses.
    """
    stages = check_stages(rc.stages)
    engine = engine or LocalEngine(rc.workers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    atomic_write_json(out_dir / "config.json", {"data": str(dataset.root), **rc.as_dict()})
    timings, verification = {}, None
    inlier_dir, windows, calibration, pairs_table = None, [], None, None

    start, started_at = time.perf_counter(), time.time()
    global_dir = engine.global_extract(rc.global_conf, global_images(dataset, rc, stages), rc.cache, rc.overwrite)
    ranking_path, pairs_path = global_rank.main(rc.rank_conf, global_dir, dataset, out_dir, since=started_at)
    timings["global"] = time.perf_counter() - start
    skipped = json.loads((out_dir / "skipped.json").read_text())
    unreadable = set(skipped["references"])

    if len(stages) > 1 and not read_pairs(pairs_path):
        logger.warning("no readable query with a readable reference: local features and reranking skipped, "
                       "the global ranking is final")
        stages = ("global",)
    pca_source = local_extract.pca_source(dataset, unreadable, started_at if rc.relearn_pca else None)
    if "local" in stages:
        start = time.perf_counter()
        try:
            local_dir = engine.local_extract(rc.local_conf, pairs_path, dataset.images, rc.cache, rc.overwrite,
                                             pca_source=pca_source)
        except local_extract.PCAUnavailableError as e:
            logger.warning("%s: reranking skipped, the global ranking is final", e)
            stages = ("global",)
        timings["local"] = time.perf_counter() - start

    if skipped["queries"] or skipped["references"]:
        logger.warning("%d unreadable queries (given the references in name order) and %d unreadable "
                       "references (ranked last): see %s", len(skipped["queries"]), len(skipped["references"]),
                       out_dir / "skipped.json")
    ranking = RankingFile(ranking_path)
    query_names, ref_names = ranking.query_names.tolist(), ranking.ref_names.tolist()
    ranked = ("global",)
    merger = None
    if "rerank" in stages:
        calibration = (calibrate_verification(rc, dataset, out_dir, global_dir, timings, pca_source, engine)
                       if dataset.train else None)
        inlier_dir, windows, inliers = verify_with_expansion(
            rc, dataset, out_dir, ranking_path, pairs_path, local_dir, timings, rerank_calibrate.read(calibration),
            unreadable, engine, pca_source)
        merger = rerank_merge.Merger(rc.rerank_conf["merge"], ranking_path, windows, inlier_dir, calibration,
                                     out_dir / global_rank.REFERENCE_DESCRIPTORS, inliers)
        ranked = ("global", "rerank")
    # rankings.json, nsml_results.json and the metrics of every stage, a batch of queries at a time
    start = time.perf_counter()
    in_memory = len(query_names) * len(ref_names) <= IN_MEMORY_NAMES
    streamed = write_streamed(out_dir, query_names, ref_names, stage_batches(ranking, merger), ranked,
                              dataset.ground_truth, keep=in_memory)
    logger.info("rankings.json, nsml_results.json and the metrics of %s: %d queries x %d references in %.1f s",
                " and ".join(ranked), len(query_names), len(ref_names), time.perf_counter() - start)
    if merger is not None:
        merger.log_expansion()
        # the merge's inlier counts, for verification_stats.json and the report
        pairs_table = verified_pairs(ranking_path, windows, inlier_dir, rerank_calibrate.read(calibration),
                                     merger.inliers)
        verification = verification_stats(ranking_path, windows, inlier_dir, calibration, dataset.ground_truth,
                                          out_dir / "verification_stats.json", pairs_table)
    if in_memory:
        rankings_by_stage = streamed["rankings"]
    else:
        rankings_by_stage = {"global": StreamedRankings(query_names, ref_names, lambda rows: ranking.full(rows)[0])}
        if merger is not None:
            rankings_by_stage["rerank"] = StreamedRankings(query_names, ref_names,
                                                           lambda rows: merger.merge(rows, *ranking.full(rows)))
    final = rankings_by_stage[ranked[-1]]

    metrics = {}
    if dataset.ground_truth is not None:
        metrics = streamed["metrics"]
        atomic_write_json(out_dir / "metrics.json", {"metrics": metrics, "timings_s": timings})
    report = None
    if rc.report > 0:
        summary = [f"{dataset.root}: {len(dataset.queries)} queries, {len(dataset.references)} references; "
                   f"stages {', '.join(stages)}; global {rc.global_conf['name']}, local {rc.local_conf['name']}, "
                   f"rerank {rc.rerank_conf['name']} (merge {rc.rerank_conf['merge']['rule']})"]
        if verification:
            summary.append(summary_line(verification))
        if skipped["queries"] or skipped["references"]:
            summary.append(f"unreadable: {len(skipped['queries'])} queries, {len(skipped['references'])} "
                           "references (skipped.json)")
        report = write_report(out_dir, rc.report, dataset, rankings_by_stage, metrics, timings, summary,
                              ranking_path, windows, inlier_dir, calibration, pairs_table,
                              streamed["aps"].get(ranked[-1]))
    return {"metrics": metrics, "timings": timings, "skipped": skipped, "rankings": final,
            "pairs": pairs_path, "config_hash": conf_hash(rc.as_dict()), "verification": verification,
            "report": report}


def stage_batches(ranking: RankingFile, merger: rerank_merge.Merger | None = None, batch: int = 128):
    """Yields (rows int [b], {"global": int32 [b, R], "rerank": int32 [b, R] with a
    `merger`}) over every query of `ranking`, `batch` at a time."""
    if merger is None:
        for rows, order, _ in ranking.batches(batch):
            yield rows, {"global": order}
    else:
        for rows, order, scores in ranking.batches(batch):
            yield rows, {"global": order, "rerank": merger.merge(rows, order, scores)}


def write_report(out_dir: Path, n_queries: int, dataset: Dataset, rankings_by_stage: dict, metrics: dict,
                 timings: dict, summary: list[str], ranking_path: Path, pairs_paths: list[Path],
                 inlier_dir: Path | None, calibration: Path | None, pairs_table: dict | None = None,
                 aps: dict[str, float] | None = None) -> Path | None:
    """Writes ``report.html`` (`pipeline.report`) after every other output of the run.

    Returns:
        Its path, or None when it failed: the error is logged (with its traceback) and a
        ``report.html`` left by an earlier run is deleted, so that it is not taken for this
        run's; the rankings and metrics, already written, are untouched.
    """
    start = time.perf_counter()
    try:
        data = run_report.collect(rankings_by_stage, dataset.images, n_queries, title=str(dataset.root),
                                  ground_truth=dataset.ground_truth, metrics=metrics, timings=timings,
                                  summary=summary, ranking_path=ranking_path, pairs_paths=pairs_paths,
                                  inliers_dir=inlier_dir, calibration_path=calibration, pairs_table=pairs_table,
                                  aps=aps)
        path = run_report.build_report(out_dir, data)
    except Exception as e:  # a report is a view of the outputs: never let it fail the run
        logger.error("report.html not written (%s: %s); rankings.json and the other outputs are complete",
                     type(e).__name__, e, exc_info=True)
        (Path(out_dir) / run_report.REPORT_FILE).unlink(missing_ok=True)
        return None
    logger.info("report of %d queries in %.1f s: %s", len(data.rows), time.perf_counter() - start, path)
    return path
