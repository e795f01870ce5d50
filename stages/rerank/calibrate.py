"""Stage 3c: the probability that a verified pair shows the same product, learned on the
training classes.

An inlier count means different things on different data: on flat DVD covers 30 inliers
is a sure match, on shelves full of look-alike cartons photographed in the same store it is
not. So the merge does not trust a fixed threshold; it ranks by a probability fitted, per
data set, on pairs of training images whose answer is known (same class or not), verified
exactly as the test pairs are:

    logit P(same) = w_global * s + w_verify * max(0, log(1 + inliers) - log(1 + t0)) + bias

with s the global similarity. The hinge t0 is the inlier count up to which verification says
nothing (chance matches of an unrelated pair: the a-contrario view of Moisan & Stival,
"A probabilistic criterion to detect rigid point matches between two images", IJCV 2004,
with the background level measured instead of modelled); it is chosen on a grid by the
likelihood of the training pairs, and the weights by L2-regularised logistic regression
(Platt, "Probabilistic outputs for support vector machines", 1999, applied to these two
evidences), constrained to w >= 0 so that the probability never falls as either evidence
rises (a weight the fit wants negative is set to 0 and the others refitted). Ranking by
this probability moves a reference above a better global match only where the training
pairs say verification is that reliable.

The training pairs' global similarities must be as honest as the test ones: the learned
whitening is fitted on the training classes, so stage 1 computes them with a whitening
learned without the pair's classes (`stages.global_embed.rank.calibration_pairs`).

Without enough training pairs the documented `DEFAULT` applies: a reference with more than
30 inliers goes above unverified ones, verified ones by inlier count (the DELG rule).
"""

import argparse
import json
from pathlib import Path

import numpy as np

from stages.common import logger, setup_logging
from stages.common.cache import FeatureStore, atomic_write_json

from .inliers import load_inliers

# Without training pairs: a reference with more than 30 inliers (on smvs_dvd 99.9% of the
# unrelated pairs have fewer) goes above the unverified ones, verified ones by inlier count.
DEFAULT = {"w_global": 1.0, "w_verify": 10.0, "min_inliers": 30.0, "bias": -3.0,
           "source": "default (no training pairs): verified above 30 inliers, then by inlier count"}

default_conf = {
    "hinge_grid": [0, 5, 10, 15, 20, 25, 30, 40, 50, 60, 80, 100],
    "l2": 1.0,  # ridge on the weights (the pairs' features are O(1))
    "min_pairs": 10,  # fewest positive and fewest negative pairs to fit on
}


def features(global_scores, inliers, min_inliers: float) -> np.ndarray:
    """The two evidences of each pair: float64 [N, 2] (global similarity, inliers in log
    units above the hinge `min_inliers`)."""
    excess = np.log1p(np.asarray(inliers, np.float64)) - np.log1p(float(min_inliers))
    return np.stack([np.asarray(global_scores, np.float64), np.maximum(excess, 0.0)], axis=1)


def logit(calibration: dict, global_scores, inliers) -> np.ndarray:
    """logit P(same product) of pairs: float64 [N], from global similarities [N] and inlier
    counts [N] (any shape, broadcast together)."""
    g = np.asarray(global_scores, np.float64)
    excess = np.maximum(np.log1p(np.asarray(inliers, np.float64)) - np.log1p(calibration["min_inliers"]), 0.0)
    return calibration["w_global"] * g + calibration["w_verify"] * excess + calibration["bias"]


def probability(calibration: dict, global_scores, inliers) -> np.ndarray:
    """P(same product) of pairs (see `logit`), float64, same shape."""
    return 1.0 / (1.0 + np.exp(-logit(calibration, global_scores, inliers)))


def _fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, iterations: int = 50) -> tuple[np.ndarray, float]:
    """Newton's method on the L2-regularised logistic log-likelihood (bias unregularised):
    (weights [D] and bias, negative log-likelihood)."""
    x1 = np.column_stack([x, np.ones(len(x))])
    w = np.zeros(x1.shape[1])
    ridge = l2 * np.diag(np.r_[np.ones(x.shape[1]), 0.0])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(x1 @ w)))
        grad = x1.T @ (p - y) + ridge @ w
        hess = (x1 * (p * (1 - p))[:, None]).T @ x1 + ridge + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    z = x1 @ w
    return w, float(np.sum(np.logaddexp(0.0, z) - y * z))


def _fit_monotone(x: np.ndarray, y: np.ndarray, l2: float) -> tuple[np.ndarray, float]:
    """`_fit_logistic` with every weight >= 0: a feature whose fitted weight comes out
    negative is dropped (weight 0) and the rest refitted, until none is (an active set).

    P(same) must not fall as the global similarity or the inlier count rises: a negative
    weight is an artefact of how the training pairs were sampled (their negatives are the
    hard, high-similarity ones), and it would turn the global order upside down among
    the unverified references of a query. Returns (weights [D] and bias, NLL)."""
    active = list(range(x.shape[1]))
    while True:
        w_active, nll = _fit_logistic(x[:, active], y, l2)
        negative = [j for j, v in zip(active, w_active[:-1], strict=True) if v < 0]
        if not negative:
            w = np.zeros(x.shape[1] + 1)
            w[active] = w_active[:-1]
            w[-1] = w_active[-1]
            return w, nll
        active = [j for j in active if j not in negative]


def fit(global_scores, inliers, same, conf: dict = default_conf) -> dict:
    """Fits the calibration on training pairs.

    Args:
        global_scores: float [N] global similarity of each pair.
        inliers: int [N] verified inliers of each pair.
        same: bool [N] whether the pair shows the same class.
        conf: "hinge_grid" (candidate t0), "l2", "min_pairs".

    Returns:
        {"w_global", "w_verify", "min_inliers" (t0), "bias", "source", "pairs",
         "positives", "nll"}; `DEFAULT` (with its "source") when there are fewer than
        `min_pairs` positive or negative pairs.
    """
    y = np.asarray(same, np.float64)
    n_pos, n_neg = int(y.sum()), int(len(y) - y.sum())
    if min(n_pos, n_neg) < conf["min_pairs"]:
        logger.warning("calibration: %d same-class and %d other pairs, too few to fit: %s", n_pos, n_neg,
                       DEFAULT["source"])
        return dict(DEFAULT, pairs=len(y), positives=n_pos)
    best = None
    for t0 in conf["hinge_grid"]:
        w, nll = _fit_monotone(features(global_scores, inliers, t0), y, conf["l2"])
        if best is None or nll < best[2] - 1e-9:
            best = (t0, w, nll)
    t0, w, nll = best
    return {"w_global": float(w[0]), "w_verify": float(w[1]), "min_inliers": float(t0), "bias": float(w[2]),
            "source": f"fitted on {len(y)} training pairs ({n_pos} same class)", "pairs": len(y),
            "positives": n_pos, "nll": nll}


def read(path: Path | None) -> dict:
    """A calibration file written by `main`, or `DEFAULT` when `path` is None."""
    return dict(DEFAULT) if path is None else json.loads(Path(path).read_text())


def main(conf: dict, pairs_path: Path, inliers_dir: Path, out_dir: Path) -> Path:
    """Fits the calibration on the verified training pairs and writes ``calibration.json``.

    Args:
        conf: the calibration conf (see `default_conf`).
        pairs_path: ``calibration-pairs.npz`` from stage 1: "queries", "references" str [N],
            "global_scores" float32 [N], "same" bool [N].
        inliers_dir: the inlier cache folder that verified them (`verify.main`).
        out_dir: where ``calibration.json`` is written.

    Returns:
        The ``calibration.json`` path.
    """
    with np.load(pairs_path, allow_pickle=False) as f:
        queries, refs = f["queries"].tolist(), f["references"].tolist()
        scores, same = f["global_scores"], f["same"]
    pairs: dict[str, list[str]] = {}
    for q, r in zip(queries, refs, strict=True):
        pairs.setdefault(q, []).append(r)
    counts = load_inliers(FeatureStore.open(Path(inliers_dir)), pairs)
    known = np.array([r in counts.get(q, {}) for q, r in zip(queries, refs, strict=True)], bool)
    inliers = np.array([counts.get(q, {}).get(r, 0) for q, r in zip(queries, refs, strict=True)], np.float64)
    calibration = fit(scores[known], inliers[known], same[known], conf)
    logger.info("verification calibration: %s; logit P(same) = %.2f * global + %.2f * max(0, log(1 + inliers) - "
                "log(1 + %g)) %+.2f", calibration["source"], calibration["w_global"], calibration["w_verify"],
                calibration["min_inliers"], calibration["bias"])
    path = Path(out_dir) / "calibration.json"
    atomic_write_json(path, calibration)
    return path


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, required=True, help="calibration-pairs.npz from stage 1")
    parser.add_argument("--inliers", type=Path, required=True, help="inlier cache folder (cache/rerank/<conf>-<hash>/)")
    parser.add_argument("--output", type=Path, required=True, help="folder for calibration.json")
    args = parser.parse_args(argv)
    setup_logging()
    print(main(default_conf, args.pairs, args.inliers, args.output))


if __name__ == "__main__":
    cli()
