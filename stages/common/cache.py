"""Per-image feature files keyed by image name, tied to the conf hash that produced them.

Layout: ``<cache_root>/<stage>/<conf name>-<conf hash>/<encoded image name>.npz`` plus a
``conf.json`` holding the effective conf. One file per image makes runs resumable (finished
images are skipped), crash-safe (each file is written to a temp file and renamed) and safe
for two concurrent runs (each writes its own temp files; a rename is atomic). Each store
folder also keeps an index of its entries (``manifest.json`` and per-writer journals,
`stages.common.manifest`), so that checking what is cached stats files instead of reading
them, and may keep matrices of one array of many entries (``matrix/``, `stages.common.matrix`).
"""

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np

from . import logger
from .manifest import JOURNALS, Manifest, file_stat, trusted

HASH_KEY = "__conf_hash__"
SOURCE_KEY = "__source__"
ERROR_KEY = "error"
RETRY_KEY = "__retry__"
_MAX_FILE_STEM = 200
MATRIX_DIR = "matrix"  # `stages.common.matrix` files of a store


def source_stamp(path) -> str:
    """Size and modification time of an image file: a changed file gets recomputed.
    "missing" when the file cannot be stat-ed (deleted, broken link)."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


class CacheMismatchError(RuntimeError):
    """A cache directory holds features made with another conf."""


def encode_name(name: str) -> str:
    """Maps an image name to a file stem that cannot leave its directory.

    "/", "\\", "%" and every non-ASCII or control character are percent-encoded, a leading
    "." too, so that names such as "../x" or ".hidden" stay plain files in the cache folder.
    Names holding bytes that are not UTF-8 (file names from another locale, which Python
    keeps as surrogate escapes) are encoded byte for byte and decode back to the same name.
    """
    stem = quote(name, safe=" -_.,()[]+=@&'!~#$;", errors="surrogateescape")
    if stem.startswith("."):
        stem = "%2E" + stem[1:]
    if len(stem) > _MAX_FILE_STEM:
        import hashlib

        stem = stem[:_MAX_FILE_STEM - 17] + "~" + hashlib.sha1(name.encode()).hexdigest()[:16]
    return stem


def decode_name(stem: str) -> str:
    """Inverse of `encode_name` (except for hashed long names)."""
    return unquote(stem, errors="surrogateescape")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes `data` to `path` through a temp file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes owner-only files; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    """Writes `obj` as UTF-8 JSON, atomically. Strings that UTF-8 cannot hold (file names
    with undecodable bytes, kept by Python as surrogate escapes) make the whole file
    ASCII with \\u escapes instead, which Python's json reads back to the same strings."""
    text = json.dumps(obj, indent=1, ensure_ascii=False)
    try:
        data = text.encode()
    except UnicodeEncodeError:
        data = json.dumps(obj, indent=1, ensure_ascii=True).encode()
    atomic_write_bytes(Path(path), data)


def remove_stale_temp_files(folder: Path, age_s: float = 3600.0) -> None:
    """Deletes the temp files (".tmp-*") that killed runs left in `folder`; younger ones
    may belong to a run writing right now and are kept."""
    now = time.time()
    for tmp in Path(folder).glob(".tmp-*"):
        try:
            if now - tmp.stat().st_mtime > age_s:
                tmp.unlink()
        except OSError:
            pass  # gone already (another run cleaned it)


def atomic_save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Saves arrays as an uncompressed .npz through a temp file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path: Path, keys=None) -> dict[str, np.ndarray]:
    """Reads every array of an .npz into memory, or only those named in `keys` (the names
    it does not hold are left out).

    Raises:
        ValueError: the file is not a readable .npz (truncated, corrupt, or not a zip).
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files if keys is None or k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{path}: unreadable feature file ({e})") from e


@contextlib.contextmanager
def exclusive_lock(path: Path):
    """Holds an exclusive advisory lock (``flock``) on `path` for the ``with`` block.

    The operating system releases the lock when its holder exits, also on SIGKILL, so a
    killed run never leaves a lock that blocks the next one. The lock file is kept
    (deleting it would let two runs lock two different files).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class FeatureStore:
    """Feature files of one stage and one conf, keyed by image name, with an index.

    Each entry's conf hash, source stamp, error/retry marks and file stat are kept in the
    store's manifest (`stages.common.manifest`), so that `missing` and `records` stat the
    entry files and read the manifest instead of opening every entry; an entry is read in
    full when used (`read`), which checks its CRC-32s. An entry the manifest does not
    vouch for (a store written before the manifest existed, a file changed since, a record
    too recent to trust) is read once to check it and recorded.

    Attributes:
        key: the conf hash; conf: the effective conf; dir: the store folder;
        manifest: its `manifest.Manifest`.

    Args:
        root: the cache root, e.g. ``cache/``.
        stage: stage folder name, e.g. ``"global"``.
        conf: the effective conf (JSON-serialisable); stored as ``conf.json``.
        key: the conf hash (plus anything else the features depend on).
        summary_keys: names of small arrays copied into each entry's manifest record
            (`summary`), so that callers can test them without opening the entry.

    Raises:
        CacheMismatchError: the folder exists with a ``conf.json`` whose hash differs.
    """

    def __init__(self, root: Path, stage: str, conf: dict, key: str, summary_keys: tuple[str, ...] = ()):
        self.key, self.conf, self.summary_keys = key, conf, tuple(summary_keys)
        self.dir = Path(root) / stage / f"{conf.get('name', stage)}-{key}"
        self.dir.mkdir(parents=True, exist_ok=True)
        conf_path = self.dir / "conf.json"
        if conf_path.exists():
            stored = json.loads(conf_path.read_text())
            if stored.get("hash") != key:
                raise CacheMismatchError(
                    f"{self.dir} holds features of conf hash {stored.get('hash')}, not {key}; "
                    "remove the folder or use --overwrite")
        else:
            atomic_write_json(conf_path, {"hash": key, "conf": conf})
        remove_stale_temp_files(self.dir)
        remove_stale_temp_files(self.dir / JOURNALS)
        self.manifest = Manifest(self.dir)

    @classmethod
    def open(cls, folder: Path, summary_keys: tuple[str, ...] = ()) -> "FeatureStore":
        """Opens an existing store folder (one that holds its ``conf.json``)."""
        folder = Path(folder)
        stored = json.loads((folder / "conf.json").read_text())
        return cls(folder.parent.parent, folder.parent.name, stored["conf"], stored["hash"], summary_keys)

    def path(self, name: str) -> Path:
        return self.dir / f"{encode_name(name)}.npz"

    def __contains__(self, name: str) -> bool:
        return self.path(name).exists()

    def names(self) -> set[str]:
        """Names of all images with a feature file in this store."""
        return {decode_name(p.stem) for p in self.dir.glob("*.npz") if not p.name.startswith(".")}

    def _record(self, arrays: dict[str, np.ndarray], stat) -> dict:
        """The manifest record of an entry holding `arrays`, whose file has `stat`."""
        record = {"z": stat[0], "m": stat[1], "i": stat[2], "t": time.time_ns()}
        stamp = arrays.get(HASH_KEY)
        if stamp is None or str(stamp) != self.key:
            record["h"] = None if stamp is None else str(stamp)
        if SOURCE_KEY in arrays:
            record["s"] = str(arrays[SOURCE_KEY])
        if RETRY_KEY in arrays:
            record["r"] = 1
        if ERROR_KEY in arrays:
            record["e"] = str(arrays[ERROR_KEY])
        summary = {k: np.asarray(arrays[k]).tolist() for k in self.summary_keys if k in arrays}
        if summary:
            record["x"] = summary
        return record

    def records(self, images: dict[str, Path | None]) -> dict[str, dict | None]:
        """The manifest record of each entry of `images` ({name: source path or None}) that
        is intact as far as a stat tells, stamped with this store's conf hash and made from
        this version of its source file; None for the others (absent, damaged, stale).
        Retry and error entries have records (keys "r", "e"; see `stages.common.manifest`).

        Reads the manifest and stats each entry file; an entry without a trusted record is
        read in full once (the zip CRC-32 of each array checked) and its record added.
        """
        known = self.manifest.load()
        out, checked = {}, 0
        for name, source in images.items():
            path = self.path(name)
            stat = file_stat(path)
            record = known.get(name)
            if stat is None:
                out[name] = None
                continue
            if not trusted(record, stat):
                try:
                    arrays = load_npz(path)
                except ValueError as e:
                    logger.warning("recomputing cache entry: %s", e)
                    out[name] = None
                    continue
                if file_stat(path) != stat:  # replaced while being read: check it next time
                    out[name] = None
                    continue
                record = self._record(arrays, stat)
                self.manifest.append(name, record)
                checked += 1
            current = record.get("h", self.key) == self.key and (
                source is None or record.get("s") == source_stamp(source))
            out[name] = record if current else None
        if checked:
            self.manifest.compact()
        return out

    def is_current(self, name: str, source: Path | None = None) -> bool:
        """True when `name` has an intact entry made from this version of `source` and not
        marked for retry (checked as `records` checks it)."""
        record = self.records({name: source})[name]
        return record is not None and not record.get("r")

    def missing(self, images: dict[str, Path], overwrite: bool = False) -> list[str]:
        """Names among `images` ({name: source path}) whose entry is absent, corrupt,
        marked for retry or older than its source file; all of them if `overwrite`. Stats
        the entry files and reads the manifest (`records`)."""
        if overwrite:
            return list(images)
        records = self.records(images)
        return [n for n in images if records[n] is None or records[n].get("r")]

    def summary(self, record: dict | None, key: str):
        """The `summary_keys` array `key` of an entry's record (a list), or None when the
        record does not hold it."""
        return None if record is None else record.get("x", {}).get(key)

    def write(self, name: str, arrays: dict[str, np.ndarray], source: Path | None = None) -> None:
        """Atomically writes the feature arrays of image `name`, stamped with the conf hash
        and, when given, the size and mtime of its source image file, and records it in
        this writer's manifest journal (`flush` merges it)."""
        stamps = {HASH_KEY: np.array(self.key)}
        if source is not None:
            stamps[SOURCE_KEY] = np.array(source_stamp(source))
        arrays = {**arrays, **stamps}
        path = self.path(name)
        atomic_save_npz(path, arrays)
        stat = file_stat(path)
        if stat is not None:
            self.manifest.append(name, self._record(arrays, stat))

    def flush(self) -> None:
        """Merges this writer's manifest journal into the store's manifest (call when done
        writing; a journal left unmerged, by a killed run, is merged by the next flush)."""
        self.manifest.compact()

    def clear(self) -> None:
        """Deletes every entry and the manifest (the features are invalid, e.g. projected
        by a PCA learned again)."""
        self.manifest.reset()
        for entry in self.dir.glob("*.npz"):
            entry.unlink(missing_ok=True)
        shutil.rmtree(self.dir / MATRIX_DIR, ignore_errors=True)

    def write_error(self, name: str, reason: str, source: Path | None = None, retry: bool = False) -> None:
        """Records that image `name` could not be used, so later runs skip it until the
        source file changes; with `retry` (a failure that may pass: an I/O error, a
        missing file, a crash while computing) the next run tries again."""
        arrays = {ERROR_KEY: np.array(reason)}
        if retry:
            arrays[RETRY_KEY] = np.array(True)
        self.write(name, arrays, source)

    def read(self, name: str, source: Path | None = None, keys=None) -> dict[str, np.ndarray]:
        """Reads the feature arrays of image `name` (an entry written by `write_error`
        holds only "error"), or only those named in `keys` (and "error" where present):
        a warm run that needs a few small arrays of each entry skips the rest. `keys`
        naming `SOURCE_KEY` also gets the stamp of the source file the entry was made from.

        Raises:
            KeyError: no feature file for `name`.
            ValueError: the file is corrupt, stamped with another conf hash, or (when
                `source` is given) made from a different version of the source file.
        """
        path = self.path(name)
        if not path.exists():
            raise KeyError(name)
        arrays = load_npz(path, None if keys is None else {*keys, HASH_KEY, SOURCE_KEY, RETRY_KEY, ERROR_KEY})
        stamp = arrays.pop(HASH_KEY, None)
        if stamp is None or str(stamp) != self.key:
            raise ValueError(f"{path}: conf hash {stamp} differs from {self.key}")
        arrays.pop(RETRY_KEY, None)
        made_from = arrays.get(SOURCE_KEY) if keys is not None and SOURCE_KEY in keys else arrays.pop(SOURCE_KEY, None)
        if source is not None and (made_from is None or str(made_from) != source_stamp(source)):
            raise ValueError(f"{path}: source file {source} changed since it was cached")
        return arrays

    def read_or_none(self, name: str, source: Path | None = None, keys=None) -> dict[str, np.ndarray] | None:
        """Like `read`, but a corrupt or stale entry is logged, deleted and reported as missing."""
        try:
            return self.read(name, source, keys)
        except KeyError:
            return None
        except ValueError as e:
            logger.warning("recomputing cache entry: %s", e)
            self.path(name).unlink(missing_ok=True)
            return None
