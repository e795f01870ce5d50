"""Reading the inlier cache that `verify.main` writes."""

from collections import OrderedDict
from pathlib import Path

import numpy as np

from stages.common import logger
from stages.common.cache import SOURCE_KEY, FeatureStore, source_stamp
from stages.common.manifest import file_stat
from stages.common.shortlist import read_pairs

COUNT_KEYS = ("ref_names", "inliers", "ref_stamps")  # what a count needs; the matches are larger
MEMO_PAIRS = 1_000_000  # pairs whose counts `read_counts` keeps in memory


class _CountsMemo:
    """The counts of recently read entries, least recently used dropped first, at most
    `max_pairs` pairs in all: {key: ({reference: (inliers, stamp)}, source stamp or None)}."""

    def __init__(self, max_pairs: int):
        self.max_pairs, self.pairs = max_pairs, 0
        self.entries: OrderedDict[tuple, tuple[dict[str, tuple[int, str]], str | None]] = OrderedDict()

    def get(self, key: tuple) -> tuple[dict[str, tuple[int, str]], str | None] | None:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: tuple, value: tuple[dict[str, tuple[int, str]], str | None]) -> None:
        self.entries[key] = value
        self.pairs += len(value[0])
        while self.pairs > self.max_pairs and len(self.entries) > 1:
            self.pairs -= len(self.entries.popitem(last=False)[1][0])


_memo = _CountsMemo(MEMO_PAIRS)


def read_counts(store: FeatureStore, query: str, source: Path | None = None) -> dict[str, tuple[int, str]] | None:
    """The cached counts of one query: {reference: (inliers, the stamp of the reference's
    local-feature file when it was verified)}; None when the query has no usable entry
    (absent; damaged or, with `source`, made from another version of it: then logged and
    deleted, see `FeatureStore.read_or_none`). Reads no matches.

    A run asks for the same entries several times (each deeper window, the merge, the
    analysis), so the counts are kept in memory (`MEMO_PAIRS`), keyed by the entry file's
    size, mtime and inode, with the stamp of the source file the entry was made from
    (checked against `source` on every call): a rewritten entry is read again. The
    returned dict is shared: do not modify it.
    """
    path = store.path(query)
    stat = file_stat(path)
    if stat is None:
        return None
    key = (str(path), stat)
    value = _memo.get(key)
    if value is None:
        entry = store.read_or_none(query, keys=(*COUNT_KEYS, SOURCE_KEY))
        if entry is None:
            return None
        names = entry["ref_names"].tolist()
        stamps = entry["ref_stamps"].tolist() if "ref_stamps" in entry else [""] * len(names)  # "": never current
        made_from = str(entry[SOURCE_KEY]) if SOURCE_KEY in entry else None
        value = ({r: (n, s) for r, n, s in zip(names, entry["inliers"].tolist(), stamps, strict=True)}, made_from)
        _memo.put(key, value)
    counts, made_from = value
    if source is not None and made_from != source_stamp(source):
        store.read_or_none(query, source, COUNT_KEYS)  # logs and deletes the stale entry
        return None
    return counts


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
        cached = read_counts(store, query) or {}
        out[query] = {r: cached[r][0] for r in refs if r in cached}
        missing += len(set(refs)) - len(out[query])
    if missing:
        logger.warning("%d shortlisted pairs have no cached inlier count (treated as unverified)", missing)
    return out


def load_all_inliers(store, pairs_paths) -> dict[str, dict[str, int]]:
    """`load_inliers` of several shortlist files (or one) merged: {query: {reference: inliers}}."""
    if not isinstance(store, FeatureStore):
        store = FeatureStore.open(Path(store))
    out: dict[str, dict[str, int]] = {}
    for path in [pairs_paths] if isinstance(pairs_paths, (str, Path)) else pairs_paths:
        for query, counts in load_inliers(store, path).items():
            out.setdefault(query, {}).update(counts)
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
