"""One array of many store entries kept as one matrix file, so that a run loads N global
descriptors from one file instead of opening N entries.

``<store>/matrix/<array>.npz`` holds "names" str [M], "stamps" int64 [M, 3] (the entry
file's size, mtime in ns and inode when its row was read, `manifest.file_stat`) and
"values" float32 [M, ...] (row m: the entry's array). A row is used only while its entry
file still has that stat and the store's manifest vouches for the entry
(`FeatureStore.records`); the other rows are read from their entries and the file
rewritten (temp file + rename), so adding references reads only the new ones.
"""

from pathlib import Path

import numpy as np

from . import logger
from .cache import ERROR_KEY, MATRIX_DIR, FeatureStore, atomic_save_npz, load_npz

NO_FEATURES = "no features (the cache entry is missing or was damaged)"


def _load(path: Path) -> tuple[dict[str, int], np.ndarray, np.ndarray] | None:
    if not path.exists():
        return None
    try:
        data = load_npz(path)
        names, stamps, values = data["names"].tolist(), data["stamps"], data["values"]
        if len(names) != len(stamps) or len(names) != len(values):
            raise ValueError(f"{path}: {len(names)} names, {len(stamps)} stamps, {len(values)} rows")
    except (ValueError, KeyError) as e:
        logger.warning("descriptor matrix rebuilt from the entries: %s", e)
        return None
    return {n: i for i, n in enumerate(names)}, stamps, values


def load_rows(store: FeatureStore, images: dict[str, Path | None], array: str = "descriptor",
              update: bool = True) -> tuple[list[str], np.ndarray, dict[str, str]]:
    """Array `array` of every usable entry of `images`, as one matrix.

    Args:
        store: the feature store.
        images: {name: source path or None}, in the order wanted (`FeatureStore.records`
            checks each entry against its source file).
        array: the entry array to gather; it has the same shape and a numeric dtype in
            every entry.
        update: rewrite the matrix file when rows were read from entries.

    Returns:
        (names with a row, in `images` order; float32 [n, ...] their rows; {name: reason}
        for error entries and for names without a usable entry, whose damaged or stale
        entry is deleted and logged as `FeatureStore.read_or_none` does).

    Raises:
        ValueError: the entries' arrays differ in shape.
    """
    records = store.records(images)
    path = store.dir / MATRIX_DIR / f"{array}.npz"
    cached = _load(path)
    index, stamps, values = cached if cached is not None else ({}, np.zeros((0, 3), np.int64), None)
    names, rows, errors, fresh = [], [], {}, {}
    for name, source in images.items():
        record = records[name]
        if record is None:
            arrays = store.read_or_none(name, source)  # logs and deletes a stale or damaged entry
            if arrays is None or ERROR_KEY in arrays or array not in arrays:
                errors[name] = NO_FEATURES if arrays is None or ERROR_KEY not in arrays else str(arrays[ERROR_KEY])
                continue
            row = arrays[array]
        elif "e" in record:
            errors[name] = record["e"]
            continue
        else:
            stat = (record["z"], record["m"], record["i"])
            i = index.get(name)
            if i is not None and tuple(stamps[i].tolist()) == stat:
                row = values[i]
            else:
                arrays = store.read_or_none(name, source)
                if arrays is None or array not in arrays:
                    errors[name] = NO_FEATURES if arrays is None or ERROR_KEY not in arrays else str(arrays[ERROR_KEY])
                    continue
                row = arrays[array]
                fresh[name] = (stat, row)
        names.append(name)
        rows.append(np.asarray(row, np.float32))
    if rows and len({r.shape for r in rows}) > 1:
        raise ValueError(f"{store.dir}: entries of {array!r} differ in shape: {sorted({r.shape for r in rows})}")
    out = np.stack(rows) if rows else np.zeros((0,), np.float32)
    if fresh and update:
        _save(path, index, stamps, values, fresh)
    if fresh:
        logger.info("%s: %d of %d %s rows read from their entries, %d from %s", store.dir.name, len(fresh),
                    len(names), array, len(names) - len(fresh), path.name)
    return names, out, errors


def _save(path: Path, index: dict[str, int], stamps: np.ndarray, values, fresh: dict) -> None:
    """Rewrites the matrix file: its old rows (those of names read again replaced) and the new ones."""
    keep = [(n, i) for n, i in index.items() if n not in fresh]
    shape = next(iter(fresh.values()))[1].shape
    if values is not None and values.shape[1:] != shape:
        keep = []  # another shape (the entries were recomputed with another conf): start over
    names = [n for n, _ in keep] + list(fresh)
    new_stamps = np.array([stamps[i] for _, i in keep] + [s for s, _ in fresh.values()], np.int64).reshape(-1, 3)
    new_values = np.stack([values[i] for _, i in keep] + [np.asarray(r, np.float32) for _, r in fresh.values()])
    try:
        atomic_save_npz(path, {"names": np.array(names, dtype=str), "stamps": new_stamps,
                               "values": new_values.astype(np.float32)})
    except OSError as e:
        logger.warning("%s not updated (%s): the next run reads the entries again", path, e)
