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
from stages.common.shortlist import RankingFile, order_to_names


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


class MetricsAccumulator:
    """mAP, mAP@k and Recall@K over queries added one at a time (`evaluate`'s definitions),
    so that a ranking streamed a batch at a time is scored without holding it.

    Args:
        ground_truth: {query name: set of relevant reference names}.
        recall_ks: the K of each Recall@K.
        map_at: the k of mAP@k.
    """

    def __init__(self, ground_truth: dict[str, set[str]], recall_ks=(1, 5, 10), map_at: int = 1000):
        self.ground_truth, self.recall_ks, self.map_at = ground_truth, tuple(recall_ks), map_at
        self.aps: dict[str, float] = {}  # query -> AP, in the order added
        self.first: dict[str, int | None] = {}  # query -> 1-based rank of its first relevant reference
        self._aps_k: list[float] = []
        self._recalls: dict[int, list[float]] = {k: [] for k in self.recall_ks}

    def add(self, query: str, ranks) -> None:
        """Adds a query from the 1-based ranks of its relevant references (`relevant_ranks`);
        a query without ground truth is left out."""
        relevant = self.ground_truth.get(query)
        if not relevant:
            return
        ranks = np.asarray(ranks)
        self.aps[query] = average_precision(ranks, len(relevant))
        self._aps_k.append(average_precision(ranks, len(relevant), k=self.map_at))
        first = ranks.min() if len(ranks) else np.inf
        self.first[query] = int(first) if len(ranks) else None
        for k in self.recall_ks:
            self._recalls[k].append(float(first <= k))

    def add_order(self, query: str, order_row: np.ndarray, ref_index: dict[str, int]) -> None:
        """Adds a query from its ranking as reference indices (int [R], best first);
        `ref_index` maps each reference name to its index."""
        relevant = self.ground_truth.get(query)
        if not relevant:
            return
        wanted = [ref_index[r] for r in relevant if r in ref_index]
        self.add(query, np.flatnonzero(np.isin(order_row, wanted)) + 1)

    def result(self) -> dict:
        """{"mAP", f"mAP@{map_at}", "Recall@K" for each K, "n_queries"}, as `evaluate`."""
        out = {"mAP": _mean(list(self.aps.values())), f"mAP@{self.map_at}": _mean(self._aps_k)}
        out.update({f"Recall@{k}": _mean(v) for k, v in self._recalls.items()})
        out["n_queries"] = len(self.aps)
        return out


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
    metrics = MetricsAccumulator(ground_truth, recall_ks, map_at)
    for query, ranked in rankings.items():
        relevant = ground_truth.get(query)
        if relevant:
            metrics.add(query, relevant_ranks(ranked, relevant))
    return metrics.result()


def _mean(values) -> float:
    return float(np.mean(values)) if values else float("nan")


def load_rankings(path: Path) -> dict[str, list[str]]:
    """Rankings from ``rankings.json`` ({query: [references]}) or a ranking ``.npz``
    (``global_ranking.npz``, `stages.common.shortlist.save_ranking`; the full rankings
    regenerated by `RankingFile`). Memory grows as queries x references: `cli` scores a
    ``.npz`` batch by batch instead."""
    path = Path(path)
    if path.suffix == ".npz":
        ranking = RankingFile(path)
        query_names, ref_names = ranking.query_names.tolist(), ranking.ref_names.tolist()
        out = {}
        for rows, order, _ in ranking.batches():
            out.update(order_to_names(order, [query_names[i] for i in rows], ref_names))
        return out
    return json.loads(path.read_text())


def evaluate_ranking_file(path: Path, ground_truth: dict[str, set[str]], recall_ks=(1, 5, 10),
                          map_at: int = 1000) -> dict:
    """`evaluate` of a ranking ``.npz`` (`RankingFile`), a batch of queries at a time."""
    ranking = RankingFile(path)
    query_names = ranking.query_names.tolist()
    ref_index = {r: j for j, r in enumerate(ranking.ref_names.tolist())}
    metrics = MetricsAccumulator(ground_truth, recall_ks, map_at)
    for rows, order, _ in ranking.batches():
        for i, row in zip(rows, order, strict=True):
            metrics.add_order(query_names[i], row, ref_index)
    return metrics.result()


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
        if path.suffix == ".npz":
            metrics = evaluate_ranking_file(path, truth, map_at=args.map_at)
        else:
            metrics = evaluate(load_rankings(path), truth, map_at=args.map_at)
        print(f"{path}: " + "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in metrics.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli())
