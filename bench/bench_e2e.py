"""End-to-end benchmark of `run_pipeline.py` on smvs_dvd: a cold run (empty cache) and warm
reruns (everything cached), with per-stage time, per-stage peak RSS, and the cache's bytes
per image per stage.

Usage:
    python bench/bench_e2e.py --workdir /tmp/bench-e2e            # cold + 2 warm runs
    python bench/bench_e2e.py --workdir /tmp/x --cache /tmp/x/cache --warm-only

Each run is a separate process, started as a user would (`python run_pipeline.py --data ...`).
While it runs, the summed RSS of its process tree (the pipeline and its loky workers) is
sampled every 0.2 s; a stage's peak is the highest sample between the log line that starts
it and the next stage's (windows verified deeper after the first rerank count as rerank).
"max single process" is the kernel's peak RSS of the largest process of the tree (wait4).
Stage times are the pipeline's own (``metrics.json`` timings_s); wall time includes Python
start-up and imports.
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO, SMVS, fmt, header, load_average, run_monitored, save_results, table  # noqa: E402

MARKERS = {"global": "", "local": "local features, conf:", "rerank": "geometric verification, conf:"}


def run_pipeline(data: Path, cache: Path, out: Path, extra: list[str], tree: Path = REPO,
                 echo: bool = False) -> dict:
    cmd = [sys.executable, str(tree / "run_pipeline.py"), "--data", str(data), "--cache", str(cache),
           "--output", str(out), *extra]
    result = run_monitored(cmd, MARKERS, cwd=tree, echo=echo)
    if result["returncode"] != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result['stderr'][-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    result["timings"] = metrics["timings_s"]
    result["metrics"] = metrics["metrics"]
    result["cmd"] = " ".join([f"python {'' if tree == REPO else str(tree) + '/'}run_pipeline.py", *cmd[2:]])
    return result


def _kind(name: str, queries: set, refs: set) -> str:
    if name in queries:
        return "query"
    if name in refs:
        return "reference"
    return "training" if name.startswith("train:") else "other"


def cache_bytes(cache: Path, queries: set, refs: set) -> tuple[str, dict]:
    """Bytes per image per stage from the store folders under `cache`."""
    from stages.common.cache import decode_name

    rows, numbers = [], {}
    for stage in ("global", "local", "rerank"):
        for store in sorted((cache / stage).glob("*")):
            per_kind: dict[str, list[int]] = {}
            extra = 0
            for f in store.rglob("*"):
                if not f.is_file():
                    continue
                if f.suffix == ".npz" and f.parent == store:
                    per_kind.setdefault(_kind(decode_name(f.stem), queries, refs), []).append(f.stat().st_size)
                else:
                    extra += f.stat().st_size
            for kind, sizes in sorted(per_kind.items()):
                label = {"rerank": "per query entry"}.get(stage, "")
                rows.append([stage, store.name, kind, len(sizes), fmt(np.mean(sizes) / 1e3, 1),
                             fmt(sum(sizes) / 1e6, 2), label])
                numbers[f"cache_{stage}_{kind}_bytes_per_image"] = float(np.mean(sizes))
            rows.append([stage, store.name, "other files (conf, PCA, whitening)", "-", "-", fmt(extra / 1e6, 2), ""])
    text = table(["stage", "store", "images", "files", "KB per image (mean)", "MB total", ""], rows)
    return text, numbers


def describe_run(label: str, r: dict) -> list:
    peaks = r["peak_tree_rss_mib"]
    t = r["timings"]
    return [label, fmt(r["wall_s"], 1), fmt(t.get("global"), 1), fmt(t.get("local"), 1), fmt(t.get("rerank"), 1),
            fmt(peaks.get("global"), 0), fmt(peaks.get("local"), 0), fmt(peaks.get("rerank"), 0),
            fmt(r["max_rss_mib"], 0), f"{r['metrics']['rerank']['mAP']:.4f}" if "rerank" in r["metrics"] else "-"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SMVS, help="smvs_dvd folder")
    parser.add_argument("--workdir", type=Path, required=True, help="folder for the cold cache and the outputs")
    parser.add_argument("--cache", type=Path, default=None, help="cache folder (default WORKDIR/cache)")
    parser.add_argument("--warm-runs", type=int, default=2, help="fully cached reruns after the cold run")
    parser.add_argument("--warm-only", action="store_true", help="skip the cold run (the cache is already full)")
    parser.add_argument("--keep-cache", action="store_true", help="do not empty the cache before the cold run")
    parser.add_argument("--baseline-tree", type=Path, default=None,
                        help="a checkout of the code before a change (e.g. `git archive BASE | tar -x -C DIR`): "
                             "its warm runs alternate with this tree's on the same cache")
    parser.add_argument("--extra", default="", help="more run_pipeline.py flags, space separated")
    parser.add_argument("--json", type=Path, help="merge the measured numbers into this JSON file")
    args = parser.parse_args()
    from stages.common.dataset import load_dataset

    cache = args.cache or args.workdir / "cache"
    extra = args.extra.split()
    print(header("End to end on smvs_dvd: cold and warm runs, peak RSS, cache size"))
    rows, numbers, commands = [], {}, []
    if not args.warm_only:
        if cache.exists() and not args.keep_cache:
            shutil.rmtree(cache)
        load = load_average()
        r = run_pipeline(args.data, cache, args.workdir / "cold", extra)
        rows.append(describe_run(f"cold (empty cache; load before {load[0]:.2f})", r))
        commands.append(r["cmd"])
        numbers.update({"cold_wall_s": r["wall_s"], "cold_timings": r["timings"],
                        "cold_peak_tree_rss_mib": r["peak_tree_rss_mib"], "cold_max_rss_mib": r["max_rss_mib"],
                        "cold_metrics": r["metrics"]})
    warm, base = [], []
    for i in range(args.warm_runs):
        load = load_average()
        r = run_pipeline(args.data, cache, args.workdir / f"warm{i + 1}", extra)
        rows.append(describe_run(f"warm #{i + 1} (all cached; load before {load[0]:.2f})", r))
        commands.append(r["cmd"])
        warm.append(r)
        time.sleep(1)
        if args.baseline_tree:
            load = load_average()
            r = run_pipeline(args.data, cache, args.workdir / f"base{i + 1}", extra, args.baseline_tree)
            rows.append(describe_run(f"warm #{i + 1}, code before the change (load before {load[0]:.2f})", r))
            commands.append(r["cmd"])
            base.append(r)
            time.sleep(1)
    if warm:
        numbers.update({"warm_wall_s": [r["wall_s"] for r in warm], "warm_timings": [r["timings"] for r in warm],
                        "warm_peak_tree_rss_mib": [r["peak_tree_rss_mib"] for r in warm]})
    if base:
        numbers.update({"baseline_warm_wall_s": [r["wall_s"] for r in base],
                        "baseline_warm_timings": [r["timings"] for r in base]})
    print(table(["run", "wall s", "global s", "local s", "rerank s", "peak RSS global MiB", "peak RSS local MiB",
                 "peak RSS rerank MiB", "max single process MiB", "mAP"], rows))
    print("\nCommands: " + "; ".join(f"`{c}`" for c in dict.fromkeys(commands)))
    if not args.warm_only:
        cold, w = numbers["cold_wall_s"], numbers.get("warm_wall_s", [float("nan")])
        print(f"\nWarm rerun / cold run: {min(w) / cold:.3f}x ({min(w):.1f} s / {cold:.1f} s).")
    if base:
        new_s, old_s = float(np.median(numbers["warm_wall_s"])), float(np.median(numbers["baseline_warm_wall_s"]))
        print(f"\nWarm rerun, this code / code before the change (median of {len(base)} each, alternating): "
              f"{new_s / old_s:.2f}x ({new_s:.1f} s / {old_s:.1f} s).")
    dataset = load_dataset(args.data)
    text, more = cache_bytes(cache, set(dataset.queries), set(dataset.references))
    print("\n" + text)
    numbers.update(more)
    save_results(args.json, "e2e", numbers)


if __name__ == "__main__":
    main()
