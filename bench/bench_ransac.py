"""Benchmark of stage 3: OpenCV vs scikit-image RANSAC on the same pairs, and matching cost.

Usage:
    python bench/bench_ransac.py --features cache/local/<conf>-<hash> --pairs runs/x/pairs-global-top100.txt
    python bench/bench_ransac.py            # synthetic: RootSIFT on scikit-image photos vs warps

Without --features/--pairs it builds synthetic pairs: each photo against perspective warps
of itself (positives) and against warps of other photos (negatives), about 1000 RootSIFT
keypoints per image. For every pair it times the putative matching (one matrix product)
and both RANSAC backends on the same matches, single-threaded (BLAS limited to one thread
unless OPENBLAS_NUM_THREADS says otherwise), and prints markdown tables. With --parallel
it also times `verify.main` end to end with the loky and threading joblib backends; with
--distribution (synthetic) it prints inlier percentiles of same-photo vs different-photo pairs.
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

from pipeline.cache import FeatureStore  # noqa: E402
from pipeline.conf import resolve  # noqa: E402
from stages.rerank import matching, ransac, synthetic, verify  # noqa: E402


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


def store_features(features_dir: Path, pairs_path: Path, max_pairs: int) -> tuple[dict, list[tuple[str, str, bool]]]:
    """Reads the first `max_pairs` pairs of a shortlist and their images' local features."""
    from stages.global_embed.search import read_pairs

    store = FeatureStore.open(features_dir)
    pairs = [(q, r, None) for q, refs in read_pairs(pairs_path).items() for r in refs][:max_pairs]
    names = {n for q, r, _ in pairs for n in (q, r)}
    return {n: store.read(n) for n in names}, pairs


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def run_pairs(feats: dict, pairs: list, conf: dict, skimage_pairs: int) -> list[dict]:
    """Per-pair timings and inlier counts (features converted once per image, untimed)."""
    prepared = {n: (verify.prepare(f, True), verify.prepare(f, False)) for n, f in feats.items()}
    cv_conf = conf["ransac"]
    sk_conf = {**cv_conf, "backend": "skimage"}
    rows = []
    for i, (query, ref, positive) in enumerate(pairs):
        q_groups, r_groups = prepared[query][0], prepared[ref][1]
        row = {"positive": positive, "matching_s": 0.0, "opencv_s": 0.0, "skimage_s": 0.0, "matches": 0,
               "opencv": 0, "skimage": None, "keypoints": sum(len(g[0]) for g in q_groups),
               "dim": q_groups[0][1].shape[1] if q_groups else 0}
        for q_xy, q_desc in q_groups:
            for r_xy, r_desc in r_groups:
                m, dt = _timed(matching.match, q_desc, r_desc, conf["matcher"])
                row["matching_s"] += dt
                row["matches"] = max(row["matches"], len(m))
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


def report(rows: list[dict], conf: dict) -> str:
    both = [r for r in rows if r["skimage"] is not None]
    cv_ms = _mean(r["opencv_s"] for r in both) * 1e3
    sk_ms = _mean(r["skimage_s"] for r in both) * 1e3
    lines = [
        f"pairs: {len(rows)} ({len(both)} with both backends); matcher {conf['matcher']['method']}, "
        f"descriptor dim {rows[0]['dim'] if rows else '-'}, model {conf['ransac']['model']}, "
        f"threshold {conf['ransac']['threshold']} px, "
        f"max_iters {conf['ransac']['max_iters']}, OpenCV confidence {conf['ransac']['confidence']}; "
        f"mean keypoints per query {_mean(r['keypoints'] for r in rows):.0f}, "
        f"mean putative matches {_mean(r['matches'] for r in rows):.0f}",
        "",
        "| pairs | n | OpenCV ms/pair | skimage ms/pair | speed ratio | OpenCV mean inliers "
        "| skimage mean inliers | rel. diff |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = [("all", both)]
    if any(r["positive"] is not None for r in both):
        groups += [("positive", [r for r in both if r["positive"]]),
                   ("negative", [r for r in both if not r["positive"]])]
    for label, sel in groups:
        cv_in, sk_in = _mean(r["opencv"] for r in sel), _mean(r["skimage"] for r in sel)
        c, s = _mean(r["opencv_s"] for r in sel) * 1e3, _mean(r["skimage_s"] for r in sel) * 1e3
        lines.append(f"| {label} | {len(sel)} | {c:.2f} | {s:.1f} | {s / c:.0f}x | {cv_in:.1f} | {sk_in:.1f} "
                     f"| {(cv_in - sk_in) / max(sk_in, 1e-9):+.1%} |")
    match_ms = _mean(r["matching_s"] for r in rows) * 1e3
    cv_all_ms = _mean(r["opencv_s"] for r in rows) * 1e3
    total = match_ms + cv_all_ms
    lines += [
        "",
        "| per pair, one core | ms | pairs/s |",
        "|---|---|---|",
        f"| matching (matrix product + NN) | {match_ms:.2f} | {1e3 / match_ms:.0f} |",
        f"| OpenCV RANSAC | {cv_all_ms:.2f} | {1e3 / cv_all_ms:.0f} |",
        f"| verification (matching + OpenCV RANSAC) | {total:.2f} | {1e3 / total:.0f} |",
        f"| skimage RANSAC (reference) | {sk_ms:.1f} | {1e3 / sk_ms:.1f} |",
    ]
    if both:
        lines.append(f"\nOpenCV vs skimage: {sk_ms / cv_ms:.0f}x faster on the same {len(both)} pairs")
    return "\n".join(lines)


def bench_parallel(feats: dict, pairs: list, conf: dict, workers: int) -> str:
    """End-to-end `verify.main` throughput (feature files read from disk) per joblib backend."""
    lines = ["| joblib backend | workers | pairs | s | pairs/s |", "|---|---|---|---|---|"]
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
    return "\n".join(lines)


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
    parser.add_argument("--conf", default="mnn-affine-opencv", choices=sorted(verify.confs), help="verification conf")
    parser.add_argument("--confidence", type=float, help="override the OpenCV RANSAC confidence")
    parser.add_argument("--max-pairs", type=int, default=200, help="pairs read from --pairs")
    parser.add_argument("--skimage-pairs", type=int, default=40, help="pairs also run through skimage (slow)")
    parser.add_argument("--n-features", type=int, default=1000, help="synthetic: keypoints per image")
    parser.add_argument("--warps", type=int, default=3, help="synthetic: warped views per photo")
    parser.add_argument("--seed", type=int, default=0, help="synthetic warps seed")
    parser.add_argument("--side", type=int, default=800, help="synthetic: longer photo side in pixels")
    parser.add_argument("--dim", type=int, help="synthetic: PCA-reduce descriptors to this dimension (40: DELF)")
    parser.add_argument("--parallel", action="store_true", help="also time verify.main per joblib backend")
    parser.add_argument("--distribution", action="store_true",
                        help="synthetic: inlier percentiles over every pair, same photo vs different photos")
    parser.add_argument("--workers", type=int, default=2, help="--parallel: joblib workers")
    args = parser.parse_args()
    conf = resolve(verify.default_conf, verify.confs, args.conf)
    conf["ransac"]["backend"] = "opencv"
    if args.confidence is not None:
        conf["ransac"]["confidence"] = args.confidence
    cv2.setNumThreads(1)
    if args.features or args.pairs:
        if not (args.features and args.pairs):
            parser.error("--features and --pairs go together")
        feats, pairs = store_features(args.features, args.pairs, args.max_pairs)
    else:
        feats, pairs = synthetic_features(args.n_features, args.warps, args.seed, args.side)
        if args.dim:
            feats = reduce_dim(feats, args.dim)
    run_pairs(feats, pairs[:2], conf, 0)  # warm-up: OpenCV and BLAS initialisation
    print(report(run_pairs(feats, pairs, conf, args.skimage_pairs), conf))
    if args.distribution and not args.features:
        print()
        print(inlier_distribution(feats, conf))
    if args.parallel:
        print()
        # every image against every other one: many pairs per query, as in a shortlist
        every = [(q, r, None) for q in feats for r in feats if r != q]
        print(bench_parallel(feats, every, conf, args.workers))


if __name__ == "__main__":
    main()
