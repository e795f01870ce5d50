"""Stage 2: local features for every query and for the references in its shortlist.

Reads the stage-1 shortlist (``pairs-global-top{k}.txt``), extracts each needed image once
(a reference shared by many shortlists too) and caches it by name. Each entry holds:

- ``keypoints_xy`` float32 [N, 2]: (x, y) in original-image pixels
- ``descriptors`` float16 [N, D]: unit L2 norm (D = 40 for DELF, 128 for SIFT)
- ``scores`` float32 [N]: attention or feature norm (SIFT: detector response)
- ``scales`` float32 [N]: image scale at which each keypoint was found
- ``rotations`` int16 [N]: the query rotation (degrees, counter-clockwise) whose image
  gave the descriptor; keypoints are mapped back to the unrotated image
- ``image_size`` int32 [2]: (width, height)
- ``extracted_rotations`` int16 [G]: the rotations this entry covers
"""

import argparse
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from pipeline import logger, setup_logging
from pipeline.cache import FeatureStore, atomic_save_npz, load_npz
from pipeline.conf import conf_hash, resolve
from pipeline.extraction import extract_to_store
from pipeline.images import ImageReadError, read_image
from stages.global_embed.search import read_pairs
from stages.global_embed.whitening import apply_whitening, learn_pca_whitening

from .backends import BACKENDS, backend_identity, load_backend
from .geometry import rotate_image, unrotate_points

default_conf = {
    "backend": "delf-lite0",  # delf-lite0 | delf-hub | sift
    "weights_dir": None,  # delf-lite0: trained model directory with an attention head
    "hub_handle": None,  # delf-hub: module URL or local directory (default tfhub.dev/google/delf/1)
    "resize_max": 1024,  # longest image side in pixels before the pyramid
    "image_scales": [0.25, 0.3536, 0.5, 0.7071, 1.0],
    "max_feature_num": 1000,
    "score_threshold": 100.0,  # delf-hub only: DELF's attention threshold
    "min_side": 16,  # pyramid levels smaller than this (pixels) are skipped
    "pca_dim": 40,  # delf-lite0: PCA learned on reference features
    "pca_max_images": 60,
    # Queries are also described rotated by these angles (DELF features are not rotation
    # invariant and phone photos of products are often taken sideways).
    "query_rotations": [0, 90, 270],
}

confs = {
    "delf-lite0": {},
    "delf-hub": {"backend": "delf-hub", "image_scales": [0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0]},
    "sift": {"backend": "sift", "query_rotations": [0]},
}


def describe(backend, rgb: np.ndarray, rotations, pca: dict | None) -> dict:
    """Local features of one image, at each rotation, keypoints in original pixels.

    Args:
        backend: a `backends` instance.
        rgb: uint8 [H, W, 3].
        rotations: counter-clockwise angles (multiples of 90) to describe the image at.
        pca: {"mean", "projection"} applied to the descriptors (then L2-normalised).

    Returns:
        The entry arrays documented in the module docstring.
    """
    h, w = rgb.shape[:2]
    parts = []
    for degrees in rotations:
        feats = backend(rotate_image(rgb, degrees))
        feats["keypoints_xy"] = unrotate_points(feats["keypoints_xy"], degrees, (w, h))
        feats["rotations"] = np.full(len(feats["keypoints_xy"]), degrees, np.int16)
        parts.append(feats)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    desc = out["descriptors"]
    if pca is not None:
        desc = apply_whitening(desc, pca) if len(desc) else np.zeros((0, len(pca["projection"])), np.float32)
    out["descriptors"] = desc.astype(np.float16)
    out["image_size"] = np.array([w, h], np.int32)
    out["extracted_rotations"] = np.array(rotations, np.int16)
    return out


def _pca_sample(refs: list[str], n: int) -> list[str]:
    if len(refs) <= n:
        return list(refs)
    return [refs[i] for i in np.linspace(0, len(refs) - 1, n).round().astype(int)]


def ensure_pca(store: FeatureStore, get_backend, conf: dict, refs: list[str], images: dict[str, Path],
               overwrite: bool = False) -> tuple[dict, set[str]]:
    """Loads the store's PCA, or learns it on raw features (from the backend `get_backend()`
    returns) of up to `pca_max_images` references, evenly spaced by name, and caches it as
    ``pca.npz`` beside the features.

    The PCA belongs to the store: every feature in it is projected by the same matrix, so
    images cached from another dataset stay comparable. A lock file makes concurrent runs
    learn it once. The sampled references' features are written to the store on the way.

    Returns:
        (pca {"mean", "projection"}, names of the references written while learning it).

    Raises:
        RuntimeError: no sampled reference was readable, or a lock held for over an hour.
    """
    path = store.dir / "pca.npz"
    lock = store.dir / "pca.lock"
    if overwrite:
        path.unlink(missing_ok=True)
    deadline = time.time() + 3600
    written: set[str] = set()
    while not path.exists():
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if time.time() - lock.stat().st_mtime > 3600 or time.time() > deadline:
                lock.unlink(missing_ok=True)
                continue
            time.sleep(1.0)
            continue
        try:
            os.close(fd)
            if not path.exists():
                written = _learn_pca(store, get_backend(), conf, refs, images, path)
        finally:
            lock.unlink(missing_ok=True)
    return load_npz(path), written


def _learn_pca(store, backend, conf, refs, images, path) -> set[str]:
    sample = _pca_sample(refs, conf["pca_max_images"])
    logger.info("learning local-descriptor PCA (%d -> %d) on %d references", backend.dim, conf["pca_dim"], len(sample))
    raw = {}
    for name in sample:
        try:
            raw[name] = (describe(backend, read_image(images[name]), [0], None), images[name])
        except ImageReadError as e:
            logger.warning("skipping unreadable image %s", e)
    vectors = [f["descriptors"].astype(np.float32) for f, _ in raw.values() if len(f["descriptors"])]
    if not vectors:
        raise RuntimeError("cannot learn the local PCA: no readable reference with features")
    pca = learn_pca_whitening(np.concatenate(vectors), conf["pca_dim"], shrinkage=1.0)
    atomic_save_npz(path, pca)
    for name, (feats, source) in raw.items():
        feats["descriptors"] = apply_whitening(feats["descriptors"].astype(np.float32), pca).astype(np.float16)
        store.write(name, feats, source)
    return set(raw)


def store_for(conf: dict, cache_root: Path) -> FeatureStore:
    return FeatureStore(cache_root, "local", conf, conf_hash(conf, backend_identity(conf)))


def _extracted_rotations(store: FeatureStore, name: str) -> set[int] | None:
    """The rotations an entry covers, reading only that array (a query entry is ~300 KB);
    None when the entry has no such array or cannot be read."""
    try:
        with np.load(store.path(name), allow_pickle=False) as f:
            return set(f["extracted_rotations"].tolist()) if "extracted_rotations" in f.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def needs_extraction(store: FeatureStore, images: dict[str, Path], rotations, overwrite: bool) -> list[str]:
    """Names whose entry is missing, stale, or lacks one of `rotations`."""
    todo = set(store.missing(images, overwrite))
    if len(rotations) > 1:
        for name in images:
            if name not in todo:
                done = _extracted_rotations(store, name)
                if done is not None and not set(rotations) <= done:
                    todo.add(name)
    return [n for n in images if n in todo]


def main(conf: dict, pairs_path: Path, images: dict[str, Path], cache_root: Path, overwrite: bool = False,
         shard: tuple[int, int] = (0, 1), backend=None) -> Path:
    """Extracts local features of the queries and shortlisted references in `pairs_path`.

    Args:
        conf: the stage conf (see `default_conf`).
        pairs_path: stage-1 shortlist, "query<TAB>reference" per line.
        images: {image name: path} covering every name in the shortlist.
        cache_root: cache folder; features go to ``<cache_root>/local/<name>-<hash>/``.
        overwrite: recompute cached entries (and the PCA).
        shard: (i, n) computes only every n-th image starting at i.
        backend: a loaded backend to reuse.

    Returns:
        The feature store folder.
    """
    logger.info("local features, conf: %s", conf)
    pairs = read_pairs(pairs_path)
    queries = sorted(pairs)
    refs = sorted({r for rs in pairs.values() for r in rs})
    store = store_for(conf, cache_root)
    loaded = [backend]

    def get_backend():  # building the network is slow; a fully cached run never does
        if loaded[0] is None:
            loaded[0] = load_backend(conf, cache_root)
        return loaded[0]

    pca, fresh = None, set()
    if BACKENDS[conf["backend"]].needs_pca:
        pca, fresh = ensure_pca(store, get_backend, conf, refs, images, overwrite)
    jobs = [("queries", queries, conf["query_rotations"]), ("references", refs, [0])]
    for label, names, rotations in jobs:
        names = names[shard[0]::shard[1]]
        todo = needs_extraction(store, {n: images[n] for n in names if n not in fresh}, rotations, overwrite)
        logger.info("local features: %d of %d %s to extract", len(todo), len(names), label)
        if not todo:
            continue
        stats = extract_to_store(store, {n: images[n] for n in todo},
                                 lambda rgb, r=rotations: describe(get_backend(), rgb, r, pca),
                                 desc=f"local features ({label})")
        n_kp = [len(store.read(n)["keypoints_xy"]) for n in todo if n not in stats["failed"]]
        logger.info("local features (%s): %.1f keypoints per image (%d rotations)",
                    label, float(np.mean(n_kp)) if n_kp else 0.0, len(rotations))
    return store.dir


def cli():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, required=True, help="shortlist file from stage 1")
    parser.add_argument("--data", type=Path, required=True, help="data folder (hackathon layout)")
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="cache folder")
    parser.add_argument("--conf", default="delf-lite0", choices=sorted(confs), help="named conf")
    parser.add_argument("--overwrite", action="store_true", help="recompute cached features")
    args = parser.parse_args()
    setup_logging()
    from pipeline.dataset import load_dataset

    conf = resolve(default_conf, confs, args.conf)
    print(main(conf, args.pairs, load_dataset(args.data).images, args.cache, args.overwrite))


if __name__ == "__main__":
    cli()
