"""The index of a feature store: one record per entry, so that a warm run checks its cache
by stat-ing the entry files and reading this index, without opening the entries.

Files in the store folder:

- ``manifest.json``: ``{"version": 1, "entries": {name: record}}``, replaced atomically
  (temp file + rename) under ``manifest.lock`` (`cache.exclusive_lock`).
- ``manifest.d/*.jsonl``: one journal per writer (a process's store object), one record
  per line ``{"n": name, ...}``, appended as the writer writes entries. A writer holds an
  exclusive ``flock`` on its journal while it is open; `Manifest.compact` folds into
  ``manifest.json`` every journal and deletes those no live writer holds (a killed writer's
  journal is merged by the next writer that finishes). Several processes (joblib workers,
  Ray actors on shards, two runs) each write their own journal, so no two write one file.

A record describes one entry file: "h" the conf hash it was stamped with (omitted when it is
the store's key), "s" the source stamp (`cache.source_stamp`, or absent), "r" 1 when
marked for retry, "e" the error reason of an error entry, "x" small arrays of the entry
copied as lists (the store's ``summary_keys``), and the entry file's size "z", mtime "m"
(ns) and inode "i" when the record was made, and "t" (ns, this machine's clock) when that
stat was last confirmed.

A record is trusted only while the file's (size, mtime, inode) are the recorded ones and
"t" is more than `RACY_NS` after the mtime: a file rewritten in place within the
filesystem's timestamp granularity of its last write would show the same stat (git's
"racily clean" entries), so such a recent record makes the store read the entry instead.
Damage that keeps the stat (a bad disk) is found when the entry is read: every array of an
.npz carries a CRC-32 (`cache.load_npz`).
"""

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from . import logger

MANIFEST = "manifest.json"
JOURNALS = "manifest.d"
LOCK = "manifest.lock"
VERSION = 1
RACY_NS = 2_000_000_000  # 2 s: above the timestamp granularity of common filesystems (FAT: 2 s)


def file_stat(path: Path) -> tuple[int, int, int] | None:
    """(size in bytes, mtime in ns, inode) of `path`, or None when it cannot be stat-ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def trusted(record: dict | None, stat: tuple[int, int, int] | None) -> bool:
    """Whether `record` still describes the file whose `file_stat` is `stat` (see the module
    docstring: same stat, confirmed more than `RACY_NS` after the file's mtime)."""
    return (record is not None and stat is not None and (record.get("z"), record.get("m"), record.get("i")) == stat
            and record.get("t", 0) - stat[1] > RACY_NS)


def _dumps(obj) -> bytes:
    # ASCII with \u escapes: names holding undecodable bytes (surrogate escapes) survive
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode()


def _read_journal(path: Path) -> list[dict]:
    """The records of one journal; a torn last line (a writer killed mid-append) is skipped."""
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("n"), str):
                    out.append(record)
    except OSError:
        pass  # merged and deleted meanwhile: its records are in manifest.json now
    return out


def _apply(entries: dict[str, dict], records) -> None:
    """Folds journal records into `entries`: per name, the one confirmed last wins."""
    for record in records:
        record = dict(record)
        name = record.pop("n")
        old = entries.get(name)
        if old is None or record.get("t", 0) >= old.get("t", 0):
            entries[name] = record


class Manifest:
    """The index of one store folder (see the module docstring).

    Args:
        folder: the store folder.
    """

    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self._journal = None
        self._journal_pid = None
        self._mutex = threading.Lock()
        self._base = (None, {})  # (stat of manifest.json, its entries) last parsed by `load`

    @property
    def exists(self) -> bool:
        return (self.dir / MANIFEST).exists()

    def _load_base(self) -> dict[str, dict]:
        path = self.dir / MANIFEST
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            logger.warning("%s: unreadable cache index (%s); the entries are checked by reading them", path, e)
            return {}
        if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("entries"), dict):
            return {}
        return data["entries"]

    def _journal_paths(self) -> list[Path]:
        folder = self.dir / JOURNALS
        return sorted(folder.glob("*.jsonl")) if folder.is_dir() else []

    def load(self) -> dict[str, dict]:
        """{name: record}: ``manifest.json`` with every journal applied. Journals are read
        first: one that a concurrent `compact` deletes meanwhile is in the manifest read after."""
        journals = [r for p in self._journal_paths() for r in _read_journal(p)]
        stat = file_stat(self.dir / MANIFEST)
        # parsed again when replaced, and while its stat is too recent to tell a replacement
        if stat is None or stat != self._base[0] or time.time_ns() - stat[1] <= RACY_NS:
            self._base = (stat, self._load_base())
        entries = dict(self._base[1])
        _apply(entries, journals)
        return entries

    def append(self, name: str, record: dict) -> None:
        """Adds `record` for entry `name` to this writer's journal (opened on first use)."""
        line = _dumps({"n": name, **record}) + b"\n"
        with self._mutex:
            f = self._open_journal()
            f.write(line)
            f.flush()

    def _open_journal(self):
        if self._journal is not None and self._journal_pid == os.getpid():
            return self._journal
        self._journal = None  # a forked child never writes into its parent's journal
        folder = self.dir / JOURNALS
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        # locked under a temp name, then renamed: `compact` never sees it unlocked
        tmp = folder / f".tmp-{stem}"
        f = open(tmp, "ab")
        fcntl.flock(f, fcntl.LOCK_EX)
        os.replace(tmp, folder / f"{stem}.jsonl")
        self._journal, self._journal_pid = f, os.getpid()
        return f

    def close(self) -> None:
        """Closes this writer's journal (releasing its lock); `compact` then merges it."""
        with self._mutex:
            if self._journal is not None and self._journal_pid == os.getpid():
                self._journal.close()
            self._journal = None

    def compact(self) -> None:
        """Folds the journals into ``manifest.json`` and deletes those no live writer holds.

        Under ``manifest.lock``. Of the records of one name from several writers, the one
        whose stat is the file's wins (else the one confirmed last: a reader that finds the
        stat changed reads the entry). Records whose stat is confirmed now get "t" = now: the
        entries written more than `RACY_NS` ago become trusted. A failure to write (a
        read-only cache) is logged: the journals stay and are merged later.
        """
        from .cache import exclusive_lock

        self.close()
        try:
            with exclusive_lock(self.dir / LOCK), contextlib.ExitStack() as held:
                entries = self._load_base()
                done, changed, rivals = [], False, {}
                for path in self._journal_paths():
                    try:
                        f = held.enter_context(open(path, "rb"))
                    except OSError:
                        continue
                    try:
                        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        done.append(path)  # its writer has closed it (or died)
                    except OSError:
                        pass  # a live writer: its records so far are merged, the file stays
                    records = _read_journal(path)
                    for record in records:
                        if record["n"] in entries:
                            rivals.setdefault(record["n"], [entries[record["n"]]])
                        rivals.get(record["n"], []).append({k: v for k, v in record.items() if k != "n"})
                    _apply(entries, records)
                    changed |= bool(records) or path in done
                for name, records in rivals.items():
                    # writers racing on one name: the record that describes the file on disk wins
                    stat = file_stat(self._entry_path(name))
                    entries[name] = next((r for r in sorted(records, key=lambda r: -r.get("t", 0))
                                          if (r.get("z"), r.get("m"), r.get("i")) == stat), entries[name])
                now = time.time_ns()
                for name, record in entries.items():
                    if record.get("t", 0) - record.get("m", 0) <= RACY_NS and now - record.get("m", 0) > RACY_NS:
                        if file_stat(self._entry_path(name)) == (record.get("z"), record.get("m"), record.get("i")):
                            record["t"] = now
                            changed = True
                if not changed:
                    return  # a warm run writes nothing
                from .cache import atomic_write_bytes

                atomic_write_bytes(self.dir / MANIFEST, _dumps({"version": VERSION, "entries": entries}))
                for path in done:
                    path.unlink(missing_ok=True)
        except OSError as e:
            logger.warning("%s: cache index not updated (%s)", self.dir / MANIFEST, e)

    def _entry_path(self, name: str) -> Path:
        from .cache import encode_name

        return self.dir / f"{encode_name(name)}.npz"

    def reset(self) -> None:
        """Deletes the index and its journals (the store was cleared)."""
        self.close()
        (self.dir / MANIFEST).unlink(missing_ok=True)
        for path in self._journal_paths():
            path.unlink(missing_ok=True)
