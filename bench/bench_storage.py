"""Benchmark of local-feature storage: bytes per image of the stage-2 cache entries as stored,
and of leaner encodings, with what int8 descriptors would do to verification on smvs_dvd.

Usage:
    python bench/bench_storage.py --features CACHE/local/delf-lite0-<hash> --run RUN_DIR
    python bench/bench_storage.py --features ... --run ... --no-verify      # sizes only

RUN_DIR is the output folder of a default smvs_dvd run made with the same features (its
shortlists ``pairs-global-top*.txt`` and ``global_ranking.npz``); the inlier counts of its
pairs are read from the run's rerank cache (`--cache`, default the features' cache root).

Encodings, each an uncompressed .npz as `stages.common.cache` writes them:
- "as stored": float16 descriptors, float32 keypoints, scores and scales, int16 rotations.
- "int8 descriptors": each unit-norm descriptor component stored as round(127 x) (int8);
  matching sees x / 127 (max error 0.004 per component); the rest as stored.
- "int8 descriptors, float16 geometry": also keypoints (sub-pixel to 0.5 px up to 1024 px),
  scores and scales in float16.

With verification, every pair of the run's shortlists is verified again (`verify.main`,
the pipeline's workers) on int8-quantised descriptors, the rankings merged as the pipeline
does with the same shortlists and windows, and inlier counts and mAP compared with the run's.
"""

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SMVS, fmt, header, save_results, table, timed  # noqa: E402


def npz_bytes(arrays: dict) -> int:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getbuffer().nbytes


def quantize(desc: np.ndarray) -> np.ndarray:
    """Unit-norm float descriptors -> int8 round(127 x)."""
    return np.clip(np.round(np.asarray(desc, np.float32) * 127.0), -127, 127).astype(np.int8)


def encodings(entry: dict) -> dict[str, dict]:
    stamps = {k: v for k, v in entry.items() if k.startswith("__")}
    base = {k: v for k, v in entry.items() if not k.startswith("__")}
    int8 = {**base, "descriptors": quantize(base["descriptors"])}
    lean = {**int8, **{k: base[k].astype(np.float16) for k in ("keypoints_xy", "scores", "scales") if k in base}}
    return {"as stored": {**base, **stamps}, "int8 descriptors": {**int8, **stamps},
            "int8 descriptors, float16 geometry": {**lean, **stamps}}


def sizes(store, queries: set, refs: set) -> tuple[str, dict]:
    per = {}
    for name in sorted(store.names()):
        kind = "queries" if name in queries else "references" if name in refs else None
        if kind is None:
            continue
        path = store.path(name)
        with np.load(path, allow_pickle=False) as f:
            entry = {k: f[k] for k in f.files}
        for enc, arrays in encodings(entry).items():
            size = path.stat().st_size if enc == "as stored" else npz_bytes(arrays)
            per.setdefault((enc, kind), []).append(size)
    rows, numbers = [], {}
    for (enc, kind), values in per.items():
        kb = np.mean(values) / 1e3
        rows.append([enc, kind, len(values), fmt(kb, 1), "yes" if kb <= 80 else "no"])
        numbers[f"local_kb_{enc}_{kind}"] = kb
    return table(["encoding", "images", "n", "KB per image (mean, 1 KB = 1000 B)", "<= 80 KB"], rows), numbers


def quantized_store(store, root: Path):
    """A copy of the local store whose descriptors are int8-quantised (kept as float32 x/127,
    which is what matching would compute with)."""
    from stages.common.cache import FeatureStore

    out = FeatureStore(root, "local", {"name": "int8"}, "int8")
    for name in store.names():
        try:
            entry = store.read(name)
        except (KeyError, ValueError):
            continue
        if "descriptors" in entry:
            entry["descriptors"] = quantize(entry["descriptors"]).astype(np.float32) / 127.0
        out.write(name, entry)
    return out


def verify_quality(store, run: Path, cache: Path, data: Path, workers: int) -> tuple[str, dict]:
    from pipeline.evaluate import evaluate
    from stages.common.dataset import load_dataset
    from stages.common.shortlist import RankingFile, order_to_names, read_pairs
    from stages.rerank import inliers as inlier_cache
    from stages.rerank import merge, verify

    dataset = load_dataset(data)
    conf = dict(verify.default_conf, name="mnn-affine-opencv")
    stored = RankingFile(run / "global_ranking.npz")
    full_order, full_scores = stored.full(np.arange(len(stored)))  # a small set: the full rankings
    ranking = {"order": full_order, "scores": full_scores}
    qn, rn = [str(x) for x in stored.query_names], [str(x) for x in stored.ref_names]
    windows = sorted(run.glob("pairs-global-top*.txt"))
    k = int(windows[0].name.split("top")[1].split("-")[0].split(".")[0])
    depth = max([k] + [int(w.stem.split("window")[1]) + k for w in windows if "window" in w.name])
    depth = min(depth, len(rn))
    base_store = verify.store_for(conf, cache, store)
    tmp = Path(tempfile.mkdtemp(prefix="bench-storage-"))
    try:
        q_store = quantized_store(store, tmp / "cache")
        counts = {"as stored": {}, "int8": {}}
        n_pairs = 0
        with timed() as t:
            for w in windows:
                inlier_dir = verify.main(conf, w, q_store.dir, tmp / "cache", workers=workers)
                for q, c in inlier_cache.load_inliers(inlier_dir, w).items():
                    counts["int8"].setdefault(q, {}).update(c)
                for q, c in inlier_cache.load_inliers(base_store, w).items():
                    counts["as stored"].setdefault(q, {}).update(c)
                n_pairs += sum(len(v) for v in read_pairs(w).values())
        maps, rows = {}, []
        m = conf["merge"]
        for label, inliers in counts.items():
            order = merge.rerank(ranking["order"], ranking["scores"], merge.align_inliers(qn, rn, ranking["order"],
                                                                                           inliers, depth),
                                 depth, m["rule"], m["min_inliers"], m["weight"])
            maps[label] = evaluate(order_to_names(order, qn, rn), dataset.ground_truth)["mAP"]
        a = [(counts["as stored"][q][r], counts["int8"][q].get(r, -1)) for q in counts["as stored"]
             for r in counts["as stored"][q]]
        a = np.array(a)
        truth = {(q, r) for q, refs in dataset.ground_truth.items() for r in refs}
        true_pairs = np.array([(counts["as stored"][q][r], counts["int8"][q].get(r, -1))
                               for q, r in truth if r in counts["as stored"].get(q, {})])
        rows.append(["float16 (as stored)", f"{len(a):,}", "-", "-", "-", f"{maps['as stored']:.4f}"])
        rows.append(["int8", f"{len(a):,}", f"{np.mean(a[:, 0] == a[:, 1]):.1%}",
                     f"{np.mean(np.abs(a[:, 0] - a[:, 1])):.2f}",
                     f"{np.mean(true_pairs[:, 1] - true_pairs[:, 0]):+.2f} ({len(true_pairs)} true pairs)",
                     f"{maps['int8']:.4f}"])
        text = table(["descriptors", "pairs", "same inlier count", "mean abs inlier diff",
                      "mean inlier change, true pairs", "mAP"], rows)
        text += (f"\n\n({n_pairs:,} pairs of {len(windows)} shortlist files, depth {depth}; int8 pairs verified in "
                 f"{t.wall:.0f} s.)")
        return text, {"map_float16": maps["as stored"], "map_int8": maps["int8"],
                      "same_inliers_fraction": float(np.mean(a[:, 0] == a[:, 1]))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=Path, required=True, help="local-feature store folder (stage 2)")
    parser.add_argument("--run", type=Path, help="output folder of a default smvs_dvd run on these features")
    parser.add_argument("--cache", type=Path, default=None, help="the run's cache root (default: the store's)")
    parser.add_argument("--data", type=Path, default=SMVS, help="smvs_dvd folder")
    parser.add_argument("--no-verify", action="store_true", help="sizes only")
    parser.add_argument("--workers", type=int, default=2, help="verification workers")
    parser.add_argument("--json", type=Path, help="merge the measured numbers into this JSON file")
    args = parser.parse_args()
    from stages.common.cache import FeatureStore
    from stages.common.dataset import load_dataset

    store = FeatureStore.open(args.features)
    dataset = load_dataset(args.data)
    print(header("Local-feature storage per image, and int8 descriptors"))
    text, numbers = sizes(store, set(dataset.queries), set(dataset.references))
    print(text)
    if not args.no_verify:
        if args.run is None:
            parser.error("--run is needed for the verification check (or pass --no-verify)")
        print()
        text, more = verify_quality(store, args.run, args.cache or args.features.parent.parent, args.data,
                                    args.workers)
        print(text)
        numbers.update(more)
    save_results(args.json, "storage", numbers)


if __name__ == "__main__":
    main()
