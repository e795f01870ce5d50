"""Benchmark of stage 3: OpenCV vs scikit-image RANSAC, and matrix-product vs cKDTree matching,
on the same pairs; where a verification's time goes.

Usage:
    python bench/bench_ransac.py --features cache/local/<conf>-<hash> --pairs runs/x/pairs-global-top100.txt
    python bench/bench_ransac.py            # synthetic: RootSIFT on scikit-image photos vs warps

Without --features/--pairs it builds synthetic pairs: each photo against perspective warps
of itself (positives) and against warps of other photos (negatives), about 1000 RootSIFT
keypoints per image. For every pair it times the putative matching (one matrix product),
the same matching by scipy ``cKDTree`` (trees built per pair, as DELF's ``match_images.py``
does) and both RANSAC backends on the same matches, single-threaded (BLAS limited to one
thread unless OPENBLAS_NUM_THREADS says otherwise), and prints markdown tables: times per
pipeline pair (a query's rotation groups against one reference) and per group pair (one
set of query keypoints against one reference), ratios, and whether the two matchers and
the two RANSACs agree. --breakdown splits a group pair's CPU time into its parts (matrix
product, nearest-neighbour reductions, RANSAC) and times one matrix product for several
groups or references at once. With --parallel it also times `verify.main` end to end with
the loky and threading joblib backends; with --distribution (synthetic) it prints inlier
percentiles of same-photo vs different-photo pairs. --json saves the numbers.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # per-core timings; must precede numpy
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt, header, save_results  # noqa: E402
from stages.common.cache import FeatureStore  # noqa: E402
from stages.common.conf import resolve  # noqa: E402
from stages.rerank import matching, ransac, synthetic, verify  # noqa: E402


def kdtree_match(desc_q: np.ndarray, desc_r: np.ndarray, conf: dict, trees: tuple | None = None) -> np.ndarray:
    """The matchers of `stages.rerank.matching`, by scipy ``cKDTree`` nearest-neighbour queries
    (the reference implementation: DELF's ``match_images.py`` queries a KD-tree of the index
    image). Returns int64 [M, 2] (query row, reference row) sorted by query row.

    Args:
        trees: (tree of desc_r, tree of desc_q or None) built beforehand; built here when None.
    """
    from scipy.spatial import cKDTree

    if len(desc_q) == 0 or len(desc_r) == 0:
        return np.zeros((0, 2), np.int64)
    q = np.asarray(desc_q, np.float64 if desc_q.dtype == np.float64 else np.float32)
    r = np.asarray(desc_r, q.dtype)
    method = conf["method"]
    tree_r = trees[0] if trees else cKDTree(r)
    if method == "ratio":
        dist, idx = tree_r.query(q, k=2)
        if len(r) == 1:
            rows = np.arange(len(q))
            return np.stack([rows, np.zeros(len(q), np.int64)], 1)
        rows = np.flatnonzero(dist[:, 0] < conf["ratio"] * dist[:, 1])
        return np.stack([rows, idx[rows, 0]], 1).astype(np.int64)
    dist, nn = tree_r.query(q, k=1)
    if method == "distance":
        rows = np.flatnonzero(dist < conf["distance_threshold"])
        return np.stack([rows, nn[rows]], 1).astype(np.int64)
    tree_q = trees[1] if trees and trees[1] is not None else cKDTree(q)
    _, back = tree_q.query(r, k=1)
    rows = np.flatnonzero(back[nn] == np.arange(len(q)))
    return np.stack([rows, nn[rows]], 1).astype(np.int64)


def synthetic_features(n_features: int, warps: int, seed: int, side: int) -> tuple[dict, list[tuple[str, str, bool]]]:
    """{name: stage-2 entry} and [(query, reference, is_positive)] from scikit-image photos:
    each photo against its `warps` perspective warps, then against a warp of the next photo."""
    rng = np.random.default_rng(seed)
    feats = {}
    for name in synthetic.PHOTOS:
        gray = synthetic.photo_gray(name, side)
        feats[name] = synthetic.rootsift(gray, n_features)
        h, w = gray.shape
        for i in range(warps):
            view = f"{name}~warp{i}"
            feats[view] = synthetic.rootsift(synthetic.warp(gray, synthetic.random_homography(w, h, rng)), n_features)
    pairs = []
    for i, name in enumerate(synthetic.PHOTOS):
        pairs += [(name, f"{name}~warp{j}", True) for j in range(warps)]
        pairs.append((name, f"{synthetic.PHOTOS[(i + 1) % len(synthetic.PHOTOS)]}~warp0", False))
    return feats, pairs


def reduce_dim(feats: dict, dim: int) -> dict:
    """Projects every image's descriptors on the `dim` leading principal components of all
    of them and re-normalises, like DELF's PCA to 40-d (for timing at DELF's dimension)."""
    stacked = np.concatenate([f["descriptors"] for f in feats.values()]).astype(np.float32)
    mean = stacked.mean(axis=0)
    basis = np.linalg.svd(stacked - mean, full_matrices=False)[2][:dim].T
    out = {}
    for name, f in feats.items():
        d = (f["descriptors"].astype(np.float32) - mean) @ basis
        out[name] = {**f, "descriptors": (d / np.linalg.norm(d, axis=1, keepdims=True)).astype(np.float16)}
    return out


def store_features(features_dir: Path, pairs_path: Path, max_pairs: int,
                   ground_truth: Path | None = None) -> tuple[dict, list[tuple[str, str, bool | None]]]:
    """Reads `max_pairs` pairs of a shortlist, evenly spaced over it (so over its queries),
    and their images' local features; with a ground-truth csv, marks the true pairs."""
    from stages.common.shortlist import read_pairs

    store = FeatureStore.open(features_dir)
    every = [(q, r) for q, refs in read_pairs(pairs_path).items() for r in refs]
    take = np.unique(np.linspace(0, len(every) - 1, min(max_pairs, len(every))).round().astype(int))
    truth = None
    if ground_truth is not None:
        import csv

        with open(ground_truth, newline="") as f:
            truth = {(row["query"], row["reference"]) for row in csv.DictReader(f)}
    pairs = [(q, r, None if truth is None else (q, r) in truth) for q, r in (every[i] for i in take)]
    if truth is not None:
        # Shortlists hold about one true pair per query: take true pairs on purpose, a quarter
        # of the sample, and alternate them with the others so any prefix (the skimage and
        # cKDTree subsets) holds both.
        true = [(q, r) for q, r in every if (q, r) in truth]
        true = [true[i] for i in np.unique(np.linspace(0, len(true) - 1, min(len(true), max_pairs // 4)).round()
                                           .astype(int))] if true else []
        negatives = [p for p in pairs if not p[2]][: max_pairs - len(true)]
        positives = [(q, r, True) for q, r in true]
        pairs = [p for two in zip(positives, negatives, strict=False) for p in two]
        pairs += positives[len(negatives):] + negatives[len(positives):]
    names = {n for q, r, _ in pairs for n in (q, r)}
    return {n: store.read(n) for n in names}, pairs


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _unit64(desc: np.ndarray) -> np.ndarray:
    d = np.asarray(desc, np.float64)
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _mutual_nn64(desc_q: np.ndarray, desc_r: np.ndarray) -> np.ndarray:
    """`matching.mutual_nn` with the similarities in float64."""
    sim = np.asarray(desc_q, np.float64) @ np.asarray(desc_r, np.float64).T
    nn = sim.argmax(axis=1)
    rows = np.flatnonzero(sim[np.arange(len(sim)), nn] >= sim.max(axis=0)[nn])
    _, first = np.unique(nn[rows], return_index=True)
    rows = np.sort(rows[first])
    return np.stack([rows, nn[rows]], 1)


def run_pairs(feats: dict, pairs: list, conf: dict, skimage_pairs: int, kdtree_pairs: int = 0) -> list[dict]:
    """Per-pair timings and inlier counts (features converted once per image, untimed).

    The first `skimage_pairs` pairs also run skimage RANSAC on the same matches, the first
    `kdtree_pairs` also cKDTree matching (compared with the matrix-product matches)."""
    prepared = {n: (verify.prepare(f, True), verify.prepare(f, False)) for n, f in feats.items()}
    cv_conf = conf["ransac"]
    sk_conf = {**cv_conf, "backend": "skimage"}
    rows = []
    for i, (query, ref, positive) in enumerate(pairs):
        q_groups, r_groups = prepared[query][0], prepared[ref][1]
        row = {"positive": positive, "matching_s": 0.0, "opencv_s": 0.0, "skimage_s": 0.0, "matches": 0,
               "opencv": 0, "skimage": None, "keypoints": sum(len(g[0]) for g in q_groups),
               "ref_keypoints": sum(len(g[0]) for g in r_groups), "groups": len(q_groups) * len(r_groups),
               "dim": q_groups[0][1].shape[1] if q_groups else 0, "kdtree_s": None, "kdtree_query_s": None,
               "kdtree_same": None, "kdtree_diff": 0, "matches_total": 0}
        for q_xy, q_desc in q_groups:
            for r_xy, r_desc in r_groups:
                m, dt = _timed(matching.match, q_desc, r_desc, conf["matcher"])
                row["matching_s"] += dt
                row["matches"] = max(row["matches"], len(m))
                row["matches_total"] += len(m)
                if i < kdtree_pairs:
                    from scipy.spatial import cKDTree

                    (k, dt) = _timed(kdtree_match, q_desc, r_desc, conf["matcher"])
                    trees = (cKDTree(r_desc), cKDTree(q_desc) if conf["matcher"]["method"] == "mutual_nn" else None)
                    _, dt_query = _timed(kdtree_match, q_desc, r_desc, conf["matcher"], trees)
                    row["kdtree_s"] = (row["kdtree_s"] or 0.0) + dt
                    row["kdtree_query_s"] = (row["kdtree_query_s"] or 0.0) + dt_query
                    a, b = set(map(tuple, m.tolist())), set(map(tuple, k.tolist()))
                    row["kdtree_diff"] += len(a ^ b)
                    if conf["matcher"]["method"] == "mutual_nn":
                        # Where do differences come from? Both rules on descriptors re-normalised
                        # in float64 (float16 storage leaves norms off 1 by ~1e-3, and then the
                        # nearest neighbour by L2 distance need not be the largest inner product).
                        q64, r64 = _unit64(q_desc), _unit64(r_desc)
                        row["kdtree_diff64"] = row.get("kdtree_diff64", 0) + len(
                            set(map(tuple, _mutual_nn64(q64, r64).tolist()))
                            ^ set(map(tuple, kdtree_match(q64, r64, conf["matcher"]).tolist())))
                    row["kdtree_same"] = (row["kdtree_same"] is not False) and a == b
                pq, pr = q_xy[m[:, 0]], r_xy[m[:, 1]]
                (n_cv, _), dt = _timed(ransac.count_inliers, pq, pr, cv_conf)
                row["opencv_s"] += dt
                row["opencv"] = max(row["opencv"], n_cv)
                if i < skimage_pairs:
                    (n_sk, _), dt = _timed(ransac.count_inliers, pq, pr, sk_conf)
                    row["skimage_s"] += dt
                    row["skimage"] = max(row["skimage"] or 0, n_sk)
        rows.append(row)
    return rows


def _mean(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def report(rows: list[dict], conf: dict) -> tuple[str, dict]:
    """Markdown tables of `run_pairs` rows, and the numbers as a dict."""
    both = [r for r in rows if r["skimage"] is not None]
    groups = _mean(r["groups"] for r in rows)
    lines = [
        f"{len(rows)} pairs ({len(both)} also with skimage); matcher {conf['matcher']['method']}, "
        f"descriptor dim {rows[0]['dim'] if rows else '-'}, model {conf['ransac']['model']}, "
        f"threshold {conf['ransac']['threshold']} px, "
        f"max_iters {conf['ransac']['max_iters']}, OpenCV confidence {conf['ransac']['confidence']}; "
        f"mean keypoints per query {_mean(r['keypoints'] for r in rows):.0f} in {groups:.1f} rotation groups, "
        f"per reference {_mean(r['ref_keypoints'] for r in rows):.0f}; "
        f"mean putative matches per group {_mean(r['matches_total'] / max(r['groups'], 1) for r in rows):.0f}. "
        "Wall time, one thread.",
        "",
        "| pairs | n | OpenCV ms/pair | skimage ms/pair | speed ratio | OpenCV mean inliers "
        "| skimage mean inliers | rel. diff | same count |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    sets = [("all", both)]
    if any(r["positive"] is not None for r in both):
        sets += [("positive", [r for r in both if r["positive"]]),
                 ("negative", [r for r in both if not r["positive"]])]
    for label, sel in sets:
        if not sel:
            continue
        cv_in, sk_in = _mean(r["opencv"] for r in sel), _mean(r["skimage"] for r in sel)
        c, s = _mean(r["opencv_s"] for r in sel) * 1e3, _mean(r["skimage_s"] for r in sel) * 1e3
        same = sum(r["opencv"] == r["skimage"] for r in sel)
        within = sum(abs(r["opencv"] - r["skimage"]) <= max(2, 0.1 * r["skimage"]) for r in sel)
        lines.append(f"| {label} | {len(sel)} | {c:.2f} | {s:.1f} | {s / c:.0f}x | {cv_in:.1f} | {sk_in:.1f} "
                     f"| {(cv_in - sk_in) / max(sk_in, 1e-9):+.1%} | {same}/{len(sel)} equal, "
                     f"{within}/{len(sel)} within max(2, 10%) |")
    match_ms = _mean(r["matching_s"] for r in rows) * 1e3
    cv_all_ms = _mean(r["opencv_s"] for r in rows) * 1e3
    total = match_ms + cv_all_ms
    sk_ms = _mean(r["skimage_s"] for r in both) * 1e3
    match_both = _mean(r["matching_s"] for r in both) * 1e3
    cv_both = _mean(r["opencv_s"] for r in both) * 1e3
    lines += [
        "",
        "| one core | ms per pipeline pair | pairs/s | ms per group pair | group pairs/s |",
        "|---|---|---|---|---|",
        f"| matching (matrix product + NN) | {match_ms:.2f} | {1e3 / match_ms:.0f} | {match_ms / groups:.2f} "
        f"| {1e3 * groups / match_ms:.0f} |",
        f"| OpenCV RANSAC | {cv_all_ms:.2f} | {1e3 / cv_all_ms:.0f} | {cv_all_ms / groups:.2f} "
        f"| {1e3 * groups / cv_all_ms:.0f} |",
        f"| **verification (matching + OpenCV RANSAC)** | {total:.2f} | {1e3 / total:.0f} | {total / groups:.2f} "
        f"| {1e3 * groups / total:.0f} |",
        f"| skimage RANSAC (reference) | {fmt(sk_ms)} | {fmt(1e3 / sk_ms)} | {fmt(sk_ms / groups)} "
        f"| {fmt(1e3 * groups / sk_ms)} |",
        f"| matching + skimage RANSAC (reference path) | {fmt(match_both + sk_ms)} | {fmt(1e3 / (match_both + sk_ms))} "
        f"| {fmt((match_both + sk_ms) / groups)} | {fmt(1e3 * groups / (match_both + sk_ms))} |",
    ]
    out = {"pairs": len(rows), "groups_per_pair": groups, "matching_ms_per_pair": match_ms,
           "opencv_ms_per_pair": cv_all_ms, "verify_ms_per_pair": total, "verify_pairs_per_s_core": 1e3 / total,
           "verify_group_pairs_per_s_core": 1e3 * groups / total,
           "keypoints_per_query": _mean(r["keypoints"] for r in rows),
           "keypoints_per_ref": _mean(r["ref_keypoints"] for r in rows)}
    if both:
        ransac_ratio = sk_ms / cv_both
        path_ratio = (match_both + sk_ms) / (match_both + cv_both)
        lines.append(f"\nOn the same {len(both)} pairs: OpenCV RANSAC {ransac_ratio:.0f}x faster than skimage; "
                     f"the verification path (matching + RANSAC) {path_ratio:.0f}x faster.")
        out.update({"skimage_pairs": len(both), "ransac_speed_ratio": ransac_ratio, "path_speed_ratio": path_ratio,
                    "opencv_mean_inliers": _mean(r["opencv"] for r in both),
                    "skimage_mean_inliers": _mean(r["skimage"] for r in both)})
    kd = [r for r in rows if r["kdtree_s"] is not None]
    if kd:
        kd_ms = _mean(r["kdtree_s"] for r in kd) * 1e3
        kdq_ms = _mean(r["kdtree_query_s"] for r in kd) * 1e3
        mm_ms = _mean(r["matching_s"] for r in kd) * 1e3
        same = sum(bool(r["kdtree_same"]) for r in kd)
        diff = sum(r["kdtree_diff"] for r in kd)
        diff64 = sum(r.get("kdtree_diff64") or 0 for r in kd)
        total_matches = sum(r["matches_total"] for r in kd)
        lines += [
            "",
            "| matcher, one core | ms per pipeline pair | speed ratio | pairs with identical matches "
            "| matches differing |",
            "|---|---|---|---|---|",
            f"| matrix product (pipeline) | {mm_ms:.2f} | 1x | - | - |",
            f"| scipy cKDTree, trees built per pair | {kd_ms:.2f} | {kd_ms / mm_ms:.1f}x slower | {same}/{len(kd)} "
            f"| {diff} of {total_matches} |",
            f"| scipy cKDTree, trees prebuilt (query only) | {kdq_ms:.2f} | {kdq_ms / mm_ms:.1f}x slower "
            "| same | same |",
            "",
            f"With both sides' descriptors re-normalised to unit length in float64, {diff64} of {total_matches} "
            "matches differ: the differences above are near-ties, where float16 storage (norms off 1 by ~1e-3) "
            "lets the L2 nearest neighbour and the largest inner product disagree.",
        ]
        out.update({"kdtree_pairs": len(kd), "kdtree_ms_per_pair": kd_ms, "kdtree_query_ms_per_pair": kdq_ms,
                    "kdtree_matrix_ms_per_pair": mm_ms, "kdtree_speed_ratio": kd_ms / mm_ms,
                    "kdtree_identical_pairs": same, "kdtree_differing_matches": diff,
                    "kdtree_total_matches": total_matches, "kdtree_differing_matches_float64": diff64})
    return "\n".join(lines), out


def breakdown(feats: dict, pairs: list, conf: dict, repeats: int = 3) -> tuple[str, dict]:
    """Where a group pair's CPU time goes (mutual NN + OpenCV RANSAC), and whether one matrix
    product for several query groups or several references at once is cheaper per group pair."""
    prepared = {n: (verify.prepare(f, True), verify.prepare(f, False)) for n, f in feats.items()}
    parts = {"matrix product (float32 BLAS)": 0.0, "nearest-neighbour reductions": 0.0,
             "RANSAC (cv2.estimateAffine2D)": 0.0, "RANSAC wrapper (seeded shuffle, masks)": 0.0}
    n_groups, flops = 0, 0.0
    cv_conf = conf["ransac"]
    for _ in range(repeats):
        for query, ref, _ in pairs:
            for q_xy, q_desc in prepared[query][0]:
                for r_xy, r_desc in prepared[ref][1]:
                    c = time.process_time()
                    sim = matching.similarity(q_desc, r_desc)
                    c2 = time.process_time()
                    nn = sim.argmax(axis=1)
                    best = sim[np.arange(len(sim)), nn]
                    rows = np.flatnonzero(best >= sim.max(axis=0)[nn])
                    _, first = np.unique(nn[rows], return_index=True)
                    rows = np.sort(rows[first])
                    m = np.stack([rows, nn[rows]], 1)
                    c3 = time.process_time()
                    src = np.ascontiguousarray(q_xy[m[:, 0]], np.float32)
                    dst = np.ascontiguousarray(r_xy[m[:, 1]], np.float32)
                    c4 = time.process_time()
                    if len(m) > 3:
                        cv2.estimateAffine2D(src, dst, method=cv2.RANSAC,
                                             ransacReprojThreshold=float(cv_conf["threshold"]),
                                             maxIters=int(cv_conf["max_iters"]),
                                             confidence=float(cv_conf["confidence"]), refineIters=0)
                    c5 = time.process_time()
                    ransac.count_inliers(q_xy[m[:, 0]], r_xy[m[:, 1]], cv_conf)
                    c6 = time.process_time()
                    parts["matrix product (float32 BLAS)"] += c2 - c
                    parts["nearest-neighbour reductions"] += c3 - c2
                    parts["RANSAC (cv2.estimateAffine2D)"] += c5 - c4
                    parts["RANSAC wrapper (seeded shuffle, masks)"] += max((c6 - c5) - (c5 - c4), 0.0)
                    n_groups += 1
                    flops += 2.0 * len(q_desc) * len(r_desc) * q_desc.shape[1]
    total = sum(parts.values())
    lines = [f"CPU time per group pair, mean over {n_groups // repeats} group pairs x {repeats} repeats:", "",
             "| part | ms per group pair | share |", "|---|---|---|"]
    for name, t in parts.items():
        lines.append(f"| {name} | {t / n_groups * 1e3:.3f} | {t / total:.0%} |")
    lines.append(f"| total | {total / n_groups * 1e3:.3f} | 100% |")
    gflops = flops / max(parts["matrix product (float32 BLAS)"], 1e-9) / 1e9
    lines.append(f"\nMatrix product: {flops / n_groups / 1e6:.0f} MFLOP per group pair at {gflops:.1f} GFLOP/s "
                 "(one core).")
    # One product for many: all rotation groups of a query, or one group against 10 references.
    q_name = pairs[0][0]
    refs = [r for q, r, _ in pairs if q == q_name][:10]
    q_all = np.concatenate([g[1] for g in prepared[q_name][0]])
    q_one = prepared[q_name][0][0][1]
    r_all = np.concatenate([prepared[r][1][0][1] for r in refs])
    variants = [
        ("one query group x one reference (pipeline)", lambda: [q_one @ prepared[r][1][0][1].T for r in refs],
         len(refs)),
        ("all query groups stacked x one reference", lambda: [q_all @ prepared[r][1][0][1].T for r in refs],
         len(refs) * len(prepared[q_name][0])),
        ("one query group x 10 references stacked", lambda: q_one @ r_all.T, len(refs)),
    ]
    lines += ["", "| one matrix product for | ms per group pair (CPU, median of 7 interleaved rounds) |", "|---|---|"]
    out = {f"breakdown_ms_{k.split(' (')[0].replace(' ', '_')}": v / n_groups * 1e3 for k, v in parts.items()}
    out["breakdown_total_ms"] = total / n_groups * 1e3
    out["gemm_gflops"] = gflops
    rounds = {label: [] for label, _, _ in variants}
    for _, fn, _ in variants:
        fn()  # warm-up
    for _ in range(7):
        for label, fn, n in variants:
            c = time.process_time()
            for _ in range(5):
                fn()
            rounds[label].append((time.process_time() - c) / 5 / n * 1e3)
    for label, _, _ in variants:
        lines.append(f"| {label} | {np.median(rounds[label]):.3f} |")
    return "\n".join(lines), out


def bench_parallel(feats: dict, pairs: list, conf: dict, workers: int) -> str:
    """End-to-end `verify.main` throughput (feature files read from disk) per joblib backend."""
    lines = ["| joblib backend | workers | pairs | s | pairs/s |", "|---|---|---|---|---|"]
    numbers = {"verify_main_workers": workers}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        local = FeatureStore(tmp / "cache", "local", {"name": "bench"}, "bench")
        for name, f in feats.items():
            local.write(name, f)
        pairs_path = tmp / "pairs.txt"
        pairs_path.write_text("".join(f"{q}\t{r}\n" for q, r, _ in pairs))
        for backend in ("loky", "threading"):
            start = time.perf_counter()
            verify.main(conf, pairs_path, local.dir, tmp / f"cache-{backend}", workers=workers, backend=backend)
            seconds = time.perf_counter() - start
            lines.append(f"| {backend} | {workers} | {len(pairs)} | {seconds:.2f} | {len(pairs) / seconds:.0f} |")
            numbers[f"verify_main_{backend}_pairs_per_s"] = len(pairs) / seconds
    return "\n".join(lines), numbers


def inlier_distribution(feats: dict, conf: dict) -> str:
    """Inlier percentiles over every ordered synthetic pair, split by same photo or not
    (what `min_inliers` has to separate)."""
    prepared = {n: (verify.prepare(f, True), verify.prepare(f, False)) for n, f in feats.items()}
    same, other = [], []
    for q in feats:
        for r in feats:
            if q != r:
                n = verify.verify_prepared(prepared[q][0], prepared[r][1], conf)
                (same if q.split("~")[0] == r.split("~")[0] else other).append(n)
    lines = ["| pairs | n | min | p10 | p50 | p90 | p99 | max |", "|---|---|---|---|---|---|---|---|"]
    for label, values in (("same photo", same), ("different photos", other)):
        p = np.percentile(values, [10, 50, 90, 99])
        lines.append(f"| {label} | {len(values)} | {min(values)} | " + " | ".join(f"{v:.0f}" for v in p)
                     + f" | {max(values)} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, help="local-feature store folder (stage 2)")
    parser.add_argument("--pairs", type=Path, help="shortlist file (query<TAB>reference lines)")
    parser.add_argument("--ground-truth", type=Path, help="with --pairs: csv (query,reference) marking true pairs")
    parser.add_argument("--conf", default="mnn-affine-opencv", choices=sorted(verify.confs), help="verification conf")
    parser.add_argument("--confidence", type=float, help="override the OpenCV RANSAC confidence")
    parser.add_argument("--max-pairs", type=int, default=200, help="pairs taken from --pairs, evenly spaced")
    parser.add_argument("--skimage-pairs", type=int, default=40, help="pairs also run through skimage (slow)")
    parser.add_argument("--kdtree-pairs", type=int, default=40, help="pairs also matched with scipy cKDTree")
    parser.add_argument("--n-features", type=int, default=1000, help="synthetic: keypoints per image")
    parser.add_argument("--warps", type=int, default=3, help="synthetic: warped views per photo")
    parser.add_argument("--seed", type=int, default=0, help="synthetic warps seed")
    parser.add_argument("--side", type=int, default=800, help="synthetic: longer photo side in pixels")
    parser.add_argument("--dim", type=int, help="synthetic: PCA-reduce descriptors to this dimension (40: DELF)")
    parser.add_argument("--breakdown", action="store_true", help="split a group pair's CPU time into its parts")
    parser.add_argument("--parallel", action="store_true", help="also time verify.main per joblib backend")
    parser.add_argument("--distribution", action="store_true",
                        help="synthetic: inlier percentiles over every pair, same photo vs different photos")
    parser.add_argument("--workers", type=int, default=2, help="--parallel: joblib workers")
    parser.add_argument("--json", type=Path, help="merge the measured numbers into this JSON file")
    args = parser.parse_args()
    conf = resolve(verify.default_conf, verify.confs, args.conf)
    conf["ransac"]["backend"] = "opencv"
    if args.confidence is not None:
        conf["ransac"]["confidence"] = args.confidence
    cv2.setNumThreads(1)
    if args.features or args.pairs:
        if not (args.features and args.pairs):
            parser.error("--features and --pairs go together")
        feats, pairs = store_features(args.features, args.pairs, args.max_pairs, args.ground_truth)
        source = "real"
    else:
        feats, pairs = synthetic_features(args.n_features, args.warps, args.seed, args.side)
        if args.dim:
            feats = reduce_dim(feats, args.dim)
        source = "synthetic"
    print(header(f"Stage 3 verification, {source} features: OpenCV vs skimage RANSAC, matrix product vs cKDTree"))
    run_pairs(feats, pairs[:2], conf, 0)  # warm-up: OpenCV and BLAS initialisation
    text, numbers = report(run_pairs(feats, pairs, conf, args.skimage_pairs, args.kdtree_pairs), conf)
    print(text)
    if args.breakdown:
        print()
        text, more = breakdown(feats, pairs[: min(len(pairs), 60)], conf)
        print(text)
        numbers.update(more)
    if args.distribution and not args.features:
        print()
        print(inlier_distribution(feats, conf))
    if args.parallel:
        print()
        # real: the sampled shortlist pairs; synthetic: every image against every other one
        every = pairs if args.features else [(q, r, None) for q in feats for r in feats if r != q]
        text, more = bench_parallel(feats, every, conf, args.workers)
        print(text)
        numbers.update(more)
    save_results(args.json, f"verification_{source}", numbers)


if __name__ == "__main__":
    main()
