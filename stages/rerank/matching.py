"""Putative matches between two images' local descriptors, from one matrix product.

Every matcher computes the cosine similarities ``S = q @ r.T`` with one float32 BLAS call
and derives nearest neighbours from S; there is no loop over points. Descriptors are rows
with unit L2 norm (stage 2 stores them so), for which the L2 distance is
``sqrt(2 - 2 * S)``: the nearest neighbour by distance is the most similar row, and a
distance threshold is a similarity threshold.

Each matcher returns int64 [M, 2] index pairs (query row, reference row), sorted by query
row, and [0, 2] when either side is empty.
"""

import numpy as np

METHODS = ("mutual_nn", "distance", "ratio")


def as_float32(desc: np.ndarray) -> np.ndarray:
    """C-contiguous float32 copy of `desc` (no copy when it already is one)."""
    return np.ascontiguousarray(desc, dtype=np.float32)


def similarity(desc_q: np.ndarray, desc_r: np.ndarray) -> np.ndarray:
    """Cosine similarities of every query row with every reference row.

    Args:
        desc_q: [Nq, D] query descriptors, unit L2 norm rows (float16 or float32).
        desc_r: [Nr, D] reference descriptors, unit L2 norm rows.

    Returns:
        float32 [Nq, Nr].

    Raises:
        ValueError: the descriptor dimensions differ.
    """
    if desc_q.shape[1] != desc_r.shape[1]:
        raise ValueError(f"descriptor dimensions differ: {desc_q.shape[1]} vs {desc_r.shape[1]}")
    return as_float32(desc_q) @ as_float32(desc_r).T


def _empty() -> np.ndarray:
    return np.zeros((0, 2), np.int64)


def _pairs(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    return np.stack([rows, cols], axis=1).astype(np.int64, copy=False)


def _is_empty(desc_q: np.ndarray, desc_r: np.ndarray) -> bool:
    return len(desc_q) == 0 or len(desc_r) == 0


def _nearest(desc_q: np.ndarray, desc_r: np.ndarray):
    """(S [Nq, Nr], each query row's nearest reference row [Nq], its similarity [Nq])."""
    sim = similarity(desc_q, desc_r)
    nn = sim.argmax(axis=1)
    return sim, nn, sim[np.arange(len(sim)), nn]


def mutual_nn(desc_q: np.ndarray, desc_r: np.ndarray) -> np.ndarray:
    """Mutual nearest neighbours: query row i and reference row j match when j is the
    nearest reference of i and i the nearest query of j.

    Measured best for untrained (ImageNet) descriptors, which have no calibrated distance
    threshold. The column maxima come from a reduction (no transposed copy of S); when
    several query rows tie for a column's maximum, the first one is kept, as an argmax
    over the column would.

    Args:
        desc_q: [Nq, D] query descriptors, unit L2 norm rows.
        desc_r: [Nr, D] reference descriptors, unit L2 norm rows.

    Returns:
        int64 [M, 2] (query row, reference row), M <= min(Nq, Nr), sorted by query row.

    Raises:
        ValueError: the descriptor dimensions differ.
    """
    if _is_empty(desc_q, desc_r):
        return _empty()
    sim, nn, best = _nearest(desc_q, desc_r)
    rows = np.flatnonzero(best >= sim.max(axis=0)[nn])
    cols = nn[rows]
    _, first = np.unique(cols, return_index=True)  # rows ascending: first = smallest row
    rows = np.sort(rows[first])
    return _pairs(rows, nn[rows])


def distance_matches(desc_q: np.ndarray, desc_r: np.ndarray, threshold: float = 0.8) -> np.ndarray:
    """DELF's rule: each query row matches its nearest reference row when their L2
    distance is below `threshold`; several query rows may match the same reference row.

    Source: Noh et al., "Large-Scale Image Retrieval with Attentive Deep Local Features",
    ICCV 2017; tensorflow/models research/delf ``examples/match_images.py`` (KD-tree query
    with ``distance_upper_bound=0.8``), calibrated for trained unit 40-d DELF descriptors.

    Args:
        desc_q: [Nq, D] query descriptors, unit L2 norm rows.
        desc_r: [Nr, D] reference descriptors, unit L2 norm rows.
        threshold: L2 distance bound, in [0, 2].

    Returns:
        int64 [M, 2] (query row, reference row), M <= Nq, sorted by query row.

    Raises:
        ValueError: the descriptor dimensions differ.
    """
    if _is_empty(desc_q, desc_r):
        return _empty()
    _, nn, best = _nearest(desc_q, desc_r)
    # distance < t  <=>  2 - 2 s < t^2  for unit vectors
    rows = np.flatnonzero(best > 1.0 - 0.5 * threshold * threshold)
    return _pairs(rows, nn[rows])


def ratio_matches(desc_q: np.ndarray, desc_r: np.ndarray, ratio: float = 0.8) -> np.ndarray:
    """Lowe's ratio test: each query row matches its nearest reference row when the
    distance to it is below `ratio` times the distance to the second nearest one.

    Source: Lowe, "Distinctive Image Features from Scale-Invariant Keypoints", IJCV 2004;
    also DELG's ``use_ratio_test`` option (Cao et al., ECCV 2020). With a single reference
    row there is no second neighbour and every nearest-neighbour match is kept.

    Args:
        desc_q: [Nq, D] query descriptors, unit L2 norm rows.
        desc_r: [Nr, D] reference descriptors, unit L2 norm rows.
        ratio: distance ratio bound, in (0, 1].

    Returns:
        int64 [M, 2] (query row, reference row), M <= Nq, sorted by query row.

    Raises:
        ValueError: the descriptor dimensions differ.
    """
    if _is_empty(desc_q, desc_r):
        return _empty()
    sim, nn, s1 = _nearest(desc_q, desc_r)  # s1: a copy (fancy indexing)
    sim[np.arange(len(sim)), nn] = -np.inf
    s2 = sim.max(axis=1)
    d1 = np.sqrt(np.maximum(2.0 - 2.0 * s1, 0.0))
    d2 = np.sqrt(np.maximum(2.0 - 2.0 * s2, 0.0))  # inf when there is no second row
    rows = np.flatnonzero(d1 < ratio * d2)
    return _pairs(rows, nn[rows])


def match(desc_q: np.ndarray, desc_r: np.ndarray, conf: dict) -> np.ndarray:
    """Putative matches by the matcher a conf names.

    Args:
        desc_q: [Nq, D] query descriptors, unit L2 norm rows.
        desc_r: [Nr, D] reference descriptors, unit L2 norm rows.
        conf: {"method": "mutual_nn" | "distance" | "ratio", "distance_threshold": float,
            "ratio": float} (the verification conf's "matcher" part).

    Returns:
        int64 [M, 2] (query row, reference row).

    Raises:
        ValueError: unknown method, or the descriptor dimensions differ.
    """
    method = conf["method"]
    if method == "mutual_nn":
        return mutual_nn(desc_q, desc_r)
    if method == "distance":
        return distance_matches(desc_q, desc_r, conf["distance_threshold"])
    if method == "ratio":
        return ratio_matches(desc_q, desc_r, conf["ratio"])
    raise ValueError(f"unknown matcher {method!r}; choose one of {METHODS}")
