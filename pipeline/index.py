"""A persistent reference index, and new photos ranked against it.

`build` (``run_pipeline.py index --data DATA``) describes the references as the batch run
does (`pipeline.run`: the global conf, the whitening learned the same way, DBA over the
references), fits the verification calibration on the training classes as the batch run
does, learns the local-descriptor PCA, and saves into the index folder:

- ``index.json``: the run conf (`RunConfig.as_dict`), the cache folder, the global and
  local feature stores, the whitening applied and the post-processing conf, the faiss
  index kind, every reference with its image path, the unreadable ones and why;
- ``global.faiss``: the faiss index of the readable references (`stages.global_embed.ann`:
  exact ``IndexFlatIP`` below ``ann.default_conf["exact_below"]`` references, a 128-d PCA
  pre-search above, whose candidates are re-scored exactly);
- ``reference_descriptors.npy``: float32 [R', D] the readable references as ranked (whitened,
  after DBA), in faiss id order; ``reference_descriptors.npz``: the batch run's file of the
  same name (every reference, float16) for the verified query expansion;
- ``whitening.npz`` (when one is applied) and ``calibration.json`` (with training classes).

`query` (``run_pipeline.py query --index DIR IMAGE...``) ranks new photos without listing
the reference folder: their global descriptors as the batch run's queries (same conf,
whitening, query regions, alpha-QE), the faiss search, local features of the photos and
of their top-k references (references read from the cache, extracted from their stored
paths when missing), verification with the same deeper windows, and the merge with the
index's calibration (`pipeline.run.verify_with_expansion`, `stages.rerank.merge.main`).
Below ``exact_below`` references the ranking is the batch run's, every reference listed;
above it each photo gets its top ``depth`` references.
"""

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from stages.common import logger
from stages.common.cache import FeatureStore, atomic_save_npz, atomic_write_json, remove_stale_temp_files
from stages.common.extraction import load_from_store
from stages.common.images import is_image_file
from stages.common.shortlist import write_pairs
from stages.global_embed import ann
from stages.global_embed import rank as global_rank
from stages.local_delf import extract as local_extract
from stages.rerank import calibrate as rerank_calibrate
from stages.rerank import merge as rerank_merge

from .engines import Engine, LocalEngine
from .run import RunConfig, calibrate_verification, global_images, verify_with_expansion

INDEX_JSON = "index.json"
FAISS_FILE = "global.faiss"
DESCRIPTORS = "reference_descriptors.npy"
WHITENING = "whitening.npz"
CALIBRATION = "calibration.json"
VERSION = 1
# Above `ann.default_conf["exact_below"]` references a query lists its top `depth` only.
DEFAULT_DEPTH = 1000


class IndexFolderError(ValueError):
    """The index folder is missing, incomplete, or was built for other features."""


class QueryImageError(ValueError):
    """A query photo cannot be used: the message names the file and the reason."""


def _atomic_file(path: Path, write) -> None:
    """Calls write(temp path) in `path`'s folder, then renames the temp file onto `path`."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def config_from_dict(saved: dict, cache: Path) -> RunConfig:
    """The `RunConfig` of a saved ``RunConfig.as_dict()``."""
    return RunConfig(stages=tuple(saved["stages"]), global_conf=saved["global"], local_conf=saved["local"],
                     rerank_conf=saved["rerank"], top_k=saved["top_k"], expand_to=saved["expand_to"],
                     expand_below=saved["expand_below"], whitening=saved["whitening"],
                     whiten_dim=saved["whiten_dim"], query_regions=saved["query_regions"],
                     expansion=saved["expansion"], cache=Path(cache))


def build(dataset, out_dir: Path, rc: RunConfig, engine: Engine | None = None,
          ann_conf: dict | None = None, force_kind: str | None = None) -> Path:
    """Builds and saves the index of `dataset`'s references (see the module docstring).

    Args:
        dataset: a `stages.common.dataset.Dataset` (its queries are not described).
        out_dir: the index folder (created).
        rc: the run conf; the same as the batch run's gives the batch run's rankings.
        engine: runs the extraction and verification (default: `LocalEngine(rc.workers)`).
        ann_conf: `stages.global_embed.ann` conf (default `ann.default_conf`).
        force_kind: "flat" or "pca" instead of the size rule.

    Returns:
        The ``index.json`` path.

    Raises:
        ValueError: no readable reference; a whitening `learn_whitening` refuses.
    """
    engine = engine or LocalEngine(rc.workers)
    ann_conf = dict(ann.default_conf, **(ann_conf or {}))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out_dir)
    timings = {}
    start = time.perf_counter()
    images = {k: p for k, p in global_images(dataset, rc, rc.stages).items() if k not in dataset.queries}
    global_dir = engine.global_extract(rc.global_conf, images, rc.cache, rc.overwrite)
    store = FeatureStore.open(global_dir)
    train, labels = (dataset.training_images() if global_rank.needs_training_images(rc.rank_conf, store.conf)
                     else ({}, {}))
    features, errors, applied, whitening, expand = global_rank.learn_reference_side(
        rc.rank_conf, store, dataset.references, train, labels)
    ref_names = list(dataset.references)
    ok, ref_desc = global_rank.reference_descriptors(ref_names, features, whitening, expand)
    if len(ok) == 0:
        raise ValueError(f"{dataset.root}: no readable reference to index")
    logger.info("index: %d references (%d unreadable), whitening %s, post-processing %s", len(ref_names),
                len(errors), applied, expand)
    index = ann.build(ref_desc, ann_conf, force=force_kind)
    import faiss

    _atomic_file(out_dir / FAISS_FILE, lambda p: faiss.write_index(index, p))
    _atomic_file(out_dir / DESCRIPTORS, lambda p: np.save(p, ref_desc))
    ranked = np.zeros((len(ref_names), ref_desc.shape[1]), np.float32)
    ranked[ok] = ref_desc  # the batch run's reference_descriptors.npz (verified query expansion)
    atomic_save_npz(out_dir / global_rank.REFERENCE_DESCRIPTORS,
                    {"ref_names": np.array(ref_names, dtype=str), "descriptors": ranked.astype(np.float16)})
    if whitening is not None:
        atomic_save_npz(out_dir / WHITENING, whitening)
    timings["global"] = time.perf_counter() - start
    source = local_extract.pca_source(dataset, errors)
    calibration = None
    if "rerank" in rc.stages and dataset.train:
        calibration = calibrate_verification(rc, dataset, out_dir, global_dir, timings, source, engine)
    # The local store (its PCA learned now, as the batch run learns it) that queries use.
    # No reference is described here: a query extracts those it shortlists, once (they stay cached).
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        empty = Path(tmp) / "pairs-none.txt"
        write_pairs(empty, [])
        local_dir = engine.local_extract(rc.local_conf, empty, dataset.references, rc.cache, rc.overwrite,
                                         pca_source=source)
    meta = {
        "version": VERSION, "data": str(Path(dataset.root).resolve()), "config": rc.as_dict(),
        "cache": str(Path(rc.cache).resolve()), "global_store": str(Path(global_dir).resolve()),
        "local_store": str(Path(local_dir).resolve()), "pca_source": {"kind": source.kind, "dataset": source.dataset},
        "whitening": applied, "expansion": expand,
        "index": {"kind": "flat" if ann.is_exact(index) else "pca",
                  "factory": "Flat" if ann.is_exact(index) else ann.factory_string(ref_desc.shape[1], ann_conf),
                  "conf": ann_conf, "depth": DEFAULT_DEPTH},
        "calibration": CALIBRATION if calibration else None,
        "references": ref_names, "paths": [str(Path(dataset.references[r]).resolve()) for r in ref_names],
        "indexed": ok.tolist(), "unreadable": errors, "timings_s": timings,
    }
    path = out_dir / INDEX_JSON
    atomic_write_json(path, meta)
    logger.info("index of %d references (%s) in %.1f s -> %s", len(ok), meta["index"]["factory"],
                time.perf_counter() - start, out_dir)
    return path


@dataclass
class LoadedIndex:
    """An index folder read back (`load`)."""

    folder: Path
    meta: dict
    rc: RunConfig
    faiss_index: object
    ref_desc: np.ndarray  # float32 [R', D], memory-mapped
    whitening: dict | None

    @property
    def ref_names(self) -> list[str]:
        return self.meta["references"]


def load(folder: Path, cache: Path | None = None) -> LoadedIndex:
    """Reads an index folder written by `build`.

    Args:
        folder: the index folder.
        cache: the cache folder to use instead of the one the index was built with.

    Raises:
        IndexFolderError: a file is missing or unreadable, or of another version.
    """
    import faiss

    folder = Path(folder)
    try:
        meta = json.loads((folder / INDEX_JSON).read_text())
    except (OSError, ValueError) as e:
        raise IndexFolderError(f"{folder}: not an index folder ({INDEX_JSON}: {e}); build one with "
                          "`run_pipeline.py index --data DATA --output DIR`") from e
    if meta.get("version") != VERSION:
        raise IndexFolderError(f"{folder}: index version {meta.get('version')}, this code reads {VERSION}: rebuild it")
    try:
        index = faiss.read_index(str(folder / FAISS_FILE))
        ref_desc = np.load(folder / DESCRIPTORS, mmap_mode="r")
        whitening = dict(np.load(folder / WHITENING)) if (folder / WHITENING).exists() else None
    except (OSError, RuntimeError, ValueError) as e:
        raise IndexFolderError(f"{folder}: incomplete or damaged index ({e}); rebuild it") from e
    if index.ntotal != len(ref_desc) or len(ref_desc) != len(meta["indexed"]):
        raise IndexFolderError(f"{folder}: {FAISS_FILE} holds {index.ntotal} references, {DESCRIPTORS} "
                          f"{len(ref_desc)}, {INDEX_JSON} {len(meta['indexed'])}: rebuild it")
    rc = config_from_dict(meta["config"], cache or Path(meta["cache"]))
    return LoadedIndex(folder, meta, rc, index, ref_desc, whitening)


def query_names(paths) -> dict[str, Path]:
    """{name: path} of the photos to rank: the file stem, as the batch run names a query.

    Raises:
        QueryImageError: a path that is not an existing image file, or two with one stem.
    """
    out: dict[str, Path] = {}
    for path in map(Path, paths):
        if not path.is_file():
            raise QueryImageError(f"query image {path}: no such file")
        if not is_image_file(path):
            raise QueryImageError(f"query image {path}: not an image file name (jpg, jpeg, png, bmp, webp)")
        if path.stem in out:
            raise QueryImageError(f"query images {out[path.stem]} and {path} share the name {path.stem!r}")
        out[path.stem] = path
    return out


def global_shortlist(loaded: LoadedIndex, query_desc: np.ndarray, depth: int | None = None):
    """The global ranking of the queries against the index.

    Flat index: every reference, as the batch run's `rank_globally` ranks them (the
    unreadable ones last in name order, score -inf). PCA index: the union U of every
    query's top `depth` candidates (exactly re-scored), every query ranked over U.

    Returns:
        (reference names [R''] the ranking is over, order int32 [Q, R''], scores float32 [Q, R'']).
    """
    names = loaded.ref_names
    indexed = np.asarray(loaded.meta["indexed"], np.int64)
    ref_desc = np.asarray(loaded.ref_desc, np.float32) if ann.is_exact(loaded.faiss_index) else loaded.ref_desc
    if ann.is_exact(loaded.faiss_index):
        sub_order, sub_scores = ann.search_shortlist(loaded.faiss_index, ref_desc, query_desc, len(indexed))
        failed = np.setdiff1d(np.arange(len(names)), indexed).astype(np.int32)
        order = np.concatenate([indexed[sub_order].astype(np.int32),
                                np.broadcast_to(failed, (len(query_desc), len(failed)))], axis=1)
        scores = np.concatenate([sub_scores, np.full((len(query_desc), len(failed)), -np.inf, np.float32)], axis=1)
        return names, order, scores
    conf = loaded.meta["index"]["conf"]
    depth = depth or loaded.meta["index"]["depth"]
    ids, _ = ann.search_shortlist(loaded.faiss_index, ref_desc, query_desc, depth, conf)
    union = np.unique(ids[ids >= 0])
    from stages.global_embed import search

    order, scores = search.rank_all(query_desc, np.asarray(ref_desc[union], np.float32))
    return [names[i] for i in indexed[union]], order, scores


def query(loaded: LoadedIndex, photos, out_dir: Path, engine: Engine | None = None,
          depth: int | None = None) -> dict:
    """Ranks new photos against an index (see the module docstring).

    Writes into `out_dir` what the batch run writes for its queries: ``global_ranking.npz``,
    ``pairs-global-top{k}.txt`` (and deeper windows), ``rankings.json`` ({photo name:
    [references, best first]}) and ``skipped.json`` ({"queries": {name: reason}}).

    Args:
        loaded: `load` output.
        photos: image paths; each is named by its file stem.
        out_dir: output folder (created).
        engine: runs extraction and verification (default `LocalEngine(loaded.rc.workers)`).
        depth: PCA index: references listed per photo (default: the index's, 1000).

    Returns:
        {"rankings": {name: [references]}, "skipped": {name: reason}, "timings": {stage: s},
         "rankings_path": Path or None when no photo could be read}.

    Raises:
        QueryImageError: a path that is not an image file, or two photos with one stem.
        IndexFolderError: the cache's global features are not the index's (another conf).
    """
    rc = loaded.rc
    engine = engine or LocalEngine(rc.workers)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = query_names(photos)
    clash = sorted(set(images) & set(loaded.ref_names))
    if clash:  # a reference's cache entries are keyed by the same name
        raise QueryImageError(f"query images named like references of the index: {clash[:5]} "
                              f"({images[clash[0]]}); rename them")
    timings, start = {}, time.perf_counter()
    global_dir = engine.global_extract(rc.global_conf, images, rc.cache)
    if Path(global_dir).name != Path(loaded.meta["global_store"]).name:
        raise IndexFolderError(f"global features of the photos went to {global_dir}, the index was built from "
                          f"{loaded.meta['global_store']}: another global conf or model")
    features, skipped = load_from_store(FeatureStore.open(global_dir), images, images)
    for name, reason in skipped.items():
        logger.error("query image %s: %s", images[name], reason)
    names = [n for n in images if n in features]
    atomic_write_json(out_dir / "skipped.json", {"queries": skipped, "references": loaded.meta["unreadable"]})
    if not names:
        return {"rankings": {}, "skipped": skipped, "timings": timings, "rankings_path": None}
    query_desc = global_rank.query_descriptors([features[n] for n in names], np.asarray(loaded.ref_desc),
                                               loaded.whitening, rc.query_regions, loaded.meta["expansion"])
    ref_names, order, scores = global_shortlist(loaded, query_desc, depth)
    unreadable = set(loaded.meta["unreadable"])
    ranking_path, pairs_path = global_rank.write_ranking(out_dir, names, ref_names, order, scores, rc.top_k,
                                                         unreadable)
    exact = ann.is_exact(loaded.faiss_index)
    if exact:
        descriptors = loaded.folder / global_rank.REFERENCE_DESCRIPTORS
    else:
        descriptors = out_dir / global_rank.REFERENCE_DESCRIPTORS
        position = {n: i for i, n in enumerate(np.array(loaded.ref_names)[loaded.meta["indexed"]].tolist())}
        atomic_save_npz(descriptors, {"ref_names": np.array(ref_names, dtype=str), "descriptors": np.asarray(
            loaded.ref_desc[[position[n] for n in ref_names]], np.float16)})
    timings["global"] = time.perf_counter() - start
    rankings = {n: [ref_names[j] for j in order[i]] for i, n in enumerate(names)}
    if "local" in rc.stages:
        all_images = {**dict(zip(loaded.ref_names, map(Path, loaded.meta["paths"]), strict=True)), **images}
        pinned = loaded.meta.get("pca_source") or {"kind": "references", "dataset": loaded.meta["data"]}
        source = local_extract.PCASource(kind=pinned["kind"], dataset=pinned["dataset"])  # the PCA the index pinned
        start = time.perf_counter()
        local_dir = engine.local_extract(rc.local_conf, pairs_path, all_images, rc.cache, pca_source=source)
        timings["local"] = time.perf_counter() - start
        if Path(local_dir).name != Path(loaded.meta["local_store"]).name:
            logger.warning("local features in %s, the index used %s: the reference files changed since the "
                           "index was built (rebuild it for the same rankings)", local_dir,
                           loaded.meta["local_store"])
        if "rerank" in rc.stages:
            calibration = loaded.folder / CALIBRATION if loaded.meta.get("calibration") else None
            inlier_dir, windows, _ = verify_with_expansion(
                rc, SimpleNamespace(images=all_images), out_dir, ranking_path, pairs_path, Path(local_dir), timings,
                rerank_calibrate.read(calibration), unreadable, engine, source)
            path = rerank_merge.main(rc.rerank_conf["merge"], ranking_path, windows, inlier_dir, out_dir,
                                     calibration, descriptors)
            rankings = json.loads(Path(path).read_text())
    if not exact:
        depth = depth or loaded.meta["index"]["depth"]
        rankings = {q: refs[:depth] for q, refs in rankings.items()}
    rankings_path = out_dir / "rankings.json"
    atomic_write_json(rankings_path, rankings)
    return {"rankings": rankings, "skipped": skipped, "timings": timings, "rankings_path": rankings_path}

