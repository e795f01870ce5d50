"""How far the reranking evidence can take a data set: upper bounds measured on a finished run.

Usage:
    python bench/rerank_ceiling.py --run runs/grocery_store --cache cache \
        --data ../shared/data/grocery_store

Reads a default run's output folder (``global_ranking.npz``, ``reference_descriptors.npz``,
``rankings.json``, the ``pairs-*.txt`` shortlists it verified) and the cache it ran on, and
prints mAP per kind (``test/ground_truth_<kind>.csv`` where present) for:

- the global ranking and the run's final ranking;
- the best of a grid of merges ``global score + w * max(0, inliers - t)``, the grid point
  chosen on the test set itself: more than any merge of these two evidences that is fitted
  without the answers can be expected to reach;
- an oracle expansion: each query expanded (average query expansion on the stage-1
  reference descriptors) with the first relevant reference of the run's ranking, i.e. what a
  verified query expansion reaches if verification always picked a right reference;
- the ROC AUC of the inliers of reference-reference pairs (each reference against its
  `--neighbours` nearest references by the global descriptor), i.e. whether verifying the
  references among themselves could link the relevant ones.

Everything reads cached counts except the reference pairs, which are verified here with the
run's rerank conf (about 50 s for 220 references x 40 neighbours on 2 cores).
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import header, table  # noqa: E402
from pipeline.analysis import roc_auc  # noqa: E402
from pipeline.evaluate import evaluate  # noqa: E402
from stages.common.cache import FeatureStore  # noqa: E402
from stages.common.dataset import load_dataset, read_ground_truth  # noqa: E402
from stages.local_delf import extract as local_extract  # noqa: E402
from stages.rerank import verified_qe, verify  # noqa: E402
from stages.rerank.inliers import load_all_inliers  # noqa: E402

MERGE_GRID = {"t": [20, 30, 40, 60], "w": [0.002, 0.005, 0.01, 0.02]}
ORACLE_BETAS = [0.5, 1.0, 4.0]


def kinds_of(data: Path, ground_truth: dict[str, set[str]]) -> dict[str, list[str]]:
    """{kind: queries}: "all", plus one kind per ``test/ground_truth_<kind>.csv``."""
    kinds = {"all": sorted(ground_truth)}
    for path in sorted((data / "test").glob("ground_truth_*.csv")):
        kinds[path.stem.removeprefix("ground_truth_")] = sorted(read_ground_truth(path))
    return kinds


def mean_ap(lists: dict[str, list[str]], ground_truth: dict[str, set[str]], kinds: dict) -> list[float]:
    """mAP of {query: ranked references} over each kind's queries, in `kinds` order."""
    return [evaluate({q: lists[q] for q in queries}, ground_truth)["mAP"] for queries in kinds.values()]


def merged(names, refs, order, scores, inliers, t: float, w: float) -> dict[str, list[str]]:
    """Each ranking re-sorted by global score + w * max(0, inliers - t) (ties: global order)."""
    out = {}
    for i, query in enumerate(names):
        counts = inliers.get(query, {})
        n = np.array([counts.get(refs[j], 0) for j in order[i]], np.float64)
        key = scores[i] + w * np.maximum(n - t, 0.0)
        out[query] = [refs[j] for j in order[i][np.argsort(-key, kind="stable")]]
    return out


def oracle_expansion(names, refs, order, scores, ref_desc, final, ground_truth, beta: float) -> dict:
    """The pipeline's verified query expansion (`verified_qe.expand`) with the first
    relevant reference of each final ranking as the one confident reference, put first; the
    rest sorted by global score + beta * cosine to that reference."""
    column = {r: j for j, r in enumerate(refs)}
    by_ref = np.full(order.shape, -np.inf)
    np.put_along_axis(by_ref, order.astype(np.int64), scores, axis=1)
    anchors = np.array([column[next(r for r in final[q] if r in ground_truth[q])] for q in names])
    confident = np.zeros(order.shape, bool)
    confident[np.arange(len(names)), anchors] = True
    rest = np.tile(np.arange(len(refs)), (len(names), 1))[~confident].reshape(len(names), -1)
    anchored = np.column_stack([anchors, rest])
    expanded = verified_qe.expand(anchored, by_ref, confident, np.sqrt(beta) * ref_desc, 1)
    return {q: [refs[j] for j in expanded[i]] for i, q in enumerate(names)}


def reference_pairs_auc(refs, ref_desc, local: FeatureStore, ground_truth, neighbours: int,
                        conf: dict) -> tuple[float, int]:
    """ROC AUC of the inliers of reference pairs (each reference against its nearest
    `neighbours` references by descriptor), same product = relevant to a common query.
    Returns (AUC, or None without pairs of both kinds; pairs verified)."""
    product = {}
    for relevant in ground_truth.values():
        for r in relevant:
            product.setdefault(r, min(relevant))
    prepared = {r: verify.prepare(local.read(r), False) for r in refs}
    done, same, counts = set(), [], []
    for i, r in enumerate(refs):
        for j in np.argsort(-(ref_desc @ ref_desc[i]))[1:neighbours + 1]:
            pair = (min(i, j), max(i, j))
            if pair in done or r not in product or refs[j] not in product:
                continue
            done.add(pair)
            counts.append(verify.verify_prepared(prepared[r], prepared[refs[j]], conf))
            same.append(product[r] == product[refs[j]])
    same, counts = np.array(same), np.array(counts)
    return roc_auc(counts[same], counts[~same]), len(counts)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="output folder of a default run with ground truth")
    parser.add_argument("--cache", type=Path, required=True, help="the cache folder that run used")
    parser.add_argument("--data", type=Path, required=True, help="the data folder of that run")
    parser.add_argument("--neighbours", type=int, default=40, help="references verified per reference (default: 40)")
    args = parser.parse_args(argv)

    ranking = np.load(args.run / "global_ranking.npz")
    names, refs = [str(q) for q in ranking["query_names"]], [str(r) for r in ranking["ref_names"]]
    order, scores = ranking["order"], ranking["scores"].astype(np.float64)
    descriptors = np.load(args.run / "reference_descriptors.npz")
    ref_desc = descriptors["descriptors"].astype(np.float32)
    ref_desc /= np.maximum(np.linalg.norm(ref_desc, axis=1, keepdims=True), 1e-12)
    if [str(r) for r in descriptors["ref_names"]] != refs:
        raise SystemExit("reference_descriptors.npz and global_ranking.npz name different references")
    final = json.loads((args.run / "rankings.json").read_text())
    ground_truth = {q: g for q, g in read_ground_truth(args.data / "test" / "ground_truth.csv").items() if q in final}
    kinds = kinds_of(args.data, ground_truth)

    conf = json.loads((args.run / "config.json").read_text())
    local = local_extract.store_for(conf["local"], args.cache, local_extract.pca_source(load_dataset(args.data)))
    if not local.path(refs[0]).exists():
        raise SystemExit(f"{local.dir} holds no local features of {refs[0]}: not the cache this run used")
    inlier_store = verify.store_for(conf["rerank"], args.cache, local)
    inliers = load_all_inliers(inlier_store, sorted(args.run.glob("pairs-global-top*.txt")))

    rows = [["global", *mean_ap({q: [refs[j] for j in order[i]] for i, q in enumerate(names)}, ground_truth, kinds)],
            ["the run's final ranking", *mean_ap(final, ground_truth, kinds)]]
    best = max(((t, w, mean_ap(merged(names, refs, order, scores, inliers, t, w), ground_truth, kinds))
                for t in MERGE_GRID["t"] for w in MERGE_GRID["w"]), key=lambda x: x[2][0])
    rows.append([f"best merge global + {best[1]} * max(0, inliers - {best[0]}) (grid on the test set)", *best[2]])
    for beta in ORACLE_BETAS:
        rows.append([f"oracle expansion with a relevant reference, beta {beta:g}",
                     *mean_ap(oracle_expansion(names, refs, order, scores, ref_desc, final, ground_truth, beta),
                              ground_truth, kinds)])
    auc, pairs = reference_pairs_auc(refs, ref_desc, local, ground_truth, args.neighbours, conf["rerank"])
    text = "\n".join([
        header(f"Reranking ceiling: {args.data.name}"),
        table(["ranking", *(f"mAP {k}" for k in kinds)], [[r[0], *(f"{v:.4f}" for v in r[1:])] for r in rows]), "",
        f"Reference-reference verification: {pairs} pairs, ROC AUC of inliers (same product vs not) "
        + (f"{auc:.3f}" if auc is not None else "undefined (no two references of one product)"),
    ])
    print(text)
    return text


if __name__ == "__main__":
    main()
