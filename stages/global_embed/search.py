"""Stage 1b: rank every reference for every query by inner product of global descriptors.

Exact: faiss ``IndexFlatIP`` (on every GPU faiss sees), as the design prescribes. A numpy
matrix product and a stable argsort (``backend="blas"``) ranks identically; it serves as the
reference in tests and benchmarks, where it measured 4-7x faster than faiss-cpu for a full
ranking (k = R), whose cost is faiss's k-selection (bench/bench_search.py, BENCHMARKS.md).
Writes
``global_ranking.npz`` (full order and scores) and the top-k shortlist
``pairs-global-top{k}.txt`` (one "query reference" line per pair, best first) that stage 2
reads and a user can inspect.
"""

import functools
import re
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
    gpus = faiss_gpus()
    if gpus > 0:
        logger.info("faiss: using %d GPU(s)", gpus)
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
             backend: str = "faiss") -> tuple[np.ndarray, np.ndarray]:
    """Full ranking of all references for each query.

    With several descriptors per query (e.g. regions), a reference scores the maximum
    inner product over the query's descriptors.

    Args:
        query_desc: float32 [Q, D] or [Q, G, D] (G descriptors per query), unit norm.
        ref_desc: float32 [R, D], unit norm.
        batch: queries per similarity call (bounds memory at batch x G x R).
        backend: "faiss" (IndexFlatIP, on the GPUs when faiss has any) or "blas" (a numpy
            matrix product, the reference implementation).

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
    "query<TAB>reference" lines, `write_pairs`). Names in `unranked` (unreadable images) are
    left out of the shortlist: queries entirely, references from every query's top-k.

    Returns:
        (ranking path, pairs path).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    ranking_path = out_dir / "global_ranking.npz"
    atomic_save_npz(ranking_path, {
        "query_names": np.array(query_names, dtype=str), "ref_names": np.array(ref_names, dtype=str),
        "order": order, "scores": scores})
    pairs_path = out_dir / f"pairs-global-top{top_k}.txt"
    write_pairs(pairs_path, [(q, ref_names[j]) for i, q in enumerate(query_names) if q not in unranked
                             for j in order[i, :top_k] if ref_names[j] not in unranked])
    return ranking_path, pairs_path


def _escape(name: str) -> str:
    return name.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(text: str) -> str:
    return re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m.group(1), m.group(1)), text)


_UNESCAPE = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}


def write_pairs(path: Path, pairs) -> None:
    """Writes (query, reference) pairs as "query<TAB>reference" lines, atomically.

    A tab, newline, carriage return or backslash inside a name is written as \\t, \\n,
    \\r or \\\\, so every name survives `read_pairs`; names that are not valid UTF-8
    (surrogate escapes) are written as their original bytes.
    """
    lines = [f"{_escape(q)}\t{_escape(r)}" for q, r in pairs]
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape") if lines else b"")


def read_pairs(path: Path) -> dict[str, list[str]]:
    """Reads a shortlist file (`write_pairs`) into {query: [references, best first]}."""
    pairs: dict[str, list[str]] = {}
    for line in Path(path).read_bytes().decode("utf-8", "surrogateescape").split("\n"):
        line = line.removesuffix("\r")  # a file saved with CRLF line ends; a CR in a name is escaped
        if line:
            q, r = line.split("\t")
            pairs.setdefault(_unescape(q), []).append(_unescape(r))
    return pairs


def read_ranking(path: Path) -> dict[str, np.ndarray]:
    """Reads ``global_ranking.npz``: query_names [Q], ref_names [R], order int32 [Q, R],
    scores float32 [Q, R]."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}
