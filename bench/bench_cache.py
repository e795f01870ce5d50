"""Benchmark of the warm-run cache check and descriptor load (issue 14): a synthetic global
store of N entries shaped as the default conf's (descriptor float32 [1280],
region_descriptors float32 [7, 1280], image_size), checked and loaded

- as before the manifest: every entry read in full (`load_npz`, each array's CRC-32) to
  check it, and every entry read again to load its descriptor;
- with the manifest: `FeatureStore.missing` (stat + ``manifest.json``) and
  `matrix.load_rows` (one matrix file); then after adding `--add` entries, which are the
  only ones read.

Usage:
    python bench/bench_cache.py [--n 5000] [--add 100] [--dir /tmp/bench-cache]

The entries are in the page cache for both sides (written just before), which favours the
full reads; from a cold disk the gap is larger.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine_line, timed  # noqa: E402


def write_entries(store, sources: Path, names, rng) -> dict[str, Path]:
    images = {}
    for name in names:
        images[name] = sources / f"{name}.jpg"
        images[name].write_bytes(name.encode())
        region = rng.normal(size=(7, 1280)).astype(np.float32)
        store.write(name, {"descriptor": region[0], "region_descriptors": region,
                           "image_size": np.array([640, 480], np.int32)}, images[name])
    return images


def full_read_check(store, images) -> list[str]:
    """The check before the manifest: each entry read in full and its stamps compared."""
    from stages.common.cache import HASH_KEY, RETRY_KEY, SOURCE_KEY, load_npz, source_stamp

    todo = []
    for name, src in images.items():
        try:
            arrays = load_npz(store.path(name))
        except ValueError:
            todo.append(name)
            continue
        if (str(arrays[HASH_KEY]) != store.key or RETRY_KEY in arrays
                or str(arrays.get(SOURCE_KEY)) != source_stamp(src)):
            todo.append(name)
    return todo


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000, help="entries in the store")
    parser.add_argument("--add", type=int, default=100, help="entries added before the incremental load")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temp folder)")
    args = parser.parse_args(argv)
    from stages.common.cache import FeatureStore
    from stages.common.extraction import load_from_store
    from stages.common.manifest import RACY_NS
    from stages.common.matrix import load_rows

    root = Path(tempfile.mkdtemp(prefix="bench-cache-", dir=args.dir))
    try:
        rng = np.random.default_rng(0)
        (root / "src").mkdir()
        store = FeatureStore(root / "cache", "global", {"name": "bench"}, "k")
        with timed() as t_write:
            images = write_entries(store, root / "src", [f"img{i:06d}" for i in range(args.n)], rng)
            store.flush()
        time.sleep(RACY_NS / 1e9 + 0.1)
        store.flush()  # the records are settled now (older than RACY_NS)
        rows = []
        with timed() as t:
            assert full_read_check(store, images) == []
        rows.append(("check, every entry read (before)", t))
        with timed() as t:
            assert FeatureStore.open(store.dir).missing(images) == []
        rows.append(("check, stat + manifest", t))
        with timed() as t:
            features, _ = load_from_store(store, images, images)
            np.stack([features[n]["descriptor"] for n in images])
        rows.append(("load descriptors, every entry read (before)", t))
        with timed() as t:
            load_rows(store, images)  # builds matrix/descriptor.npz
        rows.append(("load descriptors, first matrix build", t))
        with timed() as t:
            names, matrix, _ = load_rows(FeatureStore.open(store.dir), images)
        assert len(names) == args.n and matrix.shape == (args.n, 1280)
        rows.append(("load descriptors, matrix file", t))
        images.update(write_entries(store, root / "src", [f"new{i:06d}" for i in range(args.add)], rng))
        store.flush()
        with timed() as t:
            todo = FeatureStore.open(store.dir).missing(images)
            names, matrix, _ = load_rows(FeatureStore.open(store.dir), images)
        assert todo == [] and matrix.shape == (args.n + args.add, 1280)
        rows.append((f"check + load after adding {args.add} entries", t))
        size = sum(p.stat().st_size for p in store.dir.rglob("*") if p.is_file()) / 2**20
        print(f"{args.n} entries ({size:.0f} MiB store, written in {t_write.wall:.1f} s); {machine_line()}\n")
        print("| step | wall s | CPU s |\n|---|---|---|")
        for label, t in rows:
            print(f"| {label} | {t.wall:.3f} | {t.cpu:.3f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
