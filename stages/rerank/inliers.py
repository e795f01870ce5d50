"""Reading the inlier cache that `verify.main` writes."""

from pathlib import Path

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
