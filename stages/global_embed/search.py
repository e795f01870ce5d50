"""Stage 1b: rank every reference for every query by inner product of global descriptors.

Exact: faiss ``IndexFlatIP`` on the GPUs when faiss sees any; on CPUs a float32 matrix
product (BLAS) and a stable argsort, which ranks identically and, since every reference is
ranked (k = R), is 3.5x (337 references) to 8x (36,748) faster than faiss-cpu's k-selection
(bench/bench_search.py, BENCHMARKS.md). Writes
``global_ranking.npz`` (full order and scores) and the top-k shortlist
``pairs-global-top{k}.txt`` (one "query reference" line per pair, best first) that stage 2
reads and a user can inspect.
"""

import functools
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import logger
from pipeline.cache import atomic_save_npz, atomic_write_bytes


def faiss_gpus() -> int:
    """Number of GPUs faiss can use (0 for faiss-cpu)."""
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def make_index(dim: int):
    """An exact inner-product faiss index, on all GPUs when faiss has any."""
    import faiss

    index = faiss.IndexFlatIP(dim)
    if faiss_gpus() > 0:
        logger.info("faiss: using %d GPU(s)", faiss.get_num_gpus())
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def _similarities_faiss(index, block: np.ndarray, r: int) -> np.ndarray:
    """[n, D] queries -> float32 [n, R] inner products with every indexed reference (-inf
    where faiss returns none, e.g. for NaN descriptors)."""
    sims, ids = index.search(np.ascontiguousarray(block), r)
    dense = np.full((len(block), r), -np.inf, np.float32)
    valid = ids >= 0
    rows = np.broadcast_to(np.arange(len(block))[:, None], ids.shape)
    dense[rows[valid], ids[valid]] = sims[valid]
    return dense


def _similarities_blas(ref_t: np.ndarray, block: np.ndarray) -> np.ndarray:
    """[n, D] queries -> float32 [n, R] inner products by one matrix product (-inf for NaN)."""
    sims = np.ascontiguousarray(block) @ ref_t
    sims[np.isnan(sims)] = -np.inf
    return sims


def rank_all(query_desc: np.ndarray, ref_desc: np.ndarray, batch: int = 256,
             backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Full ranking of all references for each query.

    With several descriptors per query (e.g. regions), a reference scores the maximum
    inner product over the query's descriptors.

    Args:
        query_desc: float32 [Q, D] or [Q, G, D] (G descriptors per query), unit norm.
        ref_desc: float32 [R, D], unit norm.
        batch: queries per similarity call (bounds memory at batch x G x R).
        backend: "faiss" (IndexFlatIP, on the GPUs when faiss has any), "blas" (a numpy
            matrix product), or "auto": faiss with GPUs, else blas.

    Returns:
        (order int32 [Q, R] reference indices best first, scores float32 [Q, R] in that
        order). Each row of `order` is a permutation of range(R); ties keep index order.

    Raises:
        ValueError: unknown backend.
    """
    if backend not in ("auto", "faiss", "blas"):
        raise ValueError(f"unknown ranking backend {backend!r}; choose auto, faiss or blas")
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
    if backend == "faiss" or (backend == "auto" and faiss_gpus() > 0):
        index = make_index(ref_desc.shape[1])
        index.add(ref_desc)
        similarities = functools.partial(_similarities_faiss, index, r=r)
    else:
        similarities = functools.partial(_similarities_blas, np.ascontiguousarray(ref_desc.T))
    for start in tqdm(range(0, q, batch), desc="global ranking", unit="batch", leave=False, disable=None):
        block = query_desc[start:start + batch]
        b = len(block)
        best = similarities(block.reshape(b * g, -1)).reshape(b, g, r).max(axis=1)
        block_order = np.argsort(-best, axis=1, kind="stable")
        order[start:start + b] = block_order
        scores[start:start + b] = np.take_along_axis(best, block_order, axis=1)
    return order, scores


def write_ranking(out_dir: Path, query_names: list[str], ref_names: list[str], order: np.ndarray,
                  scores: np.ndarray, top_k: int, unranked: set[str] = frozenset()) -> tuple[Path, Path]:
    """Writes ``global_ranking.npz`` and the shortlist ``pairs-global-top{k}.txt`` (tab-separated
    "query<TAB>reference" lines; queries in `unranked`, e.g. unreadable ones, left out).

    Returns:
        (ranking path, pairs path).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ranking_path = out_dir / "global_ranking.npz"
    atomic_save_npz(ranking_path, {
        "query_names": np.array(query_names, dtype=str), "ref_names": np.array(ref_names, dtype=str),
        "order": order, "scores": scores})
    pairs_path = out_dir / f"pairs-global-top{top_k}.txt"
    lines = [f"{q}\t{ref_names[j]}" for i, q in enumerate(query_names) if q not in unranked
             for j in order[i, :top_k]]
    atomic_write_bytes(pairs_path, ("\n".join(lines) + "\n").encode())
    return ranking_path, pairs_path


def read_pairs(path: Path) -> dict[str, list[str]]:
    """Reads a shortlist file into {query: [references, best first]}."""
    pairs: dict[str, list[str]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line:
            q, r = line.split("\t")
            pairs.setdefault(q, []).append(r)
    return pairs


def read_ranking(path: Path) -> dict[str, np.ndarray]:
    """Reads ``global_ranking.npz``: query_names [Q], ref_names [R], order int32 [Q, R],
    scores float32 [Q, R]."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
