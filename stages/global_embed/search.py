"""Stage 1b: rank every reference for every query by inner product of global descriptors.

Exact: faiss ``IndexFlatIP`` (on every GPU faiss sees) finds each query's first positions
(`shortlist_all`, k <= 2048 on a GPU, as faiss GPU searches allow); the rest of a full
ranking is a numpy matrix product and a stable argsort per batch of queries (`rank_all`;
measured 4-7x faster than faiss-cpu for k = R, whose cost is faiss's k-selection,
bench/bench_search.py, BENCHMARKS.md). ``backend="blas"`` ranks everything by the matrix
product, the reference in tests and benchmarks. `rank` keeps the first positions and
regenerates the rest when it is written (`stages.common.shortlist.RankingFile`).
"""

import numpy as np

from stages.common import logger
from stages.common.progress import progress
from stages.common.shortlist import complete_orders, similarities


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 for faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


# faiss GPU indexes return at most this many neighbours per search (k <= 2048).
GPU_MAX_K = 2048


def make_index(dim: int, gpus: int | None = None):
    """An exact inner-product faiss index, on all GPUs when faiss has any."""
    import faiss

    index = faiss.IndexFlatIP(dim)
    gpus = faiss_gpus() if gpus is None else gpus
    if gpus > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def _top_of_candidates(ids: np.ndarray, sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of one query's candidate (reference, score) pairs, each reference once
    with its best score, by descending score, ties by reference index."""
    valid = ids >= 0
    ids, sims = ids[valid], sims[valid]
    by = np.lexsort((ids, -sims))
    ids, sims = ids[by], sims[by]
    _, first = np.unique(ids, return_index=True)  # the first occurrence is the best score
    first.sort()
    return ids[first][:k], sims[first][:k]


def _dense_top(block: np.ndarray, ref_t: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """[b, G, D] queries -> the exact stable top-k (int64 [b, k], float32 [b, k]) by one
    matrix product."""
    sims = similarities(block, ref_t)
    kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1:k]
    order = np.empty((len(block), k), np.int64)
    scores = np.empty((len(block), k), np.float32)
    for i in range(len(block)):
        ids = np.flatnonzero(sims[i] >= kth[i])  # every reference tied with the k-th, then the stable k
        order[i], scores[i] = _top_of_candidates(ids, sims[i, ids], k)
    return order, scores


def _faiss_top(index, block: np.ndarray, ref_t: np.ndarray, k: int, k_search: int,
               n_refs: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact stable top-k of [b, G, D] queries from a faiss search of k_search >= k
    neighbours per query descriptor. Each reference scores its best over the G
    descriptors; a reference in the true top-k is among the k_search of its best
    descriptor whenever that descriptor's k_search-th score is below the k-th best
    (checked per query); the queries where it is not, or with fewer candidates than k, are
    ranked by `_dense_top`."""
    b, g, d = block.shape
    sims, ids = index.search(np.ascontiguousarray(block.reshape(b * g, d)), k_search)
    sims, ids = sims.reshape(b, g, k_search), ids.reshape(b, g, k_search)
    order = np.empty((b, k), np.int64)
    scores = np.empty((b, k), np.float32)
    redo = []
    exhaustive = k_search >= n_refs
    # Each descriptor's k best are k distinct references, so the k-th best reference scores
    # at least the highest k-th score of any descriptor: the candidates below it are dropped
    # before sorting.
    has_k = ids[:, :, k - 1] >= 0
    floors = np.where(has_k, sims[:, :, k - 1], -np.inf).max(axis=1)
    for i in range(b):
        keep = sims[i] >= floors[i]
        top_ids, top_sims = _top_of_candidates(ids[i][keep], sims[i][keep], k)
        if len(top_ids) < k:
            redo.append(i)
            continue
        # a descriptor whose last id is -1 returned every reference it can score
        cut = (ids[i, :, -1] >= 0) & (sims[i, :, -1] >= top_sims[-1])
        if not exhaustive and cut.any():
            redo.append(i)
            continue
        order[i], scores[i] = top_ids, top_sims
    if redo:
        order[redo], scores[redo] = _dense_top(block[redo], ref_t, k)
    return order, scores


def _regions(query_desc, backend: str) -> np.ndarray:
    """float32 [Q, G, D] from [Q, D] or [Q, G, D] query descriptors; checks `backend`."""
    if backend not in ("faiss", "blas"):
        raise ValueError(f"unknown ranking backend {backend!r}; choose faiss or blas")
    query_desc = np.asarray(query_desc, np.float32)
    return query_desc[:, None] if query_desc.ndim == 2 else query_desc


def shortlist_all(query_desc: np.ndarray, ref_desc: np.ndarray, k: int, batch: int = 256,
                  backend: str = "faiss", max_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first `k` positions of every query's full ranking (`rank_all`), without the rest.

    faiss (`make_index`, on the GPUs when faiss has any) searches 2k neighbours per query
    descriptor (at most `max_k`: faiss GPU searches allow k <= 2048), whose best k are
    exact (see `_faiss_top`); beyond what faiss may answer, or with backend "blas", a
    numpy matrix product per batch of queries.

    Args:
        query_desc: float32 [Q, D] or [Q, G, D], unit norm.
        ref_desc: float32 [R, D], unit norm.
        k: positions kept per query (min(k, R) are returned).
        batch: queries per search (bounds memory at batch x G x max(2k, R) for "blas").
        backend: "faiss" or "blas".
        max_k: the largest k one faiss search may ask for (default: `GPU_MAX_K` on GPUs,
            R on the CPU).

    Returns:
        (order int32 [Q, k'] reference indices best first, scores float32 [Q, k']), k' =
        min(k, R); ties keep index order, NaN scores count as -inf; the first k' positions
        of `rank_all`'s ranking.

    Raises:
        ValueError: unknown backend.
    """
    query_desc = _regions(query_desc, backend)
    q, r = len(query_desc), len(ref_desc)
    k = min(k, r)
    order = np.empty((q, k), np.int32)
    scores = np.empty((q, k), np.float32)
    if k == 0 or q == 0:
        return order, scores
    ref_desc = np.ascontiguousarray(ref_desc, np.float32)
    ref_t = np.ascontiguousarray(ref_desc.T)
    index = None
    if backend == "faiss":
        gpus = faiss_gpus()
        max_k = max_k or (GPU_MAX_K if gpus > 0 else r)
        k_search = min(r, max(k + 1, min(2 * k, max_k)))
        if k_search > max_k:
            logger.info("faiss answers k <= %d: the top %d by matrix product", max_k, k)
        else:
            if gpus > 0:
                logger.info("faiss: using %d GPU(s) for the top %d", gpus, k)
            index = make_index(ref_desc.shape[1], gpus)
            index.add(ref_desc)
    for start in progress(range(0, q, batch), desc="global shortlist", unit="batch"):
        block = query_desc[start:start + batch]
        if index is None:
            top = _dense_top(block, ref_t, k)
        else:
            top = _faiss_top(index, block, ref_t, k, k_search, r)
        order[start:start + len(block)], scores[start:start + len(block)] = top
    return order, scores


def rank_all(query_desc: np.ndarray, ref_desc: np.ndarray, batch: int = 256,
             backend: str = "faiss", max_k: int | None = None, top_k: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Full ranking of all references for each query.

    With several descriptors per query (e.g. regions), a reference scores the maximum
    inner product over the query's descriptors. The first `top_k` positions come from
    `shortlist_all` (faiss), the rest from a numpy matrix product per batch of queries
    (`stages.common.shortlist.complete_orders`), so that faiss never sorts all R (its
    k-selection made k = R 4-7x slower than a matrix product and argsort on the CPU, and a
    faiss GPU index answers k <= 2048 only).

    Args:
        query_desc: float32 [Q, D] or [Q, G, D] (G descriptors per query), unit norm.
        ref_desc: float32 [R, D], unit norm.
        batch: queries per similarity call (bounds memory at batch x G x R).
        backend: "faiss" (the top by `shortlist_all`'s faiss search) or "blas" (all by
            matrix product, the reference implementation).
        max_k: faiss only: the largest k one search may ask for (`shortlist_all`).
        top_k: positions ranked by the faiss search.

    Returns:
        (order int32 [Q, R] reference indices best first, scores float32 [Q, R] in that
        order). Each row of `order` is a permutation of range(R); ties keep index order;
        NaN scores are -inf and last.

    Raises:
        ValueError: unknown backend.
    """
    query_desc = _regions(query_desc, backend)
    q, r = len(query_desc), len(ref_desc)
    order = np.empty((q, r), np.int32)
    scores = np.empty((q, r), np.float32)
    if r == 0 or q == 0:
        return order, scores
    ref_desc = np.ascontiguousarray(ref_desc, np.float32)
    ref_t = np.ascontiguousarray(ref_desc.T)
    if backend == "faiss":
        top_order, top_scores = shortlist_all(query_desc, ref_desc, top_k, batch, "faiss", max_k)
    columns = np.arange(r)
    for start in progress(range(0, q, batch), desc="global ranking", unit="batch"):
        block = query_desc[start:start + batch]
        end = start + len(block)
        sims = similarities(block, ref_t)
        if backend == "blas":
            order[start:end] = np.argsort(-sims, axis=1, kind="stable")
            scores[start:end] = np.take_along_axis(sims, order[start:end].astype(np.int64), axis=1)
            continue
        order[start:end], scores[start:end] = complete_orders(top_order[start:end], sims, columns, r)
        scores[start:end, :top_order.shape[1]] = top_scores[start:end]
    return order, scores
