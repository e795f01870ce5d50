"""Benchmark of the two-stage design on smvs_dvd: verification time and mAP against the
shortlist length k, and against exhaustive verification of every (query, reference) pair.

Usage:
    python bench/bench_shortlist.py --cache /tmp/bench-e2e/cache --ks 10,50,100,200
    python bench/bench_shortlist.py --cache CACHE --ks 100 --no-exhaustive     # quick

`--cache` must hold the default global and local features of smvs_dvd (a cold run of
`bench_e2e.py` leaves them; features of references no shortlist reached are extracted first,
untimed). Each configuration then runs the pipeline (`pipeline.run.run`, all stages, in this
process) on a cache whose global and local stores are that cache's (linked) and whose
inlier cache is empty, so every shortlisted pair is matched and RANSAC-verified again and
the stage times compare like with like: stage 1 (warm: descriptors read, whitening read
from its cache, ranking), stage 2 (all features cached: only the checks), stage 3 (all the
verification). "Exhaustive" is the same pipeline with k = the number of references: every
pair is verified and the whole list is ordered by inliers, then by global similarity.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SMVS, fmt, header, load_average, save_results, table  # noqa: E402


def linked_cache(root: Path, cache: Path) -> Path:
    """A cache folder whose global and local stores are `cache`'s and whose rerank is empty."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    for stage in ("global", "local", "weights"):
        if (cache / stage).exists():
            (root / stage).symlink_to((cache / stage).resolve(), target_is_directory=True)
    return root


def ensure_local_features(dataset, cache: Path, work: Path) -> None:
    """Extracts local features of every query and reference not yet in `cache` (untimed)."""
    from stages.local_delf import extract as local_extract

    pairs = work / "pairs-all.txt"
    refs = sorted(dataset.references)
    pairs.write_text("".join(f"{q}\t{r}\n" for q in sorted(dataset.queries) for r in refs))
    local_extract.main(dict(local_extract.default_conf, name="delf-lite0"), pairs, dataset.images, cache,
                       pca_source=local_extract.pca_source(dataset))  # the pipeline's store


def count_pairs(out: Path) -> int:
    from stages.common.shortlist import read_pairs

    return sum(len(v) for p in out.glob("pairs-global-top*.txt") for v in read_pairs(p).values())


def run_config(dataset, cache: Path, work: Path, label: str, k: int, expand_to: int, workers: int) -> dict:
    from pipeline.run import RunConfig, run

    root = linked_cache(work / f"cache-{label}", cache)
    out = work / f"out-{label}"
    if out.exists():
        shutil.rmtree(out)
    load = load_average()[0]
    result = run(dataset, out, RunConfig(cache=root, top_k=k, expand_to=expand_to, workers=workers))
    t = result["timings"]
    return {"label": label, "k": k, "expand_to": expand_to, "pairs": count_pairs(out), "timings": t,
            "total_s": sum(t.values()), "mAP": result["metrics"]["rerank"]["mAP"],
            "global_mAP": result["metrics"]["global"]["mAP"], "recall1": result["metrics"]["rerank"]["Recall@1"],
            "load": load}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SMVS, help="smvs_dvd folder")
    parser.add_argument("--cache", type=Path, required=True, help="cache with smvs_dvd's default features")
    parser.add_argument("--ks", default="10,50,100,200", help="comma-separated shortlist lengths")
    parser.add_argument("--expand-to", type=int, default=400, help="the pipeline's deeper-window limit (default 400)")
    parser.add_argument("--no-expansion-ks", default="10,50,100",
                        help="shortlist lengths also run without deeper windows (expand_to = k); '' for none")
    parser.add_argument("--no-exhaustive", action="store_true", help="skip exhaustive verification")
    parser.add_argument("--workers", type=int, default=2, help="verification workers (the pipeline default)")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="merge the measured numbers into this JSON file")
    args = parser.parse_args()
    from stages.common import setup_logging
    from stages.common.dataset import load_dataset

    setup_logging()
    dataset = load_dataset(args.data)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-shortlist-"))
    work.mkdir(parents=True, exist_ok=True)
    ensure_local_features(dataset, args.cache, work)
    n_refs = len(dataset.references)
    configs = []
    if not args.no_exhaustive:
        configs.append(("exhaustive", n_refs, n_refs))
    for k in [int(x) for x in args.ks.split(",") if x]:
        configs.append((f"k{k}-expand{args.expand_to}", k, args.expand_to))
    for k in [int(x) for x in args.no_expansion_ks.split(",") if x]:
        configs.append((f"k{k}-noexpand", k, k))
    results = [run_config(dataset, args.cache, work, label, k, expand, args.workers) for label, k, expand in configs]
    exhaustive = next((r for r in results if r["label"] == "exhaustive"), None)
    rows = []
    for r in results:
        t = r["timings"]
        rel_map = f"{r['mAP'] / exhaustive['mAP']:.4f}" if exhaustive else "-"
        rel_t = f"{r['total_s'] / exhaustive['total_s']:.3f}" if exhaustive else "-"
        deeper = "all pairs" if r["label"] == "exhaustive" else (
            f"to {r['expand_to']}" if r["expand_to"] > r["k"] else "off")
        rows.append([r["label"] if r["label"] == "exhaustive" else r["k"], deeper, f"{r['pairs']:,}",
                     fmt(t.get("global"), 1), fmt(t.get("local"), 1), fmt(t.get("rerank"), 1),
                     fmt(r["pairs"] / t["rerank"], 0), fmt(r["total_s"], 1), f"{r['mAP']:.4f}",
                     f"{r['recall1']:.2f}", rel_map, rel_t, f"{r['load']:.1f}"])
    print(header("Two-stage vs exhaustive verification, and the shortlist length k (smvs_dvd)"))
    print(f"{len(dataset.queries)} queries x {n_refs} references; default conf (3 query rotation groups, "
          f"1000 keypoints per image, mutual NN + affine OpenCV RANSAC), {args.workers} verification workers; "
          f"global-only mAP {results[0]['global_mAP']:.4f}.\n")
    print(table(["k", "deeper windows", "pairs verified", "global s", "local s (cached)", "verification s",
                 "pairs/s", "total s", "mAP", "Recall@1", "mAP / exhaustive", "time / exhaustive",
                 "load (1 min) at start"], rows))
    save_results(args.json, "shortlist", {"runs": results})


if __name__ == "__main__":
    main()
