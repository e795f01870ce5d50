"""Streaming writers of the rankings files, a batch of queries at a time.

``rankings.json`` ({query: [every reference, best first]}) and ``nsml_results.json`` ([[i,
[query, [references]]], ...], the hackathon's ``infer`` return value) hold queries x
references names: 18,027 x 36,748 names are about 10 GB each, far more than the memory a
run may take. `RankingsWriter` writes them row by row, byte for byte as
``stages.common.cache.atomic_write_json`` writes the whole object (``json.dumps(obj,
indent=1, ensure_ascii=False)``, or ASCII with \\u escapes when a name is not valid UTF-8),
into a temp file renamed into place when every query is written: a run that dies leaves the
previous file (or none), never half of one.
"""

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .cache import _FILE_MODE

RANKINGS = "rankings"  # {query: [references]}
NSML = "nsml"  # [[i, [query, [references]]], ...]


def needs_ascii(names) -> bool:
    """Whether some name cannot be written as UTF-8 (a surrogate escape of an undecodable
    file name): the file is then written with \\u escapes, as `atomic_write_json` does."""
    try:
        for name in names:
            name.encode()
    except UnicodeEncodeError:
        return True
    return False


class RankingsWriter:
    """Writes one rankings file (`RANKINGS` or `NSML` layout) query by query, atomically.

    Use as a context manager: the file appears at `path` when the block ends without an
    error; on an error the temp file is removed. Queries are written in the order `add`
    receives them.

    Args:
        path: the file to write.
        ref_names: [R] reference names; rows of `add` index them.
        kind: `RANKINGS` or `NSML`.
        ascii_only: write \\u escapes for every non-ASCII character (see `needs_ascii`).
        sink: an open binary file to write to instead of `path` (no temp file, no rename;
            benchmarks pass os.devnull's).
    """

    def __init__(self, path: Path, ref_names, kind: str = RANKINGS, ascii_only: bool = False, sink=None):
        if kind not in (RANKINGS, NSML):
            raise ValueError(f"unknown rankings file layout {kind!r}; choose {RANKINGS} or {NSML}")
        self.path, self.kind, self.ascii = Path(path), kind, ascii_only
        depth = 2 if kind == RANKINGS else 4  # indent of a reference name
        self._sep = b",\n" + b" " * depth
        self._close = b"\n" + b" " * (depth - 1) + b"]"
        self._quoted = np.empty(len(ref_names), dtype=object)
        self._quoted[:] = [self._dump(r) for r in ref_names]
        self._sink, self._tmp, self._file, self._count = sink, None, None, 0

    def _dump(self, text: str) -> bytes:
        return json.dumps(text, ensure_ascii=self.ascii).encode()

    def __enter__(self):
        if self._sink is not None:
            self._file = self._sink
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".tmp-", suffix=self.path.suffix)
            self._file = os.fdopen(fd, "wb", buffering=1 << 22)
        return self

    def _names(self, order_row) -> bytes:
        if len(order_row) == 0:
            return b"[]"
        pad = self._sep[2:]
        return b"[\n" + pad + self._sep.join(self._quoted[np.asarray(order_row)].tolist()) + self._close

    def add(self, query: str, order_row) -> None:
        """Writes one query's ranking: `order_row` int [R] reference indices, best first."""
        head = b"{\n" if self.kind == RANKINGS else b"[\n"
        lead = head if self._count == 0 else b",\n"
        if self.kind == RANKINGS:
            self._file.write(lead + b" " + self._dump(query) + b": " + self._names(order_row))
        else:
            self._file.write(lead + b" [\n  " + str(self._count).encode() + b",\n  [\n   " + self._dump(query)
                             + b",\n   " + self._names(order_row) + b"\n  ]\n ]")
        self._count += 1

    def add_batch(self, queries, order: np.ndarray) -> None:
        """Writes the rankings of a batch: `queries` [b] names, `order` int [b, R]."""
        for query, row in zip(queries, order, strict=True):
            self.add(query, row)

    def __exit__(self, exc_type, exc, tb):
        if self._sink is not None:
            if exc_type is None:
                self._file.write(self._end())
            return False
        try:
            if exc_type is None:
                self._file.write(self._end())
            self._file.close()
            if exc_type is None:
                os.chmod(self._tmp, _FILE_MODE)  # mkstemp makes owner-only files
                os.replace(self._tmp, self.path)
        finally:
            Path(self._tmp).unlink(missing_ok=True)
        return False

    def _end(self) -> bytes:
        if self._count == 0:
            return b"{}" if self.kind == RANKINGS else b"[]"
        return b"\n}" if self.kind == RANKINGS else b"\n]"
