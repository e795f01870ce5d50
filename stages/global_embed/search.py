"""Stage 1b: rank every reference for every query by inner product of global descriptors.

Exact: faiss ``IndexFlatIP`` (on every GPU faiss sees), as the design prescribes. A numpy
matrix product and a stable argsort (``backend="blas"``) ranks identically; it serves as the
reference in tests and benchmarks, where it measured 4-7x faster than faiss-cpu for a full
ranking (k = R), whose cost is faiss's k-selection (bench/bench_search.py, BENCHMARKS.md).
`rank` uses it to write the ranking and the shortlist.
"""

import functools

import numpy as np

from stages.common import logger
from stages.common.progress import progress


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


def make_indexes(ref_desc: np.ndarray, max_k: int, gpus: int) -> list[tuple[int, object]]:
    """Exact faiss indexes over consecutive chunks of at most `max_k` references, so that
    one search with k = chunk size returns every similarity even where k is capped.

    Args:
        ref_desc: float32 [R, D], C-contiguous.
        max_k: the largest k a search may ask for (`GPU_MAX_K` on GPUs).
        gpus: GPUs to put the indexes on (0: CPU).

    Returns:
        [(index of the chunk's first reference, its index)], in reference order.
    """
    indexes = []
    for offset in range(0, len(ref_desc), max_k):
        index = make_index(ref_desc.shape[1], gpus)
        index.add(ref_desc[offset:offset + max_k])
        indexes.append((offset, index))
    return indexes


def _similarities_faiss(indexes, block: np.ndarray, r: int) -> np.ndarray:
    """[n, D] queries -> float32 [n, R] inner products with every indexed reference (-inf
    where faiss returns none, e.g. for NaN descriptors)."""
    block = np.ascontiguousarray(block)
    dense = np.full((len(block), r), -np.inf, np.float32)
    for offset, index in indexes:
        sims, ids = index.search(block, index.ntotal)
        valid = ids >= 0
        rows = np.broadcast_to(np.arange(len(block))[:, None], ids.shape)
        dense[rows[valid], offset + ids[valid]] = sims[valid]
    return dense


def _similarities_blas(ref_t: np.ndarray, block: np.ndarray) -> np.ndarray:
    """[n, D] queries -> float32 [n, R] inner products by one matrix product (-inf for NaN)."""
    sims = np.ascontiguousarray(block) @ ref_t
    sims[np.isnan(sims)] = -np.inf
    return sims


def rank_all(query_desc: np.ndarray, ref_desc: np.ndarray, batch: int = 256,
             backend: str = "faiss", max_k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Full ranking of all references for each query.

    With several descriptors per query (e.g. regions), a reference scores the maximum
    inner product over the query's descriptors.

    Args:
        query_desc: float32 [Q, D] or [Q, G, D] (G descriptors per query), unit norm.
        ref_desc: float32 [R, D], unit norm.
        batch: queries per similarity call (bounds memory at batch x G x R).
        backend: "faiss" (IndexFlatIP, on the GPUs when faiss has any) or "blas" (a numpy
            matrix product, the reference implementation).
        max_k: faiss only: references per index, as the largest k one search may ask for
            (default: `GPU_MAX_K` on GPUs, R on the CPU).

    Returns:
        (order int32 [Q, R] reference indices best first, scores float32 [Q, R] in that
        order). Each row of `order` is a permutation of range(R); ties keep index order.

    Raises:
        ValueError: unknown backend.
    """
    if backend not in ("faiss", "blas"):
        raise ValueError(f"unknown ranking backend {backend!r}; choose faiss or blas")
    query_desc = np.asarray(query_desc, np.float32)
    if query_desc.ndim == 2:
        query_desc = query_desc[:, None]
    q, g, _ = query_desc.shape
    r = len(ref_desc)
    order = np.empty((q, r), np.int32)
    scores = np.empty((q, r), np.float32)
    if r == 0 or q == 0:
        return order, scores
    ref_desc = np.ascontiguousarray(ref_desc, np.float32)
    if backend == "faiss":
        gpus = faiss_gpus()
        if gpus > 0:
            logger.info("faiss: using %d GPU(s)", gpus)
        max_k = max_k or (GPU_MAX_K if gpus > 0 else r)
        similarities = functools.partial(_similarities_faiss, make_indexes(ref_desc, max_k, gpus), r=r)
    else:
        similarities = functools.partial(_similarities_blas, np.ascontiguousarray(ref_desc.T))
    for start in progress(range(0, q, batch), desc="global ranking", unit="batch"):
        block = query_desc[start:start + batch]
        b = len(block)
        best = similarities(block.reshape(b * g, -1)).reshape(b, g, r).max(axis=1)
        block_order = np.argsort(-best, axis=1, kind="stable")
        order[start:start + b] = block_order
        scores[start:start + b] = np.take_along_axis(best, block_order, axis=1)
    return order, scores
