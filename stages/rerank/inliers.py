"""Reading the inlier cache that `verify.main` writes."""

from pathlib import Path

import numpy as np

from stages.common import logger
from stages.common.cache import FeatureStore
from stages.common.shortlist import read_pairs


def load_inliers(store, pairs) -> dict[str, dict[str, int]]:
    """Cached inlier counts of the pairs of a shortlist.

    Args:
        store: the inlier cache (a `FeatureStore`, or its folder as returned by
            `verify.main`).
        pairs: {query: [references]} or a shortlist file path (`read_pairs`).

    Returns:
        {query: {reference: inliers}} for the pairs that are cached; pairs that are not
        (not verified yet, or local features missing) are left out and counted in a
        warning.
    """
    if not isinstance(store, FeatureStore):
        store = FeatureStore.open(Path(store))
    if not isinstance(pairs, dict):
        pairs = read_pairs(pairs)
    out, missing = {}, 0
    for query, refs in pairs.items():
        entry = store.read_or_none(query)
        cached = {} if entry is None else dict(zip(entry["ref_names"].tolist(), entry["inliers"].tolist(),
                                                   strict=True))
        out[query] = {r: int(cached[r]) for r in refs if r in cached}
        missing += len(set(refs)) - len(out[query])
    if missing:
        logger.warning("%d shortlisted pairs have no cached inlier count (treated as unverified)", missing)
    return out


def split_matches(entry: dict) -> list[tuple[np.ndarray, np.ndarray] | None]:
    """The inlier matches of each pair of one cached query entry, in its ``ref_names`` order.

    Args:
        entry: a rerank store entry (see `stages.rerank.verify`): "ref_names" [K] and, when
            written since matches are kept, "match_counts" int32 [K] (-1: not kept),
            "match_query_xy" and "match_ref_xy" float32 [M, 2].

    Returns:
        [K] items: (query points float32 [n, 2], reference points float32 [n, 2]), (x, y)
        in original-image pixels, n = the pair's inlier count; None for a pair whose
        matches were not kept (every pair of an entry cached before they were).
    """
    k = len(entry["ref_names"])
    if "match_counts" not in entry:
        return [None] * k
    counts = entry["match_counts"].astype(np.int64)
    ends = np.cumsum(np.maximum(counts, 0))
    q_xy, r_xy = entry["match_query_xy"], entry["match_ref_xy"]
    if len(counts) != k or (k and ends[-1] != len(q_xy)) or len(q_xy) != len(r_xy):
        logger.warning("rerank cache entry with inconsistent match arrays: its matches are ignored")
        return [None] * k
    return [None if n < 0 else (q_xy[end - n:end], r_xy[end - n:end]) for n, end in zip(counts, ends, strict=True)]


def load_matches(store, query: str) -> dict[str, tuple[np.ndarray, np.ndarray] | None]:
    """The cached inlier matches of every verified reference of one query.

    Args:
        store: the inlier cache (a `FeatureStore`, or its folder).
        query: the query name.

    Returns:
        {reference: (query points float32 [n, 2], reference points float32 [n, 2]) in
        original-image pixels, or None where the matches were not kept}; {} when the query
        has no cached entry.
    """
    if not isinstance(store, FeatureStore):
        store = FeatureStore.open(Path(store))
    entry = store.read_or_none(query)
    if entry is None:
        return {}
    return dict(zip(entry["ref_names"].tolist(), split_matches(entry), strict=True))
