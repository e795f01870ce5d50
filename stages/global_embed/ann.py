"""Stage 1 search over a persistent reference index: exact below a size, a reduced-dimension
pre-search with exact re-scoring above it.

Below `default_conf["exact_below"]` references the index is faiss ``IndexFlatIP`` and the
search is `search.rank_all` (the batch run's own ranking). From there on an exhaustive
512-d product costs ~10 ms per query at 1M references on 2 cores (BENCHMARKS.md, section 3),
so the index is ``PCA{p},Flat``: the references projected onto their first `pca_dim`
principal axes (faiss ``PCAMatrix``, learned on a sample of them) and searched exhaustively
there by a matrix product (a quarter of the work at p = 128), which proposes ``k_factor *
k`` candidates per query descriptor; the candidates are re-scored exactly with the float32
reference descriptors kept beside the index (as faiss ``IndexRefineFlat`` does). The
shortlist's order and scores are therefore exact and only its membership is approximate.
Why not IVF or HNSW: on descriptors like the pipeline's (whitened, little cluster
structure) IVF1024 needed 1/8 of the lists for Recall@10 0.95 and fast-scan PQ codes lost
the true top-100 even with 10x candidates; HNSW takes tens of minutes to build at 1M x 512
on 2 cores (BENCHMARKS.md, "Shortlist search at 1M references", for the figures).
"""

import numpy as np

from stages.common import logger

from . import search

default_conf = {
    "exact_below": 100_000,  # fewer references: IndexFlatIP, every reference scored
    "pca_dim": 128,  # dimensions of the pre-search
    "k_factor": 20,  # candidates per query descriptor = k_factor * k, re-scored exactly
    "train_size": 100_000,  # references sampled to learn the PCA
    "seed": 0,
}


def kind(n_refs: int, conf: dict = default_conf) -> str:
    """"flat" (exact) or "pca" (pre-search, exact re-scoring) for `n_refs` references."""
    return "flat" if n_refs < conf["exact_below"] else "pca"


def factory_string(dim: int, conf: dict = default_conf) -> str:
    """The faiss factory string of the approximate index, e.g. "PCA128,Flat"."""
    return f"PCA{min(conf['pca_dim'], dim)},Flat"


def build(ref_desc: np.ndarray, conf: dict = default_conf, force: str | None = None):
    """The faiss inner-product index of `ref_desc`, of the `kind` its size calls for.

    Args:
        ref_desc: float32 [R, D] unit-norm reference descriptors (R >= 1).
        conf: see `default_conf`.
        force: "flat" or "pca" instead of the size rule (tests, benchmarks).

    Returns:
        A faiss index holding the R references, ids 0..R-1 in row order: ``IndexFlatIP``,
        or ``IndexPreTransform(PCAMatrix, IndexFlatIP)``.

    Raises:
        ValueError: no references, or an unknown `force`.
    """
    import faiss

    ref_desc = np.ascontiguousarray(ref_desc, np.float32)
    n, dim = ref_desc.shape
    if n == 0:
        raise ValueError("an index needs at least one reference descriptor")
    which = force or kind(n, conf)
    if which == "flat":
        index = faiss.IndexFlatIP(dim)
        index.add(ref_desc)
        return index
    if which != "pca":
        raise ValueError(f"unknown index kind {which!r}; choose flat or pca")
    p = min(conf["pca_dim"], dim)
    rng = np.random.default_rng(conf["seed"])
    sample = ref_desc[np.sort(rng.choice(n, conf["train_size"], replace=False))] if n > conf["train_size"] \
        else ref_desc
    pca = faiss.PCAMatrix(dim, p)
    index = faiss.IndexPreTransform(pca, faiss.IndexFlatIP(p))
    logger.info("global index: %s over %d references (PCA learned on %d)", factory_string(dim, conf), n,
                len(sample))
    index.train(sample)
    index.add(ref_desc)
    return index


def is_exact(index) -> bool:
    """Whether `index` scores every reference exactly (a flat index)."""
    import faiss

    return isinstance(index, faiss.IndexFlat)


def rescore(query_desc: np.ndarray, ref_desc: np.ndarray, candidates: np.ndarray, k: int,
            block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k of each query among its candidates, by the max over its descriptors.

    The inner products are faiss ``fvec_inner_products_by_idx`` (what ``IndexRefineFlat``
    re-scores with): one product per candidate, no copy of the candidate rows. numpy's
    per-query matrix-vector products were 7x slower on the loaded 2-core machine.

    Args:
        query_desc: float32 [Q, G, D] (G descriptors per query).
        ref_desc: float32 [R, D], C-contiguous (an np.memmap of a .npy is fine).
        candidates: int64 [Q, C] reference ids, -1 for none; duplicates allowed.
        k: results per query.
        block: queries per call (bounds memory at block x G x C floats).

    Returns:
        (ids int64 [Q, k], scores float32 [Q, k]) best first, ties by id; -1 / -inf past
        the candidates a query has.
    """
    import faiss

    q, g, d = query_desc.shape
    if ref_desc.dtype != np.float32 or not ref_desc.flags.c_contiguous:
        ref_desc = np.ascontiguousarray(ref_desc, np.float32)
    ids = np.full((q, k), -1, np.int64)
    scores = np.full((q, k), -np.inf, np.float32)
    for s in range(0, q, block):
        cand = np.asarray(candidates[s:s + block], np.int64)
        b, c = cand.shape
        x = np.ascontiguousarray(query_desc[s:s + block].reshape(b * g, d), np.float32)
        subset = np.ascontiguousarray(np.repeat(np.maximum(cand, 0), g, axis=0))  # [b * g, C]
        ip = np.empty((b * g, c), np.float32)
        faiss.fvec_inner_products_by_idx(faiss.swig_ptr(ip), faiss.swig_ptr(x), faiss.swig_ptr(ref_desc),
                                         faiss.swig_ptr(subset), d, b * g, c)
        sims = ip.reshape(b, g, c).max(axis=1)
        sims[cand < 0] = -np.inf
        order = np.lexsort((cand, -sims), axis=-1)  # best first, then by id: duplicates adjacent
        cand, sims = np.take_along_axis(cand, order, 1), np.take_along_axis(sims, order, 1)
        drop = cand < 0
        drop[:, 1:] |= cand[:, 1:] == cand[:, :-1]
        keep = np.argsort(drop, axis=1, kind="stable")[:, :k]
        top_ids, top_sims = np.take_along_axis(cand, keep, 1), np.take_along_axis(sims, keep, 1)
        gone = np.take_along_axis(drop, keep, 1)
        top_ids[gone], top_sims[gone] = -1, -np.inf
        n = top_ids.shape[1]
        ids[s:s + block, :n], scores[s:s + block, :n] = top_ids, top_sims
    return ids, scores


def search_shortlist(index, ref_desc: np.ndarray, query_desc: np.ndarray, k: int,
                     conf: dict = default_conf) -> tuple[np.ndarray, np.ndarray]:
    """The top-k references of each query, exactly scored.

    A flat index ranks every reference (`search.rank_all`, the batch run's ranking, then cut
    to k); a PCA index proposes ``k_factor * k`` candidates per query descriptor, re-scored
    exactly (`rescore`) from `ref_desc`.

    Args:
        index: from `build` (or `faiss.read_index` of its file).
        ref_desc: float32 [R, D], the indexed descriptors in id order.
        query_desc: float32 [Q, D] or [Q, G, D], unit norm; a reference scores the max over
            a query's G descriptors.
        k: results per query (at most R).
        conf: "k_factor" (see `default_conf`).

    Returns:
        (ids int64 [Q, k] into `ref_desc` best first, scores float32 [Q, k]); -1 / -inf
        past the candidates found.
    """
    query_desc = np.asarray(query_desc, np.float32)
    if query_desc.ndim == 2:
        query_desc = query_desc[:, None]
    q, g, d = query_desc.shape
    k = min(k, len(ref_desc))
    if is_exact(index):
        order, scores = search.rank_all(query_desc, np.asarray(ref_desc, np.float32))
        return order[:, :k].astype(np.int64), scores[:, :k]
    import faiss

    n_cand = min(conf["k_factor"] * k, index.ntotal)
    # faiss-cpu 1.15 computes flat distances with its SIMD loop below 128,000 queries per
    # search, 8x slower than its BLAS path at d = 128 (BENCHMARKS.md, section 3)
    threshold = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 20
    try:
        _, cand = index.search(np.ascontiguousarray(query_desc.reshape(q * g, d)), n_cand)
    finally:
        faiss.cvar.distance_compute_blas_threshold = threshold
    return rescore(query_desc, ref_desc, cand.reshape(q, g * n_cand), k)
