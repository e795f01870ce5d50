"""Stage 3b: merges RANSAC inlier counts into the global ranking.

`rerank` reorders only the first `top_k` positions of each query's global ranking; below
them the global order is kept, and every reference appears exactly once in every list
(stage 1 keeps the first positions; the rest is regenerated a batch of queries at a time,
`Merger`). The merge reads cached counts (`verify.main`), so changing the rule, `top_k`, `min_inliers`,
`weight` or the calibration reranks without matching again. Given stage 1's reference
descriptors, `main` then applies the verified query expansion (`verified_qe`) below each
query's first confident reference, and writes the final ``rankings.json`` ({query: [every
reference, best first]}).
"""

import argparse
from pathlib import Path

import numpy as np

from stages.common import logger, setup_logging
from stages.common.conf import resolve
from stages.common.rankings_json import RankingsWriter, needs_ascii
from stages.common.shortlist import RankingFile

from . import calibrate, verified_qe
from .inliers import load_all_inliers

RULES = ("calibrated", "delg", "weighted")
INLIER_CAP = 70  # inliers at which the weighted rule's bonus saturates

# min_inliers and weight: the delg and weighted rules; calibrated uses the calibration.
# verified_qe, verified_qe_probability: the query expansion after the merge (`verified_qe`).
default_conf = {"rule": "calibrated", "min_inliers": 25, "weight": 0.5, **verified_qe.default_conf}
confs = {"calibrated": {}, "delg": {"rule": "delg"}, "weighted": {"rule": "weighted"}}


def _inlier_matrix(inliers, n_queries: int, k: int) -> np.ndarray:
    """int64 [Q, k] from a per-query sequence of counts over the top positions; positions
    beyond a query's counts get 0."""
    out = np.zeros((n_queries, k), np.int64)
    if len(inliers) != n_queries:
        raise ValueError(f"inliers has {len(inliers)} rows for {n_queries} queries")
    for q, row in enumerate(inliers):
        row = np.asarray(row, np.int64).ravel()[:k]
        out[q, :len(row)] = row
    return out


def rerank(order: np.ndarray, global_scores: np.ndarray, inliers, top_k: int, rule: str = "delg",
           min_inliers: int = 25, weight: float = 0.5, calibration: dict | None = None) -> np.ndarray:
    """Reorders the top-k of each global ranking by geometric verification.

    Rules, applied to positions < top_k only:

    - "calibrated" (the pipeline's default): by the probability that the pair shows the
      same product given its global score and inliers (`calibrate.logit`, fitted on the
      training classes), descending; ties keep the global order. Where verification is
      weak evidence on the training pairs, references stay near their global rank.

    For the two fixed rules a pair counts as verified when its inliers are
    >= max(min_inliers, 1); unverified pairs count 0 inliers:

    - "delg" (Cao et al., "Unifying Deep Local and Global Features for Image
      Search", ECCV 2020, as in tensorflow/models research/delf ``image_reranking.py``,
      which sorts by (inliers, global score)): verified pairs first, by inlier count
      descending; ties and the unverified rest keep their global order.
    - "weighted": by global score + weight * min(inliers, 70) / 70, descending; ties keep
      the global order.

    Args:
        order: int [Q, R] reference indices, best first (``global_ranking.npz`` "order").
        global_scores: float [Q, R] the global score at each position of `order` (row-wise
            aligned with `order`, as ``global_ranking.npz`` "scores").
        inliers: [Q] sequences (or an int array [Q, k']) of inlier counts of the
            references at positions 0, 1, ... of each row of `order`; positions beyond a
            row's length (up to top_k) count as unverified.
        top_k: positions reordered per query; the rest keep the global order.
        rule: "calibrated", "delg" or "weighted".
        min_inliers: delg and weighted: fewest inliers for a pair to count as verified.
        weight: the weighted rule's inlier weight, in global-score units.
        calibration: the "calibrated" rule's `calibrate.fit` result (default
            `calibrate.DEFAULT`).

    Returns:
        int32 [Q, R] reordered reference indices; each row is a permutation of the row of
        `order`, identical to it from position top_k on.

    Raises:
        ValueError: unknown rule, shapes that disagree, or top_k < 0.
    """
    order = np.asarray(order)
    global_scores = np.asarray(global_scores, np.float64)
    if rule not in RULES:
        raise ValueError(f"unknown merge rule {rule!r}; choose one of {RULES}")
    if order.ndim != 2 or global_scores.shape != order.shape:
        raise ValueError(f"order {order.shape} and global_scores {global_scores.shape} must both be [Q, R]")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    n_queries, n_refs = order.shape
    k = min(top_k, n_refs)
    counts = _inlier_matrix(inliers, n_queries, k)
    position = np.broadcast_to(np.arange(k), (n_queries, k))
    if rule == "calibrated":
        scored = np.isfinite(global_scores[:, :k])  # -inf: unreadable references, which stay last
        primary = np.full((n_queries, k), np.inf)
        primary[scored] = -calibrate.logit(calibration or calibrate.DEFAULT, global_scores[:, :k][scored],
                                           counts[scored])
        top = np.lexsort((position, primary), axis=-1)
        out = np.array(order, np.int32, copy=True)
        out[:, :k] = np.take_along_axis(order[:, :k], top, axis=1)
        return out
    counts[counts < max(min_inliers, 1)] = 0
    if rule == "delg":
        primary = -counts.astype(np.float64)  # unverified: 0 > any -n, so after verified ones
    else:
        primary = -(global_scores[:, :k] + weight * np.minimum(counts, INLIER_CAP) / INLIER_CAP)
    # lexsort: the last key is the primary one; position breaks ties (the global order).
    top = np.lexsort((position, primary), axis=-1)
    out = np.array(order, np.int32, copy=True)
    out[:, :k] = np.take_along_axis(order[:, :k], top, axis=1)
    return out


def align_inliers(query_names, ref_names, order: np.ndarray, inliers: dict[str, dict[str, int]],
                  top_k: int) -> list[np.ndarray]:
    """Inlier counts laid out like a global ranking's top-k, the `inliers` of `rerank`.

    Args:
        query_names: [Q] query names (``global_ranking.npz`` "query_names").
        ref_names: [R] reference names ("ref_names").
        order: int [Q, R] reference indices, best first ("order").
        inliers: {query: {reference: inliers}} (`load_inliers`).
        top_k: positions per query.

    Returns:
        [Q] int32 arrays [min(top_k, R)]: the count of the reference at each top position,
        0 where none is cached.
    """
    ref_names = [str(r) for r in ref_names]
    out = []
    for q, query in enumerate(query_names):
        cached = inliers.get(str(query), {})
        out.append(np.array([cached.get(ref_names[j], 0) for j in order[q, :top_k]], np.int32))
    return out


def verified_depth(query_names, ref_names, order: np.ndarray, inliers: dict[str, dict[str, int]]) -> int:
    """1 + the deepest global rank (0-based) of any pair with an inlier count; 0 if none.

    Reordering the first `verified_depth` positions is the same as reordering any deeper
    prefix: below it no reference has inliers, so the global order stays."""
    column = {str(r): j for j, r in enumerate(ref_names)}
    depth = 0
    for q, query in enumerate(query_names):
        counted = [column[r] for r in inliers.get(str(query), {}) if r in column]
        if counted:
            depth = max(depth, int(np.flatnonzero(np.isin(order[q], counted)).max()) + 1)
    return depth


def confident_pairs(query_names, ref_names, ranking: dict, inliers: dict[str, dict[str, int]], calibration: dict,
                    min_probability: float) -> tuple[np.ndarray, np.ndarray]:
    """The global score of every pair and which pairs verification made confident.

    Returns:
        (float32 [Q, R] global score by reference index, -inf where none; bool [Q, R]:
        more inliers than the calibration's hinge and a same-product probability >=
        `min_probability`).
    """
    scores = np.full(ranking["order"].shape, -np.inf, np.float32)
    np.put_along_axis(scores, ranking["order"].astype(np.int64), ranking["scores"], axis=1)
    confident = np.zeros(scores.shape, bool)
    column = {str(r): j for j, r in enumerate(ref_names)}
    for q, query in enumerate(query_names):
        pairs = [(column[r], n) for r, n in inliers.get(str(query), {}).items()
                 if r in column and n > calibration["min_inliers"]]
        if pairs:
            cols, counts = map(np.array, zip(*pairs, strict=True))
            confident[q, cols] = calibrate.probability(calibration, scores[q, cols], counts) >= min_probability
    return scores, confident


class Merger:
    """The merge of `main`, a batch of queries at a time: reads the verified pairs, the
    calibration and the reference descriptors once, then reranks any queries' full global
    rankings (`stages.common.shortlist.RankingFile.full`) on demand, so that memory is
    bounded by the batch, not by queries x references.

    Args: as `main` (without `out_dir`), and `inliers`: {query: {reference: inliers}} of
        `pairs_paths` when the caller has them (`load_all_inliers`; read from the inlier cache
        otherwise).

    Raises:
        ValueError: an unknown rule, or descriptors of other references than the ranking's.
    """

    def __init__(self, conf: dict, ranking_path: Path, pairs_paths, inliers_dir: Path,
                 calibration_path: Path | None = None, descriptors_path: Path | None = None,
                 inliers: dict[str, dict[str, int]] | None = None):
        if conf["rule"] not in RULES:
            raise ValueError(f"unknown merge rule {conf['rule']!r}; choose one of {RULES}")
        logger.info("merge, conf: %s", conf)
        self.conf = conf
        self.ranking = RankingFile(ranking_path)
        self.query_names = self.ranking.query_names.tolist()
        self.ref_names = self.ranking.ref_names.tolist()
        self.inliers = load_all_inliers(inliers_dir, pairs_paths) if inliers is None else inliers
        self.depth = self._verified_depth()
        self.calibration = calibrate.read(calibration_path)
        self.ref_desc = None
        if conf.get("verified_qe", 0) > 0 and descriptors_path is not None:
            with np.load(descriptors_path, allow_pickle=False) as f:
                if f["ref_names"].tolist() != [str(r) for r in self.ref_names]:
                    raise ValueError(f"{descriptors_path} describes other references than {ranking_path}")
                self.ref_desc = f["descriptors"].astype(np.float32)
        self.expanded = 0  # queries the verified query expansion changed, over the batches merged

    def _verified_depth(self) -> int:
        """`verified_depth` over the full rankings, reading in full only the rows of
        queries with a verified reference below the stored positions."""
        depth = verified_depth(self.query_names, self.ref_names, self.ranking.order, self.inliers)
        if self.ranking.complete:
            return depth
        column = {str(r): j for j, r in enumerate(self.ref_names)}
        deeper = [q for q, query in enumerate(self.query_names)
                  if not {column[r] for r in self.inliers.get(str(query), {}) if r in column}
                  <= set(self.ranking.order[q].tolist())]
        if deeper:
            order, _ = self.ranking.full(deeper)
            depth = max(depth, verified_depth([self.query_names[q] for q in deeper], self.ref_names, order,
                                              self.inliers))
        return depth

    def merge(self, rows, order: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """The final rankings of some queries.

        Args:
            rows: int [b] query indices; order int [b, R], scores float [b, R]: their full
                global rankings (`RankingFile.full`).

        Returns:
            int32 [b, R] reference indices, best first.
        """
        names = [self.query_names[i] for i in rows]
        conf = self.conf
        out = rerank(order, scores, align_inliers(names, self.ref_names, order, self.inliers, self.depth),
                     self.depth, conf["rule"], conf["min_inliers"], conf["weight"], self.calibration)
        if self.ref_desc is not None:
            by_ref, confident = confident_pairs(names, self.ref_names, {"order": order, "scores": scores},
                                                self.inliers, self.calibration, conf["verified_qe_probability"])
            out = verified_qe.expand(out, by_ref, confident, self.ref_desc, conf["verified_qe"])
            self.expanded += int(confident.any(axis=1).sum())
        return out

    def batches(self, batch: int = 128):
        """Yields (rows int [b], global order int32 [b, R], global scores float32 [b, R],
        final order int32 [b, R]) over all queries in order, `batch` at a time."""
        for rows, order, scores in self.ranking.batches(batch):
            yield rows, order, scores, self.merge(rows, order, scores)

    def log_expansion(self) -> None:
        """Logs what the verified query expansion did, once every query is merged."""
        if self.ref_desc is not None:
            logger.info("verified query expansion: %d of %d queries expanded with up to %d reference(s) of "
                        "probability >= %g", self.expanded, len(self.query_names), self.conf["verified_qe"],
                        self.conf["verified_qe_probability"])


def main(conf: dict, ranking_path: Path, pairs_paths, inliers_dir: Path, out_dir: Path,
         calibration_path: Path | None = None, descriptors_path: Path | None = None) -> Path:
    """Reranks the global ranking by the inlier counts of the verified shortlists.

    Streams ``rankings.json`` a batch of queries at a time (`Merger`,
    `stages.common.rankings_json.RankingsWriter`).

    Args:
        conf: the merge conf (see `default_conf`): "rule", "min_inliers", "weight".
        ranking_path: the global ranking (``global_ranking.npz``, stage 1).
        pairs_paths: the shortlist files whose pairs were verified (the top-k and any
            deeper windows), "query<TAB>reference" lines.
        inliers_dir: the inlier cache folder (`verify.main`).
        out_dir: where ``rankings.json`` is written.
        calibration_path: ``calibration.json`` (`calibrate.main`) for the "calibrated"
            rule and the verified query expansion; None applies `calibrate.DEFAULT`.
        descriptors_path: ``reference_descriptors.npz`` of stage 1 ("ref_names",
            "descriptors" [R, D]) for the verified query expansion ("verified_qe" > 0);
            None skips it.

    Returns:
        The ``rankings.json`` path: {query: [every reference, best first]}.

    Raises:
        ValueError: an unknown rule, or descriptors of other references than the ranking's.
    """
    merger = Merger(conf, ranking_path, pairs_paths, inliers_dir, calibration_path, descriptors_path)
    path = Path(out_dir) / "rankings.json"
    with RankingsWriter(path, merger.ref_names, ascii_only=needs_ascii(merger.query_names + merger.ref_names)) as out:
        for rows, _, _, final in merger.batches():
            out.add_batch([merger.query_names[i] for i in rows], final)
    merger.log_expansion()
    return path


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranking", type=Path, required=True, help="global_ranking.npz from stage 1")
    parser.add_argument("--pairs", type=Path, nargs="+", required=True,
                        help="the verified shortlist files (pairs-global-top*.txt)")
    parser.add_argument("--inliers", type=Path, required=True,
                        help="inlier cache folder from verification (cache/rerank/<conf>-<hash>/)")
    parser.add_argument("--output", type=Path, required=True, help="folder for rankings.json")
    parser.add_argument("--conf", default="calibrated", choices=sorted(confs),
                        help="calibrated: by the probability of the same product given global score and "
                             "inliers (--calibration); delg: verified references first by inlier count, then the "
                             "global order; weighted: global score + weight * min(inliers, 70) / 70")
    parser.add_argument("--calibration", type=Path, default=None,
                        help="calibration.json of the run (default: the documented fallback, calibrate.DEFAULT)")
    parser.add_argument("--min-inliers", type=int, default=default_conf["min_inliers"],
                        help="inliers for a reference to count as verified")
    parser.add_argument("--weight", type=float, default=default_conf["weight"],
                        help="the weighted rule's inlier weight, in global-score units")
    parser.add_argument("--descriptors", type=Path, default=None,
                        help="reference_descriptors.npz from stage 1, for the verified query expansion "
                             "(default: none, no expansion)")
    verified_qe.add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    conf = resolve(default_conf, confs, args.conf, {"min_inliers": args.min_inliers, "weight": args.weight,
                                                    **verified_qe.conf_from_args(args)})
    print(main(conf, args.ranking, args.pairs, args.inliers, args.output, args.calibration, args.descriptors))


if __name__ == "__main__":
    cli()
