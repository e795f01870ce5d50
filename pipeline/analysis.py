"""Whether verification can be trusted on a data set: ``verification_stats.json``.

For every verified (query, reference) pair of a run: its inliers and its calibrated
probability of showing the same product. With ground truth, the distributions of both
for the true and the false pairs and the ROC AUC of each (the probability that a random true
pair scores above a random false one, Mann-Whitney; 0.5 is chance), so a user sees whether
reranking helps on their data before trusting it.
"""

import numpy as np

from stages.common.cache import atomic_write_json
from stages.common.shortlist import RankingFile, read_ranking
from stages.rerank import calibrate
from stages.rerank.inliers import load_all_inliers

INLIER_BINS = [0, 1, 10, 20, 30, 40, 60, 80, 120, 200, 400, 1000000]


def roc_auc(positive, negative) -> float | None:
    """ROC AUC of scores of positive vs negative items: the share of (positive, negative)
    pairs where the positive scores higher, ties counting half (the Mann-Whitney U statistic
    over n_pos x n_neg); None when either side is empty. O(n log n), without importing scipy
    (a second of every run's start-up)."""
    positive, negative = np.asarray(positive, np.float64), np.sort(np.asarray(negative, np.float64))
    if len(positive) == 0 or len(negative) == 0:
        return None
    below = np.searchsorted(negative, positive, "left")
    below_or_tied = np.searchsorted(negative, positive, "right")
    return float((below + below_or_tied).sum() / (2 * len(positive) * len(negative)))


def _histogram(values) -> dict[str, int]:
    counts, _ = np.histogram(np.asarray(values, np.float64), bins=INLIER_BINS)
    edges = INLIER_BINS
    return {f"{edges[i]}-{edges[i + 1] - 1}" if i + 2 < len(edges) else f"{edges[i]}+": int(c)
            for i, c in enumerate(counts)}


def verified_pairs(ranking_path, pairs_paths, inliers_dir, calibration: dict,
                   inliers: dict[str, dict[str, int]] | None = None) -> dict:
    """Every verified (query, reference) pair of a run, each once, with its evidence.

    Args:
        ranking_path: the global ranking (``global_ranking.npz``; its scores enter the
            probability).
        pairs_paths: the verified shortlist files.
        inliers_dir: the inlier cache folder.
        calibration: the calibration (`calibrate.read`).
        inliers: {query: {reference: inliers}} of `pairs_paths` when the caller has them
            (`load_all_inliers`; read from `inliers_dir` otherwise).

    Returns:
        {"query": [P] names, "reference": [P] names, "global_score": float64 [P] (stage-1
        similarity), "inliers": float64 [P], "probability": float64 [P] (calibrated
        same-product probability)}.
    """
    ranking = read_ranking(ranking_path)
    full = None  # RankingFile, for a pair below the stored positions (not in a pipeline run)
    row = {q: i for i, q in enumerate(ranking["query_names"].tolist())}
    position = {}
    if inliers is None:
        inliers = load_all_inliers(inliers_dir, pairs_paths)
    pairs = [(query, ref, n) for query, counts in inliers.items() for ref, n in counts.items()]
    ref_names = ranking["ref_names"].tolist()
    scores = []
    for q, r, _ in pairs:
        i = row[q]
        if i not in position:
            position[i] = {ref_names[j]: s for j, s in zip(ranking["order"][i], ranking["scores"][i], strict=True)}
        if r not in position[i]:
            full = full or RankingFile(ranking_path)
            order, ranked = full.full([i])
            position[i] = {ref_names[j]: s for j, s in zip(order[0], ranked[0], strict=True)}
        scores.append(position[i][r])
    scores = np.array(scores, np.float64)
    inliers = np.array([n for _, _, n in pairs], np.float64)
    probability = calibrate.probability(calibration, scores, inliers) if pairs else np.zeros(0)
    return {"query": [q for q, _, _ in pairs], "reference": [r for _, r, _ in pairs], "global_score": scores,
            "inliers": inliers, "probability": probability}


def verification_stats(ranking_path, pairs_paths, inliers_dir, calibration_path, ground_truth, out_path,
                       table: dict | None = None) -> dict:
    """Writes ``verification_stats.json`` and returns it.

    Args:
        ranking_path: the global ranking (its scores enter the probability).
        pairs_paths: the verified shortlist files.
        inliers_dir: the inlier cache folder.
        calibration_path: ``calibration.json`` or None (`calibrate.DEFAULT`).
        ground_truth: {query: set of relevant references} or None.
        out_path: the JSON file to write.
        table: the `verified_pairs` table of these inputs when the caller has it (it is
            read from the inlier cache otherwise).

    Returns:
        {"pairs", "calibration", "verified" (pairs above the calibration's inlier hinge),
         "inliers_histogram"} and, with ground truth, {"true_pairs", "false_pairs",
         "roc_auc_inliers", "roc_auc_probability", "inliers_histogram_true",
         "inliers_histogram_false", "verified_true", "verified_false"}.
    """
    calibration = calibrate.read(calibration_path)
    if table is None:
        table = verified_pairs(ranking_path, pairs_paths, inliers_dir, calibration)
    inliers, probability = table["inliers"], table["probability"]
    verified = inliers > calibration["min_inliers"]
    stats = {"pairs": len(inliers), "calibration": calibration, "verified": int(verified.sum()),
             "inliers_histogram": _histogram(inliers)}
    if ground_truth is not None:
        same = same_product(table, ground_truth)
        stats.update({
            "true_pairs": int(same.sum()), "false_pairs": int((~same).sum()),
            "roc_auc_inliers": roc_auc(inliers[same], inliers[~same]),
            "roc_auc_probability": roc_auc(probability[same], probability[~same]),
            "inliers_histogram_true": _histogram(inliers[same]), "inliers_histogram_false": _histogram(inliers[~same]),
            "verified_true": int((verified & same).sum()), "verified_false": int((verified & ~same).sum())})
    atomic_write_json(out_path, stats)
    return stats


def same_product(table: dict, ground_truth: dict[str, set[str]]) -> np.ndarray:
    """bool [P]: whether each pair of a `verified_pairs` table is a true pair."""
    return np.array([r in ground_truth.get(q, set()) for q, r in zip(table["query"], table["reference"],
                                                                      strict=True)], bool)


def summary_line(stats: dict) -> str:
    """One line for the run summary."""
    calibration = stats["calibration"]
    line = (f"verification: {stats['verified']} of {stats['pairs']} pairs above {calibration['min_inliers']:g} "
            f"inliers ({calibration['source']})")
    if stats.get("roc_auc_inliers") is not None:
        line += (f"; true pairs {stats['verified_true']} of {stats['true_pairs']} verified, false pairs "
                 f"{stats['verified_false']} of {stats['false_pairs']}; ROC AUC inliers "
                 f"{stats['roc_auc_inliers']:.3f}, probability {stats['roc_auc_probability']:.3f}")
    return line
