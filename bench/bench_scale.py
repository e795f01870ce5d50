"""The default pipeline at catalogue scale: a synthetic set of 5,000 references and 1,000
queries made from the shared photos, run cold, warm, and again after 100 references were
added (issue 14).

Usage:
    python bench/bench_scale.py --workdir /tmp/scale                  # build the set, 3 runs
    python bench/bench_scale.py --workdir /tmp/scale --skip-cold      # warm + grown on the kept cache
    python bench/bench_scale.py --workdir /tmp/x --refs 200 --queries 40 --added 10   # a quick try

The set (built once under WORKDIR/data and reused while its parameters are unchanged):
- sources: the test photos of smvs_dvd and grocery_store, and the grocery_store training
  classes that are not used for training below; each source is one product view;
- references: crops (80-100 % of each side), mirror images, colour gains and brightness
  shifts of the sources, long side 320-800 px, cycling through the sources;
- queries: harder views of a random source (crops to 60-95 % of each side, gamma, blur,
  rotation by 90/180/270 degrees for one query in five, long side 400-1000 px); every
  reference showing the same product is relevant (``test/ground_truth.csv``: smvs_dvd's
  phone photos and scan of one DVD, a grocery_store test query and its 11 references, one
  grocery training class are one product each; mirrored views cannot verify geometrically,
  so on them only the global descriptor can help);
- training: smvs_dvd's 50 training classes and 8 of grocery_store's, as symlinks, so the
  whitening and the verification calibration are learned as on the real sets.

Runs, each a separate `run_pipeline.py` process with the default flags:
1. cold: every feature store emptied (the converted backbone weights are kept);
2. warm: the same command again;
3. grown: `--added` new references (views of sources that have queries) written into the
   reference folder, the ground truth extended, the same command again.
Each row records wall time, the pipeline's own stage times (`metrics.json`), the peak RSS of
the process tree, the cache's bytes and how many entries each stage computed (from the
stages' "N of M ... to compute" log lines). The pipeline's log is passed through to stderr.
"""

import argparse
import csv
import io
import re
import shutil
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_e2e import run_pipeline  # noqa: E402
from bench.common import SMVS, fmt, header, load_average, save_results, table  # noqa: E402
from stages.common.cache import atomic_write_bytes  # noqa: E402
from stages.common.dataset import read_ground_truth  # noqa: E402
from stages.common.images import resize_long_side  # noqa: E402

GROCERY = SMVS.parent / "grocery_store"
QUERY_DIR, REFERENCE_DIR, TRAIN_DIR = "test/test_data/query", "test/test_data/reference", "train/train_data"
GROCERY_TRAIN_CLASSES = 8  # the first 8 grocery training classes train; the other 33 are sources
COUNTS = {  # column: the stage log line that says how many entries it computes
    "global": r"global descriptors: (\d+) of \d+ images to compute",
    "local queries": r"local features: (\d+) of \d+ queries to extract",
    "local references": r"local features: (\d+) of \d+ references to extract",
    "pairs": r"geometric verification: (\d+) of \d+ pairs to compute",
}


def _product(path: Path, grocery_test_class: dict[str, str]) -> str:
    """The product a source photo shows: views of one product are relevant to each other."""
    if path.is_relative_to(SMVS / "test"):
        stem = path.stem  # canon_051, droid_051 and dvd_051 show DVD 051; each painting is its own
        return stem if stem.startswith("painting") else "smvs" + stem.rsplit("_", 1)[-1]
    if path.is_relative_to(GROCERY / "test"):
        return grocery_test_class[path.stem]
    return "grocery" + path.parent.name


def source_photos() -> tuple[list[Path], list[str], dict[str, list[Path]]]:
    """The photos the references and queries are made from, the product of each, and the
    training classes."""
    sources = [p for root in (SMVS, GROCERY) for sub in (QUERY_DIR, REFERENCE_DIR)
               for p in sorted((root / sub).glob("*.jpg"))]
    train = {f"smvs{d.name}": sorted(d.glob("*.jpg")) for d in sorted((SMVS / TRAIN_DIR).iterdir())}
    for i, d in enumerate(sorted((GROCERY / TRAIN_DIR).iterdir())):
        if i < GROCERY_TRAIN_CLASSES:
            train[f"grocery{d.name}"] = sorted(d.glob("*.jpg"))
        else:
            sources += sorted(d.glob("*.jpg"))
    grocery_test_class = {}  # a grocery test query and its 11 relevant references share one product
    truth = read_ground_truth(GROCERY / "test/ground_truth.csv")
    for query, refs in truth.items():
        for r in refs:
            grocery_test_class.setdefault(r, "grocerytest" + query)
    for query, refs in truth.items():
        grocery_test_class[query] = grocery_test_class[min(refs)]
    return sources, [_product(p, grocery_test_class) for p in sources], train


def _crop(image: np.ndarray, rng: np.random.Generator, low: float, high: float) -> np.ndarray:
    h, w = image.shape[:2]
    ch, cw = max(8, int(h * rng.uniform(low, high))), max(8, int(w * rng.uniform(low, high)))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return image[y:y + ch, x:x + cw]


def reference_view(image: np.ndarray, seed: int) -> np.ndarray:
    """A catalogue-like view of a source: uint8 BGR [H, W, 3] in, uint8 BGR out."""
    rng = np.random.default_rng(seed)
    out = _crop(image, rng, 0.8, 1.0)
    if rng.random() < 0.5:
        out = out[:, ::-1]
    out = out.astype(np.float32) * rng.uniform(0.85, 1.15, size=3) + rng.uniform(-20, 20)
    return resize_long_side(np.clip(out, 0, 255).astype(np.uint8), int(rng.integers(320, 801)))[0]


def query_view(image: np.ndarray, seed: int) -> np.ndarray:
    """A harder, phone-like view of a source: crop, gamma, blur, any of 4 orientations."""
    rng = np.random.default_rng(seed)
    out = _crop(image, rng, 0.6, 0.95)
    out = (255.0 * (out / 255.0) ** rng.uniform(0.7, 1.4)).astype(np.uint8)
    if rng.random() < 0.3:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.8, 1.6))
    if rng.random() < 0.2:
        out = np.rot90(out, int(rng.integers(1, 4)))
    return resize_long_side(np.ascontiguousarray(out), int(rng.integers(400, 1001)))[0]


def _write(path: Path, image: np.ndarray) -> None:
    ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(image), [cv2.IMWRITE_JPEG_QUALITY, 88])
    if not ok:
        raise OSError(f"{path}: could not encode the image")
    atomic_write_bytes(path, jpeg.tobytes())


def _make(kind: str, source: Path, seed: int, path: Path) -> None:
    if path.exists():
        return
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    if image is None:
        raise OSError(f"{source}: not a readable image")
    _write(path, (reference_view if kind == "reference" else query_view)(image, seed))


def plan(n_refs: int, n_queries: int, n_added: int, seed: int = 0) -> dict:
    """Which source each reference, query and added reference comes from, and the ground truth."""
    sources, products, train = source_photos()
    rng = np.random.default_rng(seed)
    refs = {f"r{i:05d}": i % len(sources) for i in range(n_refs)}
    query_sources = rng.choice(min(n_refs, len(sources)), size=n_queries, replace=n_queries > len(sources))
    queries = {f"q{i:04d}": int(s) for i, s in enumerate(query_sources)}
    added = {f"added{i:04d}": int(query_sources[i % n_queries]) for i in range(n_added)}
    return {"sources": sources, "products": products, "train": train, "references": refs, "queries": queries,
            "added": added}


def _ground_truth(path: Path, queries: dict, refs: dict, products: list[str]) -> None:
    """Writes query,reference rows: a query is relevant to every reference of its source's product."""
    by_product: dict[str, list[str]] = {}
    for name, s in refs.items():
        by_product.setdefault(products[s], []).append(name)
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["query", "reference"])
    for q, s in queries.items():
        w.writerows([q, r] for r in by_product[products[s]])
    atomic_write_bytes(path, text.getvalue().encode())


def build(data: Path, p: dict) -> None:
    """Writes the base set (without the added references) under `data`; files already there are kept."""
    from joblib import Parallel, delayed

    for sub in (QUERY_DIR, REFERENCE_DIR, TRAIN_DIR):
        (data / sub).mkdir(parents=True, exist_ok=True)
    for name in p["added"]:  # back to the base set after an earlier grown run
        (data / REFERENCE_DIR / f"{name}.jpg").unlink(missing_ok=True)
    for cls, files in p["train"].items():
        (data / TRAIN_DIR / cls).mkdir(exist_ok=True)
        for f in files:
            link = data / TRAIN_DIR / cls / f.name
            if not link.exists():
                link.symlink_to(f.resolve())
    jobs = [("reference", p["sources"][s], 1_000_003 + i, data / REFERENCE_DIR / f"{n}.jpg")
            for i, (n, s) in enumerate(p["references"].items())]
    jobs += [("query", p["sources"][s], 2_000_003 + i, data / QUERY_DIR / f"{n}.jpg")
             for i, (n, s) in enumerate(p["queries"].items())]
    todo = [j for j in jobs if not j[3].exists()]
    print(f"building {len(todo)} of {len(jobs)} synthetic images under {data}", file=sys.stderr, flush=True)
    Parallel(n_jobs=2, verbose=5 if todo else 0)(delayed(_make)(*j) for j in todo)
    _ground_truth(data / "test/ground_truth.csv", p["queries"], p["references"], p["products"])


def grow(data: Path, p: dict) -> None:
    """Adds the planned extra references (views of queried sources) and their ground truth."""
    for i, (n, s) in enumerate(p["added"].items()):
        _make("reference", p["sources"][s], 3_000_003 + i, data / REFERENCE_DIR / f"{n}.jpg")
    _ground_truth(data / "test/ground_truth.csv", p["queries"], {**p["references"], **p["added"]},
                  p["products"])


def empty_stores(cache: Path) -> None:
    """Removes every computed feature from `cache`, keeping the converted backbone weights."""
    if cache.exists():
        for entry in cache.iterdir():
            if entry.name != "weights":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def cache_megabytes(cache: Path) -> dict[str, float]:
    """MB on disk per top-level cache folder (weights left out)."""
    out = {}
    for entry in sorted(cache.iterdir()) if cache.exists() else []:
        if entry.is_dir() and entry.name != "weights":
            out[entry.name] = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file()) / 1e6
    return out


def computed(stderr: str) -> dict[str, int]:
    """How many entries each stage computed: the sum over its log lines (e.g. two verification windows)."""
    return {col: sum(int(m.group(1)) for m in re.finditer(pattern, stderr)) for col, pattern in COUNTS.items()}


def run_once(label: str, data: Path, cache: Path, out: Path, extra: list[str]) -> dict:
    load = load_average()
    print(f"\n== {label}: run_pipeline.py --data {data} --cache {cache} --output {out}", file=sys.stderr, flush=True)
    r = run_pipeline(data, cache, out, extra, echo=True)
    return {"label": label, "load_before": load[0], "wall_s": r["wall_s"], "timings_s": r["timings"],
            "metrics": r["metrics"], "peak_tree_rss_mib": max(r["peak_tree_rss_mib"].values()),
            "cache_mb": cache_megabytes(cache), "computed": computed(r["stderr"])}


def row(r: dict) -> list:
    t, c, m = r["timings_s"], r["computed"], r["metrics"]
    return [f"{r['label']} (load {r['load_before']:.1f})", fmt(r["wall_s"], 1), fmt(t.get("global"), 1),
            fmt(t.get("local"), 1), fmt(t.get("calibration"), 1), fmt(t.get("rerank"), 1),
            fmt(r["peak_tree_rss_mib"], 0), fmt(sum(r["cache_mb"].values()), 0),
            c["global"], c["local queries"], c["local references"], c["pairs"],
            *(f"{m[stage]['mAP']:.4f}" if stage in m else "-" for stage in ("global", "rerank"))]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--workdir", type=Path, required=True,
                        help="folder for the synthetic set (data/), the cache (cache/) and the runs' outputs")
    parser.add_argument("--refs", type=int, default=5000, help="references in the base set")
    parser.add_argument("--queries", type=int, default=1000, help="queries")
    parser.add_argument("--added", type=int, default=100, help="references added before the last run")
    parser.add_argument("--skip-cold", action="store_true",
                        help="keep the cache of an earlier run of this script: warm and grown runs only")
    parser.add_argument("--extra", default="", help="more run_pipeline.py flags, space separated (default none)")
    parser.add_argument("--json", type=Path, help="merge the measured numbers into this JSON file")
    args = parser.parse_args()

    data, cache = args.workdir / "data", args.workdir / "cache"
    p = plan(args.refs, args.queries, args.added)
    build(data, p)
    extra = args.extra.split()
    runs = []
    if not args.skip_cold:
        empty_stores(cache)
        runs.append(run_once("cold", data, cache, args.workdir / "cold", extra))
    runs.append(run_once("warm", data, cache, args.workdir / "warm", extra))
    grow(data, p)
    runs.append(run_once(f"grown (+{args.added} references)", data, cache, args.workdir / "grown", extra))

    print(header(f"Catalogue scale: {args.refs:,} references, {args.queries:,} queries, "
                 f"+{args.added} references (synthetic, from the shared photos)"))
    print(table(["run", "wall s", "global s", "local s", "calibration s", "rerank s", "peak RSS MiB", "cache MB",
                 "global computed", "local queries computed", "local refs computed", "pairs verified",
                 "global mAP", "reranked mAP"], [row(r) for r in runs]))
    save_results(args.json, "scale", {"refs": args.refs, "queries": args.queries, "added": args.added, "runs": runs})


if __name__ == "__main__":
    main()
