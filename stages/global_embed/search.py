"""Stage 1b: rank every reference for every query by inner product of global descriptors.

faiss ``IndexFlatIP`` (exact), moved to the GPUs when faiss sees any. Writes
``global_ranking.npz`` (full order and scores) and the top-k shortlist
``pairs-global-top{k}.txt`` (one "query reference" line per pair, best first) that stage 2
reads and a user can inspect.
"""

from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline import logger
from pipeline.cache import atomic_save_npz, atomic_write_bytes


def make_index(dim: int):
    """An exact inner-product faiss index, on all GPUs when faiss has any."""
    import faiss

    index = faiss.IndexFlatIP(dim)
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
        logger.info("faiss: using %d GPU(s)", faiss.get_num_gpus())
        index = faiss.index_cpu_to_all_gpus(index)
    return index


def rank_all(query_desc: np.ndarray, ref_desc: np.ndarray, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Full ranking of all references for each query.

    With several descriptors per query (e.g. regions), a reference scores the maximum
    inner product over the query's descriptors.

    Args:
        query_desc: float32 [Q, D] or [Q, G, D] (G descriptors per query), unit norm.
        ref_desc: float32 [R, D], unit norm.
        batch: queries per faiss search call (bounds memory at batch x G x R).

    Returns:
        (order int32 [Q, R] reference indices best first, scores float32 [Q, R] in that
        order). Each row of `order` is a permutation of range(R); ties keep index order.
    """
    query_desc = np.asarray(query_desc, np.float32)
    if query_desc.ndim == 2:
        query_desc = query_desc[:, None]
    q, g, _ = query_desc.shape
    r = len(ref_desc)
    order = np.empty((q, r), np.int32)
    scores = np.empty((q, r), np.float32)
    if r == 0 or q == 0:
        return order, scores
    index = make_index(ref_desc.shape[1])
    index.add(np.ascontiguousarray(ref_desc, np.float32))
    for start in tqdm(range(0, q, batch), desc="faiss search", unit="batch", leave=False, disable=None):
        block = query_desc[start:start + batch]
        b = len(block)
        sims, ids = index.search(np.ascontiguousarray(block.reshape(b * g, -1)), r)
        dense = np.full((b * g, r), -np.inf, np.float32)
        valid = ids >= 0  # NaN descriptors make faiss return -1
        rows = np.broadcast_to(np.arange(b * g)[:, None], ids.shape)
        dense[rows[valid], ids[valid]] = sims[valid]
        best = dense.reshape(b, g, r).max(axis=1)
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
