"""Benchmark of the backbone runtimes: TensorFlow against TensorFlow Lite (XNNPACK) for the
global descriptor and the local features, on the same smvs_dvd images, side by side.

Usage:
    python bench/bench_runtime.py --images 8      # 8 queries + 8 references
    python bench/bench_runtime.py --runtimes tf,tflite --json bench/results.json

Each runtime loads the same Keras model with the same weights (TFLite converts it once into
the cache). Every image goes through every runtime in turn, once untimed (TensorFlow traces
per input shape, TFLite allocates per shape) and then timed, with the pipeline's default
global conf (3 scales and their mirror images at 512 px) and the default local conf
(references once, queries at each of the conf's rotations). Besides the time, the table
gives how far each runtime's outputs are from TensorFlow's: 1 - cosine of the global
descriptors, and the share of local keypoints found at the same (x, y) by both.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_extract import load_images  # noqa: E402
from bench.common import SMVS, fmt, header, peak_rss_mib, save_results, table, timed  # noqa: E402


def _same_keypoints(a: np.ndarray, b: np.ndarray) -> float:
    """Share of keypoints of `a` ([N, 2] (x, y)) with a keypoint of `b` within 0.5 px."""
    if len(a) == 0:
        return 1.0 if len(b) == 0 else 0.0
    d = np.abs(a[:, None, :] - b[None, :, :]).max(axis=-1) if len(b) else np.full((len(a), 1), np.inf)
    return float((d.min(axis=1) <= 0.5).mean())


def run(queries: dict, refs: dict, cache: Path, runtimes: list[str]) -> tuple[str, dict]:
    from stages.common.backbone import runtime
    from stages.common.conf import resolve
    from stages.global_embed import extract as g
    from stages.global_embed.models import load_model
    from stages.local_delf import extract as loc
    from stages.local_delf.backends import load_backend

    gconf = resolve(g.default_conf, g.confs, g.DEFAULT_CONF)
    lconf = resolve(loc.default_conf, loc.confs, "delf-lite0")
    loaded = {}
    for name in runtimes:
        runtime.configure(name)
        with timed() as t:
            loaded[name] = (load_model(gconf, cache), load_backend(lconf, cache))
        print(f"{name}: models loaded in {t.wall:.1f} s")
    images = [("global", n, rgb) for n, rgb in {**queries, **refs}.items()]
    images += [("local references", n, rgb) for n, rgb in refs.items()]
    images += [("local queries", n, rgb) for n, rgb in queries.items()]

    def work(kind, rgb, models):
        model, backend = models
        if kind == "global":
            return g.describe(model, rgb, gconf)[0]
        rotations = lconf["query_rotations"] if kind == "local queries" else [0]
        return loc.describe(backend, rgb, rotations, None)["keypoints_xy"]

    times = {(kind, r): [] for kind in ("global", "local references", "local queries") for r in runtimes}
    outputs = {}
    for kind, name, rgb in images:
        for r in runtimes:
            work(kind, rgb, loaded[r])  # untimed: traces / allocates for these input shapes
        for r in runtimes:
            with timed() as t:
                outputs[(kind, name, r)] = work(kind, rgb, loaded[r])
            times[(kind, r)].append(t.wall)
    base = runtimes[0]
    rows, numbers = [], {}
    for kind in ("global", "local references", "local queries"):
        base_ms = 1e3 * np.mean(times[(kind, base)])
        for r in runtimes:
            ms = 1e3 * np.mean(times[(kind, r)])
            names = [n for k, n, _ in images if k == kind]
            if kind == "global":
                diff = max(1.0 - float(outputs[(kind, n, r)] @ outputs[(kind, n, base)]) for n in names)
                agreement = f"1 - cos <= {diff:.1e}"
            else:
                same = np.mean([_same_keypoints(outputs[(kind, n, r)], outputs[(kind, n, base)]) for n in names])
                agreement = f"{100 * same:.1f} % keypoints at the same (x, y)"
            numbers[f"runtime_{r}_{kind.replace(' ', '_')}_ms"] = ms
            rows.append([kind, r, len(names), fmt(ms, 0), f"{base_ms / ms:.2f}x", agreement])
    text = table(["stage", "runtime", "images", "ms/image", f"speed vs {base}", f"outputs vs {base}"], rows)
    return text, numbers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SMVS, help="smvs_dvd folder")
    parser.add_argument("--cache", type=Path, default=Path("cache"),
                        help="cache with the converted weights and TFLite files (converted there if absent)")
    parser.add_argument("--images", type=int, default=8, help="queries and references each (evenly spaced)")
    parser.add_argument("--runtimes", default="tf,tflite",
                        help="comma-separated runtimes, the first is the reference (tf, tflite)")
    parser.add_argument("--json", type=Path, help="merge the measured numbers into this JSON file")
    args = parser.parse_args()
    queries, refs = load_images(args.data, args.images)
    print(header("Backbone runtimes"))
    print(f"{len(queries)} queries + {len(refs)} references of smvs_dvd.\n")
    text, numbers = run(queries, refs, args.cache, args.runtimes.split(","))
    print(text + "\n")
    print(f"Peak RSS of this process: {peak_rss_mib():.0f} MiB")
    save_results(args.json, "runtime", numbers)


if __name__ == "__main__":
    main()
