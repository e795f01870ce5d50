"""The per-image extraction loop shared by the feature stages: prefetched reads, a progress
bar, one cache entry per image, and bad images recorded instead of stopping the run."""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import logger
from .cache import ERROR_KEY, FeatureStore
from .images import ImageReadError, read_image


def _read(path: Path):
    try:
        return read_image(path), None
    except ImageReadError as e:
        return None, e


def extract_to_store(store: FeatureStore, images: dict[str, Path],
                     compute: Callable[[np.ndarray], dict[str, np.ndarray]],
                     desc: str, prefetch: int = 4) -> dict:
    """Computes and caches features for every image in `images`.

    Images are decoded by a background thread while `compute` runs. An unreadable image
    (`ImageReadError`) is logged once and cached as an error entry; any other exception
    from `compute` is logged with the image name and the run goes on without caching it.

    Args:
        store: where each image's arrays are written, keyed by name.
        images: {name: path} to compute, in order.
        compute: uint8 RGB [H, W, 3] -> {array name: array}.
        desc: progress-bar label.
        prefetch: images decoded ahead of the one being computed.

    Returns:
        {"computed": n, "failed": {name: reason}, "seconds": wall time}.
    """
    failed: dict[str, str] = {}
    start = time.perf_counter()
    names = list(images)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = [pool.submit(_read, images[n]) for n in names[:prefetch]]
        for i, name in enumerate(tqdm(names, desc=desc, unit="img", leave=False, disable=None)):
            if i + prefetch < len(names):
                pending.append(pool.submit(_read, images[names[i + prefetch]]))
            rgb, error = pending[i].result()
            pending[i] = None
            if error is not None:
                logger.warning("skipping unreadable image %s", error)
                failed[name] = error.reason
                store.write_error(name, error.reason, images[name])
                continue
            try:
                arrays = compute(rgb)
            except Exception as e:  # one bad image must not end the run
                logger.exception("failed to process %s (%s): %s", name, images[name], e)
                failed[name] = f"processing failed: {type(e).__name__}: {e}"
                continue
            store.write(name, arrays, images[name])
    seconds = time.perf_counter() - start
    done = len(names) - len(failed)
    if names:
        logger.info("%s: %d images in %.1f s (%.2f img/s), %d failed",
                    desc, done, seconds, len(names) / max(seconds, 1e-9), len(failed))
    return {"computed": done, "failed": failed, "seconds": seconds}


def load_from_store(store: FeatureStore, names, sources: dict[str, Path] | None = None):
    """Reads the entries of `names`.

    Returns:
        (features, errors): {name: arrays} for usable entries and {name: reason} for
        images recorded as unreadable or absent from the store.
    """
    features, errors = {}, {}
    for name in names:
        arrays = store.read_or_none(name, sources.get(name) if sources else None)
        if arrays is None:
            errors[name] = "no features (processing failed in this run)"
        elif ERROR_KEY in arrays:
            errors[name] = str(arrays[ERROR_KEY])
        else:
            features[name] = arrays
    return features, errors
