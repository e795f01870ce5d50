"""Stage 3d: spatially verified query expansion.

Query expansion with the references that geometric verification made confident, instead
of the top of the global ranking (Chum et al., "Total recall: automatic query expansion
with a generative feature model for object retrieval", ICCV 2007, expand with spatially
verified results; here on global descriptors, as average query expansion): for each query,
the first `n` references of the merged ranking whose calibrated same-product probability
is >= `min_probability` are added to the query, and everything below the last of them is
ranked again by

    score(r) = global score(q, r) + sum_v  d_v . d_r

with d the reference descriptors as stage 1 ranked them (whitened, after DBA). For one
query descriptor this is the order of (q + sum_v d_v) . d_r, average query expansion; with
region descriptors it adds the same term to the best region's score. Everything above the
last expanding reference keeps the merged order.
"""

import numpy as np

# n = 0 switches it off.
default_conf = {"verified_qe": 1, "verified_qe_probability": 0.7}


def expand(order: np.ndarray, scores_by_ref: np.ndarray, confident: np.ndarray, ref_desc: np.ndarray,
           n: int, block: int = 256) -> np.ndarray:
    """Reorders each merged ranking below its confident references by the expanded query.

    Args:
        order: int [Q, R] the merged ranking, reference indices best first.
        scores_by_ref: float [Q, R] the global score of each (query, reference index) pair
            (-inf for unreadable references, which stay last).
        confident: bool [Q, R] by reference index: the pair is verified with the
            probability the expansion asks for.
        ref_desc: float [R, D] reference descriptors as stage 1 ranked them.
        n: most references added to a query (0: `order` unchanged).
        block: queries per matrix product (bounds memory at block x R).

    Returns:
        int32 [Q, R]: each row a permutation of the row of `order`, identical to it up to
        and including the n-th confident reference; rows without one unchanged.

    Raises:
        ValueError: shapes that disagree.
    """
    order = np.asarray(order)
    if scores_by_ref.shape != order.shape or confident.shape != order.shape or len(ref_desc) != order.shape[1]:
        raise ValueError(f"order {order.shape}, scores {scores_by_ref.shape}, confident {confident.shape} and "
                         f"ref_desc {ref_desc.shape} disagree")
    out = np.array(order, np.int32, copy=True)
    if n <= 0:
        return out
    ref_desc = np.asarray(ref_desc, np.float32)
    ranked_confident = np.take_along_axis(confident, order, axis=1)  # by position
    rows = np.flatnonzero(ranked_confident.any(axis=1))
    for start in range(0, len(rows), block):
        qs = rows[start:start + block]
        expansion = np.zeros((len(qs), ref_desc.shape[1]), np.float32)
        ends = np.empty(len(qs), np.int64)
        for i, q in enumerate(qs):
            positions = np.flatnonzero(ranked_confident[q])[:n]
            expansion[i] = ref_desc[order[q, positions]].sum(axis=0)
            ends[i] = positions[-1] + 1
        expanded = scores_by_ref[qs] + expansion @ ref_desc.T
        for i, q in enumerate(qs):
            rest = order[q, ends[i]:]
            out[q, ends[i]:] = rest[np.argsort(-expanded[i, rest], kind="stable")]
    return out


def add_arguments(parser) -> None:
    """The expansion's flags (--verified-qe, --verified-qe-probability)."""
    d = default_conf
    parser.add_argument("--verified-qe", type=int, default=d["verified_qe"],
                        help="spatially verified query expansion: add up to this many confidently verified "
                             "references to each query and rank everything below them again; 0: off "
                             f"(default: {d['verified_qe']})")
    parser.add_argument("--verified-qe-probability", type=float, default=d["verified_qe_probability"],
                        help="same-product probability (the calibration) a verified reference needs to expand "
                             f"its query (default: {d['verified_qe_probability']:g})")


def conf_from_args(args) -> dict:
    """The expansion conf of parsed `add_arguments` flags."""
    return {"verified_qe": args.verified_qe, "verified_qe_probability": args.verified_qe_probability}
