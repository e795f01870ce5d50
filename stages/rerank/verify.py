"""Stage 3a: geometric verification of every shortlisted (query, reference) pair.

For each pair: putative matches between the two images' local descriptors (`matching`),
then a seeded RANSAC fit (`ransac`); the pair's score is the number of inliers of a
plausible model (`ransac.degeneracy`: no mirror, bounded scale and shear, inliers spread
over both images; an implausible one scores 0), maximised over the query's rotation groups
(stage 2 extracts a query at several rotations).

Geometry is measured in normalised image coordinates: keypoints are divided by their
image's longer side, so the RANSAC threshold is a fraction of the reference image and the
same photo stored at 400 px or 4000 px verifies the same way.

Output: a feature store ``<cache_root>/rerank/<conf name>-<hash>/`` with one entry per
query: ``ref_names`` str [K], ``inliers`` int32 [K] and ``ref_stamps`` str [K] (size and
mtime of each reference's local-feature file), stamped with the query's local-feature file,
and the inlier matches themselves, so that a report can draw them without matching again:
``match_counts`` int32 [K] (rows kept for each pair: its inlier count, or -1 for a pair
cached before matches were kept), ``match_query_xy`` and ``match_ref_xy`` float32 [M, 2]
(the inliers' keypoints, (x, y) in original query / reference pixels, pair after pair in
``ref_names`` order; M = the sum of the non-negative counts). The hash covers only the
matcher and RANSAC confs and the local-feature store's key, so the merge conf (rule,
min_inliers, weight) and the shortlist length can change without matching again; a rerun
computes only the pairs that are missing or whose local features changed. The matches do
not enter the hash: they add to an entry without changing its counts, so entries cached
before them stay valid (their pairs read as "matches not kept"; `--overwrite` recomputes).
"""

import functools
import time
from pathlib import Path

import numpy as np

from stages.common import logger, setup_logging
from stages.common.cache import FeatureStore, source_stamp
from stages.common.conf import conf_hash, resolve, stage_parser
from stages.common.progress import Progress
from stages.common.shortlist import read_pairs

from . import matching, merge, ransac
from .inliers import read_counts, split_matches

default_conf = {
    "matcher": {"method": "mutual_nn", "distance_threshold": 0.8, "ratio": 0.8},
    # threshold: reprojection error bound as a fraction of the reference's longer side
    # (0.04: 41 px at 1024 px; on smvs_dvd 0.02 left 25 of 100 true pairs under 30 inliers).
    "ransac": {"backend": "opencv", "model": "affine", "threshold": 0.04, "max_iters": 1000,
               "confidence": 0.999999, "refine_iters": 0, "seed": 0},
    # Plausible models only (`ransac.degeneracy`); scales in normalised coordinates.
    "checks": {"identity": 0.25, "identity_ratio": 0.5, "max_scale": 10.0, "max_anisotropy": 8.0,
               "min_spread": 0.05},
    # Not part of the cache key: the merge conf (`merge.default_conf`), applied after verification.
    "merge": dict(merge.default_conf),
}

confs = {
    "mnn-affine-opencv": {},
    "mnn-affine-skimage": {"ransac": {"backend": "skimage"}},
    "delf-affine-opencv": {"matcher": {"method": "distance"}},
    "delf-affine-skimage": {"matcher": {"method": "distance"}, "ransac": {"backend": "skimage"}},
    "ratio-affine-opencv": {"matcher": {"method": "ratio"}},
    "ratio-homography": {"matcher": {"method": "ratio"}, "ransac": {"model": "homography"}},
    "mnn-homography": {"ransac": {"model": "homography"}},
    "mnn-affine-weighted": {"merge": {"rule": "weighted"}},
}

VERIFY_KEYS = ("matcher", "ransac", "checks")
REF_CACHE_SIZE = 512  # prepared reference images kept per worker (about 0.5 MB each at 1000 x 128)

Group = tuple[np.ndarray, np.ndarray]  # (keypoints float32 [n, 2] normalised (x, y), descriptors float32 [n, D])
Matches = tuple[np.ndarray, np.ndarray]  # inlier keypoints float32 [n, 2] (x, y): (query's, reference's)
NO_MATCHES: Matches = (np.zeros((0, 2), np.float32), np.zeros((0, 2), np.float32))


def longer_side(feats: dict) -> float:
    """The unit of the normalised coordinates of a stage-2 entry: its image's longer side in
    pixels ("image_size"), without it the keypoints' own extent (1 without keypoints)."""
    size = feats.get("image_size")
    if size is not None:
        return float(max(size))
    xy = feats.get("keypoints_xy")
    return 1.0 if xy is None or len(xy) == 0 else float(np.ptp(xy, axis=0).max() + 1.0)


def prepare(feats: dict | None, split_rotations: bool) -> list[Group]:
    """Converts a local-feature entry once for many pairs: float32 C-contiguous arrays in
    normalised coordinates, split by rotation group.

    Args:
        feats: a stage-2 entry ({"keypoints_xy": float32 [N, 2] (x, y) pixels,
            "descriptors": float16/32 [N, D] unit rows, "image_size": int [2] (width,
            height), "rotations": int16 [N] optional}), an entry holding only "error", or
            None. Without "image_size" the keypoints' own extent stands for the image.
        split_rotations: one group per distinct rotation (queries) or one group of all
            keypoints (references).

    Returns:
        [(keypoints float32 [n, 2] (x, y) / longer image side, descriptors float32
        [n, D])], one per non-empty group; [] for an error entry, None or N = 0.
    """
    if feats is None or "descriptors" not in feats or len(feats["descriptors"]) == 0:
        return []
    xy = np.ascontiguousarray(np.asarray(feats["keypoints_xy"], np.float32) / longer_side(feats), np.float32)
    desc = matching.as_float32(feats["descriptors"])
    rot = feats.get("rotations")
    if not split_rotations or rot is None or np.all(rot == rot[0]):
        return [(xy, desc)]
    return [(np.ascontiguousarray(xy[rot == r]), np.ascontiguousarray(desc[rot == r])) for r in np.unique(rot)]


def verify_prepared(query: list[Group], ref: list[Group], conf: dict,
                    return_matches: bool = False) -> int | tuple[int, Matches]:
    """`verify_pair` on `prepare`d features (the reference as a single group).

    With `return_matches`, returns (inliers, (query points float32 [n, 2], reference points
    float32 [n, 2])): the inlier matches of the counted model, in the groups' normalised
    coordinates; both [0, 2] when the count is 0.
    """
    best, best_matches = 0, NO_MATCHES
    for q_xy, q_desc in query:
        for r_xy, r_desc in ref:
            pairs = matching.match(q_desc, r_desc, conf["matcher"])
            pts_q, pts_r = q_xy[pairs[:, 0]], r_xy[pairs[:, 1]]
            model, inliers = ransac.fit(pts_q, pts_r, conf["ransac"])
            n = int(inliers.sum())
            if n > best and not ransac.degeneracy(model, pts_q, pts_r, inliers, q_xy, r_xy, conf["checks"]):
                best = n
                if return_matches:
                    best_matches = (pts_q[inliers].astype(np.float32), pts_r[inliers].astype(np.float32))
    return (best, best_matches) if return_matches else best


def verify_pair(query_feats: dict, ref_feats: dict, conf: dict) -> int:
    """RANSAC inlier count of one image pair, the maximum over the query's rotation groups.

    Matching follows DELF (Noh et al., ICCV 2017; tensorflow/models research/delf
    ``detect_to_retrieve/image_reranking.py`` ``MatchFeatures``): nearest-neighbour
    putative matches, then an affine RANSAC whose inlier count scores the pair, 0 when
    there are too few matches or the model is implausible (`ransac.degeneracy`).

    Args:
        query_feats: stage-2 entry of the query: "keypoints_xy" float32 [N, 2] (x, y) in
            original query pixels, "descriptors" float16 [N, D] unit L2 rows,
            "image_size" int [2] (width, height), optional "rotations" int16 [N]
            (keypoints of each rotation group are matched separately); an entry with only
            "error" counts as N = 0.
        ref_feats: stage-2 entry of the reference (same layout, rotations ignored).
        conf: the stage conf (its "matcher", "ransac" and "checks" parts; the RANSAC
            threshold is a fraction of the reference's longer side).

    Returns:
        Number of inliers (>= 0); 0 when either image has no keypoints.

    Raises:
        ValueError: the two descriptor dimensions differ, or the conf names an unknown
            matcher, backend or model.
    """
    return verify_prepared(prepare(query_feats, True), prepare(ref_feats, False), conf)


def verify_conf(conf: dict) -> dict:
    """The part of a stage conf the inlier counts depend on (the cache key's conf)."""
    return {"name": conf.get("name", "rerank"), **{k: conf[k] for k in VERIFY_KEYS}}


def store_for(conf: dict, cache_root: Path, local_store: FeatureStore) -> FeatureStore:
    """The inlier cache of `conf` on the features of `local_store` (merge conf excluded)."""
    vconf = verify_conf(conf)
    key = conf_hash({k: vconf[k] for k in VERIFY_KEYS}, local_store.key)
    return FeatureStore(cache_root, "rerank", {**vconf, "local_features": str(local_store.dir)}, key)


@functools.cache
def _open_local(folder: str) -> FeatureStore:
    return FeatureStore.open(Path(folder))


def _read_local(folder: str, name: str) -> dict | None:
    try:
        return _open_local(folder).read(name)
    except (KeyError, ValueError) as e:
        logger.warning("local features of %s unusable: %s", name, e)
        return None


@functools.lru_cache(maxsize=REF_CACHE_SIZE)
def _prepared_ref(folder: str, name: str, stamp: str) -> tuple[list[Group], float] | None:
    # `stamp` (the file's size and mtime) is part of the key: a rewritten file is reread.
    feats = _read_local(folder, name)
    if feats is None:
        return None
    return prepare(feats, False), longer_side(feats)


def _verify_query(folder: str, query: str, refs: list[str], stamps: list[str],
                  conf: dict) -> tuple[np.ndarray, list[Matches | None]]:
    """Inlier counts of one query against `refs` (-1 where local features are missing) and
    the inlier matches of each pair in original pixels (None where the count is -1)."""
    feats = _read_local(folder, query)
    out, matches = np.full(len(refs), -1, np.int32), [None] * len(refs)
    if feats is None:
        return out, matches
    q = prepare(feats, True)
    q_side = longer_side(feats)
    for i, (ref, stamp) in enumerate(zip(refs, stamps, strict=True)):
        prepared = _prepared_ref(folder, ref, stamp)
        if prepared is not None:
            r, r_side = prepared
            out[i], (pts_q, pts_r) = verify_prepared(q, r, conf, return_matches=True)
            matches[i] = (pts_q * np.float32(q_side), pts_r * np.float32(r_side))
    return out, matches


class _Stamps(dict):
    """Size and mtime of each image's local-feature file, stat-ed once; "" when missing."""

    def __init__(self, local: FeatureStore):
        super().__init__()
        self.local = local

    def __missing__(self, name: str) -> str:
        path = self.local.path(name)
        self[name] = source_stamp(path) if path.exists() else ""
        return self[name]


def cached_pairs(store: FeatureStore, query: str, local: FeatureStore,
                 stamps: dict) -> dict[str, tuple[int, Matches | None]]:
    """{reference: (inliers, inlier matches in pixels or None where not kept)} cached for
    `query`, without the pairs whose local features changed since (or whose query entry is
    unreadable)."""
    source = local.path(query)
    if not source.exists():
        return {}
    entry = store.read_or_none(query, source)
    if entry is None:
        return {}
    return {str(r): (int(n), m) for r, n, s, m in zip(entry["ref_names"], entry["inliers"], entry["ref_stamps"],
                                                       split_matches(entry), strict=True) if stamps[r] == s}


def cached_inliers(store: FeatureStore, query: str, local: FeatureStore, stamps: dict) -> dict[str, int]:
    """{reference: inliers} cached for `query`, without the pairs whose local features
    changed since (or whose query entry is unreadable); reads no matches (`read_counts`)."""
    source = local.path(query)
    counts = read_counts(store, query, source) if source.exists() else None
    return {} if counts is None else {r: n for r, (n, s) in counts.items() if stamps[r] == s}


def entry_arrays(pairs: dict[str, tuple[int, Matches | None]], stamps: dict) -> dict[str, np.ndarray]:
    """The store entry of one query (see the module docstring) from {reference: (inliers,
    matches or None)} and {reference: local-feature file stamp}."""
    names = list(pairs)
    kept = [pairs[r][1] for r in names]
    rows = [m for m in kept if m is not None]
    return {
        "ref_names": np.array(names, dtype=str),
        "inliers": np.array([pairs[r][0] for r in names], np.int32),
        "ref_stamps": np.array([stamps[r] for r in names], dtype=str),
        "match_counts": np.array([-1 if m is None else len(m[0]) for m in kept], np.int32),
        "match_query_xy": np.concatenate([m[0] for m in rows] + [NO_MATCHES[0]]).astype(np.float32),
        "match_ref_xy": np.concatenate([m[1] for m in rows] + [NO_MATCHES[1]]).astype(np.float32),
    }


def pending_pairs(store: FeatureStore, local: FeatureStore, pairs: dict[str, list[str]],
                  overwrite: bool = False, stamps: dict | None = None) -> dict[str, list[str]]:
    """The shortlisted references of each query that have no current cached inlier count.

    Args:
        store: the inlier cache (`store_for`).
        local: the local-feature store the counts are computed from.
        pairs: {query: [references]} (`read_pairs`).
        overwrite: report every pair.
        stamps: {image name: local-feature file stamp} to reuse (filled on demand).

    Returns:
        {query: [references to verify]}, only queries with at least one.
    """
    stamps = _Stamps(local) if stamps is None else stamps
    todo = {}
    for query, refs in pairs.items():
        done = {} if overwrite else cached_inliers(store, query, local, stamps)
        missing = [r for r in dict.fromkeys(refs) if r not in done]
        if missing:
            todo[query] = missing
    return todo


def _importable():
    # This module by its package name, also under ``python -m``: worker processes cannot
    # unpickle functions of ``__main__``.
    from . import verify

    return verify


def _parallel(tasks, workers: int, backend: str):
    from joblib import Parallel, delayed

    run = Parallel(n_jobs=workers, backend=backend, return_as="generator_unordered")
    return run(delayed(_importable()._run_task)(*t) for t in tasks)


def _run_task(folder, query, refs, stamps, conf):
    return query, refs, _verify_query(folder, query, refs, stamps, conf)


def main(conf: dict, pairs_path: Path, local_store_dir: Path, cache_root: Path, overwrite: bool = False,
         workers: int = 2, backend: str = "loky", shard: tuple[int, int] = (0, 1)) -> Path:
    """Verifies every shortlisted pair not yet cached and caches the inlier counts.

    Args:
        conf: the stage conf (see `default_conf`); only "matcher" and "ransac" matter here.
        pairs_path: shortlist file, "query<TAB>reference" lines (`stages.common.shortlist.write_pairs`).
        local_store_dir: the stage-2 local-feature store folder (holding ``conf.json``).
        cache_root: cache folder; counts go to ``<cache_root>/rerank/<name>-<hash>/``.
        overwrite: recompute pairs that are already cached.
        workers: joblib workers (queries run in parallel, the pairs of a query in turn).
        backend: joblib backend; "loky" (processes, default) or "threading". Loky limits
            each worker's BLAS to cpu_count / workers threads; with "threading" set
            OPENBLAS_NUM_THREADS=1 (or similar) before starting Python.
        shard: (i, n) verifies only every n-th query (sorted by name) starting at i.

    Returns:
        The inlier cache folder.

    Raises:
        FileNotFoundError: `local_store_dir` has no ``conf.json``.
    """
    logger.info("geometric verification, conf: %s", conf)
    local = FeatureStore.open(Path(local_store_dir))
    store = store_for(conf, cache_root, local)
    pairs = read_pairs(pairs_path)
    pairs = {q: pairs[q] for q in sorted(pairs)[shard[0]::shard[1]]}
    stamps = _Stamps(local)
    todo = pending_pairs(store, local, pairs, overwrite, stamps)
    n_pairs = sum(map(len, todo.values()))
    logger.info("geometric verification: %d of %d pairs to compute (%d queries; %s)", n_pairs,
                sum(len(set(r)) for r in pairs.values()), len(todo), store.dir)
    tasks = [(str(local.dir), q, refs, [stamps[r] for r in refs], conf) for q, refs in todo.items()]
    start, skipped = time.perf_counter(), 0
    try:
        with Progress(n_pairs, "geometric verification", "pairs") as bar:
            for query, refs, (inliers, matches) in _parallel(tasks, workers, backend):
                bar.update(len(refs))
                ok = inliers >= 0
                skipped += int((~ok).sum())
                # the query's other cached pairs stay even with overwrite: a deeper window of the
                # same run verifies a second pairs file into the same entry
                known = cached_pairs(store, query, local, stamps)
                known.update({r: (int(n), m) for r, n, m, good in zip(refs, inliers, matches, ok, strict=True) if good})
                if not known:  # the query's local features are missing
                    continue
                store.write(query, entry_arrays(known, stamps), source=local.path(query))
    finally:
        store.flush()  # the manifest records the entries written
    seconds = time.perf_counter() - start
    _importable()._prepared_ref.cache_clear()  # in-process runs (workers=1, threading) hold up to REF_CACHE_SIZE images
    if skipped:
        logger.warning("%d pairs not verified: local features missing or unreadable", skipped)
    if n_pairs:
        logger.info("verified %d pairs in %.1f s (%.0f pairs/s, %d workers, %s)", n_pairs - skipped, seconds,
                    (n_pairs - skipped) / max(seconds, 1e-9), workers, backend)
    return store.dir


def cli(argv=None):
    parser = stage_parser(__doc__, confs, "mnn-affine-opencv")
    parser.add_argument("--pairs", type=Path, required=True, help="shortlist file (query<TAB>reference lines)")
    parser.add_argument("--features", type=Path, required=True, help="local-feature store folder")
    parser.add_argument("--workers", type=int, default=2, help="parallel joblib workers")
    parser.add_argument("--backend", default="loky", choices=["loky", "threading"], help="joblib backend")
    args = parser.parse_args(argv)
    setup_logging()
    conf = resolve(default_conf, confs, args.conf)
    print(main(conf, args.pairs, args.features, args.cache, args.overwrite, args.workers, args.backend, args.shard))


if __name__ == "__main__":
    cli()
