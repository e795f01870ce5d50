"""Retrieval metrics from rankings: mAP, mAP@k and Recall@K.

Evaluation only reads rankings; extraction never computes metrics (cirtorch
``utils/evaluate.py`` keeps the same split).

Definitions (per query with at least one relevant reference; queries without ground truth
are left out of the means):
- AP = (1 / n_rel) * sum_i i / p_i, where p_1 < p_2 < ... are the 1-based ranks of the
  relevant references and n_rel is the number of relevant references in the ground truth
  (a relevant reference missing from the list counts as never retrieved).
- AP@k: the same sum over ranks p_i <= k, divided by min(n_rel, k).
- Recall@K: 1 if any relevant reference is in the top K, else 0.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from stages.common.dataset import read_ground_truth
from stages.common.shortlist import order_to_names, read_ranking


def average_precision(relevant_ranks, n_relevant: int, k: int | None = None) -> float:
    """Average precision of one query from the ranks of its relevant items.

    Args:
        relevant_ranks: 1-based ranks (int array [M], any order) at which relevant items
            were retrieved; M <= n_relevant.
        n_relevant: number of relevant items in the ground truth (> 0).
        k: truncate the list at rank k (AP@k); None uses the whole list.

    Returns:
        AP in [0, 1].

    Raises:
        ValueError: n_relevant < 1 or more ranks than relevant items.
    """
    ranks = np.sort(np.asarray(relevant_ranks, dtype=np.int64))
    if n_relevant < 1 or len(ranks) > n_relevant:
        raise ValueError(f"need 1 <= len(ranks) = {len(ranks)} <= n_relevant = {n_relevant}")
    hits = np.arange(1, len(ranks) + 1)
    if k is not None:
        keep = ranks <= k
        ranks, hits = ranks[keep], hits[keep]
        denominator = min(n_relevant, k)
    else:
        denominator = n_relevant
    return float(np.sum(hits / ranks) / denominator)


def relevant_ranks(ranked: list[str], relevant: set[str]) -> np.ndarray:
    """1-based ranks at which the names in `relevant` appear in `ranked`."""
    return np.flatnonzero(np.isin(np.asarray(ranked, dtype=object), list(relevant))) + 1


def evaluate(rankings: dict[str, list[str]], ground_truth: dict[str, set[str]],
             recall_ks=(1, 5, 10), map_at: int = 1000) -> dict:
    """Scores rankings against ground truth.

    Args:
        rankings: {query name: reference names, best first}.
        ground_truth: {query name: set of relevant reference names}.
        recall_ks: the K of each Recall@K.
        map_at: the k of mAP@k (the hackathon's large phase used 1000).

    Returns:
        {"mAP", f"mAP@{map_at}", "Recall@K" for each K, "n_queries"}; n_queries counts the
        ranked queries that have ground truth, over which the means are taken.
    """
    aps, aps_k, recalls = [], [], {k: [] for k in recall_ks}
    for query, ranked in rankings.items():
        relevant = ground_truth.get(query)
        if not relevant:
            continue
        ranks = relevant_ranks(ranked, relevant)
        aps.append(average_precision(ranks, len(relevant)))
        aps_k.append(average_precision(ranks, len(relevant), k=map_at))
        first = ranks.min() if len(ranks) else np.inf
        for k in recall_ks:
            recalls[k].append(float(first <= k))
    out = {"mAP": _mean(aps), f"mAP@{map_at}": _mean(aps_k)}
    out.update({f"Recall@{k}": _mean(v) for k, v in recalls.items()})
    out["n_queries"] = len(aps)
    return out


def _mean(values) -> float:
    return float(np.mean(values)) if values else float("nan")


def load_rankings(path: Path) -> dict[str, list[str]]:
    """Rankings from ``rankings.json`` ({query: [references]}) or a ranking ``.npz``
    (``global_ranking.npz``, `stages.common.shortlist.save_ranking`)."""
    path = Path(path)
    if path.suffix == ".npz":
        ranking = read_ranking(path)
        return order_to_names(ranking["order"], ranking["query_names"].tolist(), ranking["ref_names"].tolist())
    return json.loads(path.read_text())


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Scores rankings against ground truth: mAP, mAP@k, Recall@K.")
    parser.add_argument("rankings", type=Path, nargs="+",
                        help="rankings.json or a ranking .npz (global_ranking.npz) of a run")
    parser.add_argument("--ground-truth", type=Path, required=True,
                        help="CSV with columns query,reference, one row per relevant pair "
                             "(DATA/test/ground_truth.csv)")
    parser.add_argument("--map-at", type=int, default=1000, help="k of mAP@k")
    args = parser.parse_args(argv)
    truth = read_ground_truth(args.ground_truth)
    for path in args.rankings:
        metrics = evaluate(load_rankings(path), truth, map_at=args.map_at)
        print(f"{path}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
