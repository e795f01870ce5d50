"""Benchmark of the feature stages on smvs_dvd images: global descriptor images/s per scale
setting, local features images/s and keypoints per image per backend.

Usage:
    python bench/bench_extract.py --images 8          # 8 queries + 8 references
    python bench/bench_extract.py --local-backends delf-lite0,sift --skip-global

Each model is built once, in the pipeline's runtime (`--runtime`: TensorFlow Lite on a CPU);
every image is processed once untimed (TFLite allocates, TensorFlow traces, per new input
shape) and then timed, all settings on the same decoded images in turn, so the ratios
between settings are measured side by side. Queries are phone photos (up to 1024 px),
references clean scans; the local stage describes queries at the conf's rotations (0 with
the whole pyramid, 90, 180 and 270 with three levels) and references once. JPEG decoding is
timed separately. The backbone uses every core, as the pipeline does; `bench_runtime.py`
compares the runtimes.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SMVS, fmt, header, peak_rss_mib, save_results, table, timed  # noqa: E402

SCALE_SETTINGS = {
    "1 scale (1.0)": [1.0],
    "2 scales (1.0, 0.71)": [1.0, 0.7071],
    "3 scales (1.0, 0.71, 0.5), default": [1.0, 0.7071, 0.5],
}


def pick(names: list[str], n: int) -> list[str]:
    if len(names) <= n:
        return names
    return [names[i] for i in np.linspace(0, len(names) - 1, n).round().astype(int)]


def load_images(data: Path, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`n` evenly spaced queries and `n` references of a data folder, decoded:
    ({name: uint8 RGB [H, W, 3]}, {name: ...})."""
    from stages.common.dataset import load_dataset
    from stages.common.images import read_image

    dataset = load_dataset(data)
    queries = {q: read_image(dataset.images[q]) for q in pick(sorted(dataset.queries), n)}
    refs = {r: read_image(dataset.images[r]) for r in pick(sorted(dataset.references), n)}
    return queries, refs


def bench_global(images: dict[str, np.ndarray], cache: Path, resize_max: list[int]) -> tuple[str, dict]:
    from stages.common.conf import resolve
    from stages.global_embed import extract as g
    from stages.global_embed.models import load_model

    base = resolve(g.default_conf, g.confs, "lite0-gem")
    model = load_model(base, cache)
    settings = [(f"{label}, {side} px", dict(base, scales=scales, resize_max=side))
                for side in resize_max for label, scales in SCALE_SETTINGS.items()]
    for _, conf in settings:  # trace every input shape once
        for rgb in images.values():
            g.describe(model, rgb, conf)
    rows, numbers = [], {}
    default_ips = None
    times = {label: [] for label, _ in settings}
    for rgb in images.values():  # interleaved: each image through every setting in turn
        for label, conf in settings:
            with timed() as t:
                g.describe(model, rgb, conf)
            times[label].append(t.wall)
    for label, _ in settings:
        ips = len(images) / sum(times[label])
        if "default" in label and default_ips is None:
            default_ips = ips
        numbers[f"global_ips_{label}"] = ips
    for label, _ in settings:
        ips = numbers[f"global_ips_{label}"]
        rows.append([label, len(images), fmt(1e3 / ips, 0), fmt(ips, 2), f"{ips / default_ips:.2f}x"])
    numbers["global_s_per_image_default"] = 1.0 / default_ips
    text = table(["global descriptor (EfficientNet-Lite0 GeM, 7 regions)", "images", "ms/image", "images/s",
                  "vs default"], rows)
    return text, numbers


def bench_local(queries: dict, refs: dict, cache: Path, backends: list[str], pca_path: Path | None) -> tuple[str, dict]:
    from stages.common.cache import load_npz
    from stages.common.conf import resolve
    from stages.local_delf import extract as loc
    from stages.local_delf.backends import load_backend

    rows, numbers = [], {}
    loaded = {}
    for name in backends:
        conf = resolve(loc.default_conf, loc.confs, name)
        try:
            backend = load_backend(conf, cache)
        except Exception as e:  # delf-hub without internet or module
            rows.append([name, "-", "-", "-", "-", "-", f"not measured: {type(e).__name__}: {str(e)[:80]}"])
            continue
        pca = None
        if backend.needs_pca:
            pca = load_npz(pca_path) if pca_path and pca_path.exists() else None
        loaded[name] = (backend, conf, pca)
        for rgb in list(queries.values())[:1] + list(refs.values())[:1]:  # warm-up
            loc.describe(backend, rgb, [0], pca)
    times = {(n, kind): [] for n in loaded for kind in ("references", "queries")}
    kps = {(n, kind): [] for n in loaded for kind in ("references", "queries")}
    for kind, imgs in (("references", refs), ("queries", queries)):
        for rgb in imgs.values():
            for name, (backend, conf, pca) in loaded.items():
                rotations = conf["query_rotations"] if kind == "queries" else [0]
                with timed() as t:
                    out = loc.describe(backend, rgb, rotations, pca)
                times[(name, kind)].append(t.wall)
                kps[(name, kind)].append(len(out["keypoints_xy"]))
    base = None
    for name in loaded:
        for kind in ("references", "queries"):
            ts = times[(name, kind)]
            ips = len(ts) / sum(ts)
            rotations = loaded[name][1]["query_rotations"] if kind == "queries" else [0]
            if base is None:
                base = ips
            numbers[f"local_ips_{name}_{kind}"] = ips
            numbers[f"local_keypoints_{name}_{kind}"] = float(np.mean(kps[(name, kind)]))
            rows.append([name, kind, len(ts), len(rotations), fmt(1e3 / ips, 0), fmt(ips, 2),
                         f"{ips / base:.2f}x", fmt(np.mean(kps[(name, kind)]), 0)])
    text = table(["local features", "images", "n", "rotations", "ms/image", "images/s",
                  "vs delf-lite0 references", "keypoints/image"], [r for r in rows if len(r) == 8])
    notes = [r for r in rows if len(r) != 8]
    for r in notes:
        text += f"\n\n{r[0]}: {r[-1]}"
    return text, numbers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SMVS, help="smvs_dvd folder")
    parser.add_argument("--cache", type=Path, default=Path("cache"),
                        help="cache with the converted Lite0 weights (converted there if absent)")
    parser.add_argument("--pca", type=Path, default=None,
                        help="delf-lite0 PCA (pca.npz of a local store) applied as the pipeline does; "
                             "default: none (its cost is a 112x40 product)")
    parser.add_argument("--images", type=int, default=8, help="queries and references each (evenly spaced)")
    parser.add_argument("--global-resize", default="512", help="comma-separated resize_max values for stage 1")
    parser.add_argument("--local-backends", default="delf-lite0,sift,delf-hub", help="comma-separated backends")
    parser.add_argument("--skip-global", action="store_true")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--json", type=Path, help="merge the measured numbers into this JSON file")
    args = parser.parse_args()
    with timed() as t:
        queries, refs = load_images(args.data, args.images)
    print(header("Feature stages: throughput"))
    sizes = [f"{a.shape[1]}x{a.shape[0]}" for a in list(queries.values())[:2] + list(refs.values())[:2]]
    print(f"{len(queries)} queries + {len(refs)} references of smvs_dvd (e.g. {', '.join(sizes)}); JPEG decode "
          f"{t.wall / (len(queries) + len(refs)) * 1e3:.1f} ms/image.\n")
    numbers = {"decode_s_per_image": t.wall / (len(queries) + len(refs))}
    if not args.skip_global:
        text, more = bench_global({**queries, **refs}, args.cache, [int(x) for x in args.global_resize.split(",")])
        print(text + "\n")
        numbers.update(more)
    if not args.skip_local:
        text, more = bench_local(queries, refs, args.cache, args.local_backends.split(","), args.pca)
        print(text + "\n")
        numbers.update(more)
    print(f"Peak RSS of this process: {peak_rss_mib():.0f} MiB")
    save_results(args.json, "extraction", numbers)


if __name__ == "__main__":
    main()
