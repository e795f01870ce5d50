"""The per-image extraction loop shared by the feature stages: prefetched reads, a progress
bar, one cache entry per image, and bad images recorded instead of stopping the run."""

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from . import logger
from .cache import ERROR_KEY, FeatureStore
from .images import ImageReadError, read_image
from .progress import progress

# Decoded images waiting in the prefetch queue are capped at about this many pixels
# (x 3 bytes), so a folder of huge photos does not multiply the memory by the prefetch depth.
PREFETCH_PIXELS = 50_000_000


def _read(path: Path):
    try:
        return read_image(path), None
    except ImageReadError as e:
        return None, e
    except Exception as e:  # e.g. MemoryError in the decoder: this image fails, the run goes on
        return None, ImageReadError(path, f"cannot decode image ({type(e).__name__}: {e})", transient=True)


def _may_read_ahead(ahead: list) -> bool:
    """Whether to queue one more read: always one image ahead; deeper only while the images
    decoded ahead are known (done) and hold fewer than PREFETCH_PIXELS pixels."""
    if len(ahead) < 2:
        return True
    if not all(f.done() for f in ahead):
        return False
    return sum(f.result()[0].shape[0] * f.result()[0].shape[1] for f in ahead
               if f.result()[0] is not None) < PREFETCH_PIXELS


def _read_and_compute(path: Path, compute):
    rgb, error = _read(path)
    if error is not None:
        return None, error, None
    try:
        return compute(rgb), None, None
    except Exception as e:  # reported by the caller, with the image name
        return None, None, e


def _results(names, images, compute, prefetch: int, workers: int):
    """(name, arrays, read error, compute exception) per image, in order."""
    if workers > 1:  # the backend is thread-safe and single-threaded: one image per thread
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for name, result in zip(names, pool.map(lambda n: _read_and_compute(images[n], compute), names),
                                    strict=True):
                yield (name, *result)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = []
        for i, name in enumerate(names):
            while len(pending) < min(i + 1 + prefetch, len(names)) and _may_read_ahead(pending[i:]):
                pending.append(pool.submit(_read, images[names[len(pending)]]))
            rgb, error = pending[i].result()
            pending[i] = None
            if error is not None:
                yield name, None, error, None
                continue
            try:
                yield name, compute(rgb), None, None
            except Exception as e:  # reported by the caller, with the image name
                yield name, None, None, e


def extract_to_store(store: FeatureStore, images: dict[str, Path],
                     compute: Callable[[np.ndarray], dict[str, np.ndarray]],
                     desc: str, prefetch: int = 4, workers: int = 1) -> dict:
    """Computes and caches features for every image in `images`.

    Images are decoded by a background thread while `compute` runs, at most `prefetch`
    images and about PREFETCH_PIXELS pixels ahead; with `workers` > 1, that many threads
    each read and compute whole images (for thread-safe backends that use one core). An
    unreadable image (`ImageReadError`) is logged once and cached as an error entry (one
    that the next run retries when the file could not be read at all); an exception from
    `compute` is logged with the image name and cached as an error entry to retry, and
    the run goes on.

    Args:
        store: where each image's arrays are written, keyed by name.
        images: {name: path} to compute, in order.
        compute: uint8 RGB [H, W, 3] -> {array name: array}.
        desc: progress-bar label.
        prefetch: images decoded ahead of the one being computed.
        workers: threads computing images at once (1: compute in this thread).

    Returns:
        {"computed": n, "failed": {name: reason}, "seconds": wall time}.
    """
    failed: dict[str, str] = {}
    start = time.perf_counter()
    names = list(images)
    results = _results(names, images, compute, prefetch, workers)
    try:
        for name, arrays, error, exc in progress(results, total=len(names), desc=desc, unit="img"):
            if error is not None:
                logger.warning("skipping unreadable image %s", error)
                failed[name] = error.reason
                store.write_error(name, error.reason, images[name], retry=error.transient)
            elif exc is not None:  # one bad image must not end the run
                logger.error("failed to process %s (%s): %s", name, images[name], exc, exc_info=exc)
                failed[name] = f"processing failed ({type(exc).__name__}: {exc})"
                store.write_error(name, failed[name], images[name], retry=True)
            else:
                store.write(name, arrays, images[name])
    finally:
        store.flush()  # the manifest records what was written, also when the loop was cut short
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
            errors[name] = "no features (the cache entry is missing or was damaged)"
        elif ERROR_KEY in arrays:
            errors[name] = str(arrays[ERROR_KEY])
        else:
            features[name] = arrays
    return features, errors
