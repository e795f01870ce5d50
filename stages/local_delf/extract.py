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

import json
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.common import logger, setup_logging
from stages.common.cache import FeatureStore, atomic_save_npz, atomic_write_json, exclusive_lock, load_npz, source_stamp
from stages.common.conf import conf_hash, resolve, stage_parser
from stages.common.extraction import extract_to_store
from stages.common.images import ImageReadError, read_image
from stages.common.pca import apply_whitening, learn_pca_whitening
from stages.common.shortlist import read_pairs

from .backends import BACKENDS, backend_identity, load_backend
from .geometry import rotate_image, unrotate_points

default_conf = {
    "backend": "delf-lite0",  # delf-lite0 | delf-hub | sift
    "weights_dir": None,  # delf-lite0: trained model directory with an attention head
    "hub_handle": None,  # delf-hub: module URL or local directory (default tfhub.dev/google/delf/1)
    # The range the image's longer side is brought into before the pyramid (pixels): large
    # files shrunk to 1024, small ones enlarged to 512, so the features depend little on the
    # file's resolution. Without enlarging, grocery_store's 348 px photos gave 87-246 px
    # levels and reranking lost mAP (0.531 -> 0.286); enlarging everything to 1024 took the
    # small pyramid levels from smvs_dvd's 500 px cover scans, which phone photos of small
    # covers match (true/best-wrong inliers of its hardest queries 13-36 / 18-37 against
    # 26-53 / 16-29).
    "resize_to": [512, 1024],
    # DELF's pyramid less its top level: on smvs_dvd scale 1.0 doubled extraction time
    # (0.50 -> 0.24 s per reference) for the same reranked mAP (1.0).
    "image_scales": [0.25, 0.3536, 0.5, 0.7071],
    "max_feature_num": 1000,
    "score_threshold": 100.0,  # delf-hub only: DELF's attention threshold
    "min_side": 8,  # pyramid levels smaller than this (pixels) are skipped
    # delf-lite0: a cell is a keypoint when at least `min_textured` of the 33 px square
    # around it has a gray-level std of `min_contrast` (0-255) in 9 px patches and at most
    # `max_blank` of it is flat white (`keypoints.texture_fractions`): blank backgrounds and
    # the outlines of shots on white give no keypoints (two unrelated photos pasted at the
    # same place of white canvases verified with 368 inliers without this).
    "min_contrast": 8.0,
    "min_textured": 0.5,
    "max_blank": 0.2,
    "pca_dim": 40,  # delf-lite0: PCA learned once per data folder (`ensure_pca`, `pca_source`)
    "pca_max_images": 60,
    # Queries are also described rotated by these angles (counter-clockwise; DELF features
    # are not rotation invariant, and phone photos come in any orientation). The unrotated
    # query gets the whole pyramid, the rotated copies three levels: four orientations then
    # cost 0.94 + 3 x 0.63 = 2.82 units of a 1024 px level, what three full ones cost
    # before (2.81; smvs_dvd's 100 queries took 58.6 s against 58.5 s). Levels 0.3-0.6 rather
    # than 0.25-0.5 for the sideways copies: the true inliers of its hardest sideways
    # queries went from 15-33 to 21-67.
    "query_rotations": [0, 90, 180, 270],
    "rotated_scales": [0.3, 0.42, 0.6],
}

confs = {
    "delf-lite0": {},
    "delf-hub": {"backend": "delf-hub", "image_scales": [0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0],
                 "rotated_scales": [0.3, 0.42, 0.6, 0.85, 1.2]},
    "sift": {"backend": "sift", "query_rotations": [0]},
}


def describe(backend, rgb: np.ndarray, rotations, pca: dict | None, rotated_scales=None) -> dict:
    """Local features of one image, at each rotation, keypoints in original pixels.

    Args:
        backend: a `backends` instance.
        rgb: uint8 [H, W, 3].
        rotations: counter-clockwise angles (multiples of 90) to describe the image at.
        pca: {"mean", "projection"} applied to the descriptors (then L2-normalised).
        rotated_scales: pyramid levels of the rotated copies (default: the backend's own).

    Returns:
        The entry arrays documented in the module docstring.
    """
    return _finish(_describe_raw(backend, rgb, rotations, rotated_scales), pca)


def _describe_raw(backend, rgb: np.ndarray, rotations, rotated_scales=None) -> dict:
    """`describe` before the PCA: descriptors float32 [N, backend.dim]."""
    h, w = rgb.shape[:2]
    parts = []
    for degrees in rotations:
        feats = backend(rotate_image(rgb, degrees), scales=rotated_scales if degrees % 360 else None)
        feats["keypoints_xy"] = unrotate_points(feats["keypoints_xy"], degrees, (w, h))
        feats["rotations"] = np.full(len(feats["keypoints_xy"]), degrees, np.int16)
        parts.append(feats)
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    out["image_size"] = np.array([w, h], np.int32)
    out["extracted_rotations"] = np.array(rotations, np.int16)
    return out


def _finish(raw: dict, pca: dict | None) -> dict:
    """Applies the PCA (when given) and the float16 storage type to `_describe_raw` output."""
    out = dict(raw)
    desc = out["descriptors"]
    if pca is not None:
        desc = apply_whitening(desc, pca) if len(desc) else np.zeros((0, len(pca["projection"])), np.float32)
    out["descriptors"] = desc.astype(np.float16)
    return out


class PCAUnavailableError(RuntimeError):
    """The local-descriptor PCA cannot be learned: no sampled image gave features."""


@dataclass(frozen=True)
class PCASource:
    """What the local-descriptor PCA of a run is learned on, and what it is pinned by.

    Attributes:
        images: {name: path} to sample it from (`pca_max_images` of them, evenly spaced by
            name): the data set's training images when it has any, else its readable
            references (`pca_source`).
        kind: "training" or "references" (logged and kept in ``pca.json``).
        dataset: the data folder (resolved) the PCA and the store are keyed by, so that
            adding references to it keeps both; None keys them by the sample itself (the
            names and file stamps of the sampled images).
        relearn_since: a time.time(): a PCA learned before it is learned again
            (``--relearn-pca``). The run's start time, so that the several calls of one
            run (shortlist windows, calibration, shards) learn it once.
    """

    images: dict = field(default_factory=dict)
    kind: str = "references"
    dataset: str | None = None
    relearn_since: float | None = None


def pca_source(dataset, unreadable=(), relearn_since: float | None = None) -> PCASource:
    """The `PCASource` of a data set: its training images when it has any, else its
    references not in `unreadable`; keyed by its folder.

    Args:
        dataset: a `stages.common.dataset.Dataset`.
        unreadable: reference names to leave out (stage 1's ``skipped.json``).
        relearn_since: see `PCASource`.
    """
    train = dataset.training_images()[0]
    if train:
        images, kind = train, "training"
    else:
        images, kind = {r: p for r, p in dataset.references.items() if r not in set(unreadable)}, "references"
    return PCASource(images, kind, str(Path(dataset.root).resolve()), relearn_since)


def _pca_sample(names, n: int) -> list[str]:
    names = sorted(names)
    if len(names) <= n:
        return names
    return [names[i] for i in np.linspace(0, len(names) - 1, n).round().astype(int)]


def _learned_since(info_path: Path, since: float | None) -> bool:
    """Whether the PCA described by ``pca.json`` may be kept: always without `since`, else
    when it was learned at or after `since`."""
    if since is None:
        return True
    try:
        return float(json.loads(info_path.read_text())["learned_at"]) >= since
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_pca(store: FeatureStore, get_backend, conf: dict, source: PCASource) -> tuple[dict, set[str]]:
    """Loads the store's PCA, or learns it on raw features (from the backend `get_backend()`
    returns) of up to `pca_max_images` images of `source`, evenly spaced by name, and pins
    it as ``pca.npz`` beside the features, with ``pca.json`` saying when and on what.

    The PCA belongs to the store: every feature in it is projected by the same matrix. It
    is kept until `source.relearn_since` asks for it again, whatever references are added
    (the store is keyed by the data set, `store_for`); relearning it deletes the store's
    entries, projected by the old one. A file lock (released by the system even when its
    holder is killed) makes concurrent runs and shards learn it once. The sampled images'
    features are written to the store on the way, exactly as a later extraction would
    write a reference. A damaged ``pca.npz`` is not trusted: the store's entries are
    deleted and the PCA learned again.

    Returns:
        (pca {"mean", "projection"}, names of the images written while learning it).

    Raises:
        PCAUnavailableError: no sampled image was readable or gave features.
    """
    path, info = store.dir / "pca.npz", store.dir / "pca.json"
    if _learned_since(info, source.relearn_since):
        try:
            return load_npz(path), set()
        except ValueError:
            pass  # missing (or damaged: checked again under the lock)
    with exclusive_lock(store.dir / "pca.lock"):
        if path.exists() and _learned_since(info, source.relearn_since):
            try:
                return load_npz(path), set()
            except ValueError as e:
                logger.warning("%s; deleting the local features it projected and learning it again", e)
        elif path.exists():
            logger.info("learning the local-descriptor PCA again (--relearn-pca): deleting the local features "
                        "of %s", store.dir)
        store.clear()
        written = _learn_pca(store, get_backend(), conf, source, path)
    return load_npz(path), written


def _learn_pca(store, backend, conf, source: PCASource, path) -> set[str]:
    sample = _pca_sample(source.images, conf["pca_max_images"])
    logger.info("learning local-descriptor PCA (%d -> %d) on %d %s images", backend.dim, conf["pca_dim"],
                len(sample), source.kind.removesuffix("s"))
    raw = {}
    for name in sample:
        try:
            raw[name] = _describe_raw(backend, read_image(source.images[name]), [0])
        except ImageReadError as e:
            logger.warning("skipping unreadable image %s", e)
    # Learned on the descriptors at their float16 storage precision.
    vectors = [f["descriptors"].astype(np.float16).astype(np.float32) for f in raw.values() if len(f["descriptors"])]
    if sum(map(len, vectors)) < 2:
        raise PCAUnavailableError(f"cannot learn the local PCA: none of {len(sample)} sampled {source.kind} images "
                                  "gave local features")
    pca = learn_pca_whitening(np.concatenate(vectors), conf["pca_dim"], shrinkage=1.0)
    atomic_save_npz(path, pca)
    atomic_write_json(path.with_suffix(".json"), {
        "learned_at": time.time(), "learned_on": source.kind, "dataset": source.dataset,
        "images": [[n, source_stamp(source.images[n])] for n in sample]})
    try:
        for name, feats in raw.items():
            store.write(name, _finish(feats, pca), source.images[name])
    finally:
        store.flush()
    return set(raw)


def store_for(conf: dict, cache_root: Path, source: PCASource | None = None) -> FeatureStore:
    """The feature store of `conf`. For a backend whose descriptors are projected by a
    learned PCA, the key also names what the PCA is pinned by: `source.dataset`, or without
    one the images it is sampled from (names, and the size and mtime of their files)."""
    parts = [conf, backend_identity(conf)]
    if BACKENDS[conf["backend"]].needs_pca:
        source = source or PCASource()
        if source.dataset is not None:
            parts.append({"dataset": source.dataset})
        else:
            parts.append([(n, source_stamp(source.images[n])) for n in _pca_sample(source.images,
                                                                                     conf["pca_max_images"])])
    return FeatureStore(cache_root, "local", conf, conf_hash(*parts), summary_keys=("extracted_rotations",))


def _extracted_rotations(store: FeatureStore, name: str) -> set[int] | None:
    """The rotations an entry covers, reading only that array (a query entry is ~300 KB);
    None when the entry has no such array or cannot be read."""
    try:
        with np.load(store.path(name), allow_pickle=False) as f:
            return set(f["extracted_rotations"].tolist()) if "extracted_rotations" in f.files else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None


def needs_extraction(store: FeatureStore, images: dict[str, Path], rotations, overwrite: bool) -> list[str]:
    """Names whose entry is missing, stale, or lacks one of `rotations` (read from the
    store's manifest; from the entry when the manifest does not hold them)."""
    if overwrite:
        return list(images)
    records = store.records(images)
    todo = {n for n in images if records[n] is None or records[n].get("r")}
    if len(rotations) > 1:
        for name in images:
            if name not in todo and "e" not in records[name]:
                done = store.summary(records[name], "extracted_rotations")
                done = set(done) if done is not None else _extracted_rotations(store, name)
                if done is not None and not set(rotations) <= done:
                    todo.add(name)
    return [n for n in images if n in todo]


class LazyBackend:
    """Builds the backend of `conf` on first use and keeps it: a fully cached run never
    loads a network, and several `main` calls of one run (shortlist windows) load it once."""

    def __init__(self, conf: dict, cache_root: Path):
        self.conf, self.cache_root, self._backend = conf, cache_root, None

    def __call__(self):
        if self._backend is None:
            self._backend = load_backend(self.conf, self.cache_root)
        return self._backend


def main(conf: dict, pairs_path: Path, images: dict[str, Path], cache_root: Path, overwrite: bool = False,
         shard: tuple[int, int] = (0, 1), backend: LazyBackend | None = None,
         pca_source: PCASource | None = None) -> Path:
    """Extracts local features of the queries and shortlisted references in `pairs_path`.

    Args:
        conf: the stage conf (see `default_conf`).
        pairs_path: stage-1 shortlist, "query<TAB>reference" per line.
        images: {image name: path} covering every name in the shortlist.
        cache_root: cache folder; features go to ``<cache_root>/local/<name>-<hash>/``.
        overwrite: recompute cached entries (the pinned PCA is kept: see `pca_source`).
        shard: (i, n) computes only every n-th image starting at i. The shards share the
            store's PCA (the first to need it learns it, under a lock).
        backend: a `LazyBackend` of `conf` to share between calls (one is made otherwise).
        pca_source: what the local-descriptor PCA is learned on and pinned by, and whether
            to learn it again (`PCASource`, `pca_source`; default: the shortlisted
            references, keyed by that sample).

    Returns:
        The feature store folder.
    """
    logger.info("local features, conf: %s", conf)
    pairs = read_pairs(pairs_path)
    queries = sorted(pairs)
    refs = sorted({r for rs in pairs.values() for r in rs})
    source = pca_source or PCASource({r: images[r] for r in refs})
    store = store_for(conf, cache_root, source)
    get_backend = backend or LazyBackend(conf, cache_root)
    pca = None
    if BACKENDS[conf["backend"]].needs_pca:
        pca, fresh = ensure_pca(store, get_backend, conf, source)
        if fresh:
            logger.info("local features: %d %s images described while learning the PCA", len(fresh),
                        source.kind.removesuffix("s"))
    jobs = [("queries", queries, conf["query_rotations"]), ("references", refs, [0])]
    for label, names, rotations in jobs:
        names = names[shard[0]::shard[1]]
        todo = needs_extraction(store, {n: images[n] for n in names}, rotations, overwrite)
        logger.info("local features: %d of %d %s to extract", len(todo), len(names), label)
        if not todo:
            continue
        backend_now = get_backend()  # built here, before any worker thread needs it
        stats = extract_to_store(store, {n: images[n] for n in todo},
                                 lambda rgb, r=rotations, b=backend_now: describe(b, rgb, r, pca,
                                                                                  conf["rotated_scales"]),
                                 desc=f"local features ({label})", workers=backend_now.image_workers)
        n_kp = [len(store.read(n)["keypoints_xy"]) for n in todo if n not in stats["failed"]]
        logger.info("local features (%s): %.1f keypoints per image (%s)", label,
                    float(np.mean(n_kp)) if n_kp else 0.0,
                    f"{len(rotations)} rotations" if len(rotations) > 1 else "no rotation")
    return store.dir


def cli(argv=None):
    parser = stage_parser(__doc__, confs, "delf-lite0")
    parser.add_argument("--pairs", type=Path, required=True,
                        help="shortlist file from stage 1 (pairs-global-top*.txt or pairs-calibration.txt)")
    parser.add_argument("--data", type=Path, required=True, help="data folder (hackathon layout)")
    parser.add_argument("--relearn-pca", action="store_true",
                        help="learn the local-descriptor PCA again (delf-lite0: it is learned once per data "
                             "folder, on its training images or else a sample of its references, and kept in "
                             "the cache while references are added); deletes the local features it projected")
    args = parser.parse_args(argv)
    setup_logging()
    from stages.common.dataset import load_dataset

    conf = resolve(default_conf, confs, args.conf)
    dataset = load_dataset(args.data)
    # Without training images the PCA is learned on the readable references, as in a pipeline
    # run: the unreadable ones are listed in the skipped.json that stage 1 wrote beside the shortlist.
    skipped = args.pairs.parent / "skipped.json"
    unreadable = set(json.loads(skipped.read_text())["references"]) if skipped.exists() else set()
    images = {**dataset.images, **dataset.training_images()[0]}  # a calibration shortlist pairs training images
    source = pca_source(dataset, unreadable, time.time() if args.relearn_pca else None)
    print(main(conf, args.pairs, images, args.cache, args.overwrite, args.shard, pca_source=source))


if __name__ == "__main__":
    cli()
