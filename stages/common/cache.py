"""Per-image feature files keyed by image name, tied to the conf hash that produced them.

Layout: ``<cache_root>/<stage>/<conf name>-<conf hash>/<encoded image name>.npz`` plus a
``conf.json`` holding the effective conf. One file per image makes runs resumable (finished
images are skipped), crash-safe (each file is written to a temp file and renamed) and safe
for two concurrent runs (each writes its own temp files; a rename is atomic).
"""

import contextlib
import fcntl
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path
from urllib.parse import quote, unquote

import numpy as np

from . import logger

HASH_KEY = "__conf_hash__"
SOURCE_KEY = "__source__"
ERROR_KEY = "error"
RETRY_KEY = "__retry__"
_MAX_FILE_STEM = 200


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


def load_npz(path: Path) -> dict[str, np.ndarray]:
    """Reads every array of an .npz into memory.

    Raises:
        ValueError: the file is not a readable .npz (truncated, corrupt, or not a zip).
    """
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
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
    """Feature files of one stage and one conf, keyed by image name.

    Attributes:
        key: the conf hash; conf: the effective conf; dir: the store folder.

    Args:
        root: the cache root, e.g. ``cache/``.
        stage: stage folder name, e.g. ``"global"``.
        conf: the effective conf (JSON-serialisable); stored as ``conf.json``.
        key: the conf hash (plus anything else the features depend on).

    Raises:
        CacheMismatchError: the folder exists with a ``conf.json`` whose hash differs.
    """

    def __init__(self, root: Path, stage: str, conf: dict, key: str):
        self.key, self.conf = key, conf
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

    @classmethod
    def open(cls, folder: Path) -> "FeatureStore":
        """Opens an existing store folder (one that holds its ``conf.json``)."""
        folder = Path(folder)
        stored = json.loads((folder / "conf.json").read_text())
        return cls(folder.parent.parent, folder.parent.name, stored["conf"], stored["hash"])

    def path(self, name: str) -> Path:
        return self.dir / f"{encode_name(name)}.npz"

    def __contains__(self, name: str) -> bool:
        return self.path(name).exists()

    def names(self) -> set[str]:
        """Names of all images with a feature file in this store."""
        return {decode_name(p.stem) for p in self.dir.glob("*.npz") if not p.name.startswith(".")}

    def is_current(self, name: str, source: Path | None = None) -> bool:
        """True when `name` has an intact entry made from this version of `source` and not
        marked for retry. Every array is read, so the zip CRC-32 of each is checked: a
        damaged entry counts as missing (and is recomputed) instead of being trusted."""
        path = self.path(name)
        if not path.exists():
            return False
        try:
            arrays = load_npz(path)
        except ValueError as e:
            logger.warning("recomputing cache entry: %s", e)
            return False
        if HASH_KEY not in arrays or str(arrays[HASH_KEY]) != self.key or RETRY_KEY in arrays:
            return False
        return source is None or (SOURCE_KEY in arrays and str(arrays[SOURCE_KEY]) == source_stamp(source))

    def missing(self, images: dict[str, Path], overwrite: bool = False) -> list[str]:
        """Names among `images` ({name: source path}) whose entry is absent, corrupt or
        older than its source file; all of them if `overwrite`."""
        if overwrite:
            return list(images)
        present = self.names()
        return [n for n, src in images.items() if n not in present or not self.is_current(n, src)]

    def write(self, name: str, arrays: dict[str, np.ndarray], source: Path | None = None) -> None:
        """Atomically writes the feature arrays of image `name`, stamped with the conf hash
        and, when given, the size and mtime of its source image file."""
        stamps = {HASH_KEY: np.array(self.key)}
        if source is not None:
            stamps[SOURCE_KEY] = np.array(source_stamp(source))
        atomic_save_npz(self.path(name), {**arrays, **stamps})

    def write_error(self, name: str, reason: str, source: Path | None = None, retry: bool = False) -> None:
        """Records that image `name` could not be used, so later runs skip it until the
        source file changes; with `retry` (a failure that may pass: an I/O error, a
        missing file, a crash while computing) the next run tries again."""
        arrays = {ERROR_KEY: np.array(reason)}
        if retry:
            arrays[RETRY_KEY] = np.array(True)
        self.write(name, arrays, source)

    def read(self, name: str, source: Path | None = None) -> dict[str, np.ndarray]:
        """Reads the feature arrays of image `name` (an entry written by `write_error`
        holds only "error").

        Raises:
            KeyError: no feature file for `name`.
            ValueError: the file is corrupt, stamped with another conf hash, or (when
                `source` is given) made from a different version of the source file.
        """
        path = self.path(name)
        if not path.exists():
            raise KeyError(name)
        arrays = load_npz(path)
        stamp = arrays.pop(HASH_KEY, None)
        if stamp is None or str(stamp) != self.key:
            raise ValueError(f"{path}: conf hash {stamp} differs from {self.key}")
        arrays.pop(RETRY_KEY, None)
        made_from = arrays.pop(SOURCE_KEY, None)
        if source is not None and (made_from is None or str(made_from) != source_stamp(source)):
            raise ValueError(f"{path}: source file {source} changed since it was cached")
        return arrays

    def read_or_none(self, name: str, source: Path | None = None) -> dict[str, np.ndarray] | None:
        """Like `read`, but a corrupt or stale entry is logged, deleted and reported as missing."""
        try:
            return self.read(name, source)
        except KeyError:
            return None
        except ValueError as e:
            logger.warning("recomputing cache entry: %s", e)
            self.path(name).unlink(missing_ok=True)
            return None
