"""The hand-offs between stages: the shortlist (pairs) file and the ranking file.

- Shortlist ``pairs-*.txt``: one "query<TAB>reference" line per pair, best first per query
  (hloc's ``pairs-query-netvlad50.txt``), so a user can `head` it. Stage 1 writes it, stages 2
  and 3 read it.
- Ranking ``global_ranking.npz`` (stage 1): each query's first E references (E =
  ``expand_to``, all that stages 2 and 3 read) with their scores, and the descriptors that
  regenerate the rest of every ranking a batch at a time (`RankingFile`), so that memory
  is bounded by the batch, not by queries x references.
"""

import re
from pathlib import Path

import numpy as np

from .cache import atomic_save_npz, atomic_write_bytes


def _escape(name: str) -> str:
    return name.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(text: str) -> str:
    if "\\" not in text:  # nearly every name: 10x faster than the regex
        return text
    return re.sub(r"\\(.)", lambda m: _UNESCAPE.get(m.group(1), m.group(1)), text)


_UNESCAPE = {"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}


def write_pairs(path: Path, pairs) -> None:
    """Writes (query, reference) pairs as "query<TAB>reference" lines, atomically.

    A tab, newline, carriage return or backslash inside a name is written as \\t, \\n,
    \\r or \\\\, so every name survives `read_pairs`; names that are not valid UTF-8
    (surrogate escapes) are written as their original bytes.
    """
    lines = [f"{_escape(q)}\t{_escape(r)}" for q, r in pairs]
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape") if lines else b"")


def read_pairs(path: Path) -> dict[str, list[str]]:
    """Reads a shortlist file (`write_pairs`) into {query: [references, best first]}.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a line is not "query<TAB>reference"; the message names the file and line.
    """
    pairs: dict[str, list[str]] = {}
    for number, line in enumerate(Path(path).read_bytes().decode("utf-8", "surrogateescape").split("\n"), 1):
        line = line.removesuffix("\r")  # a file saved with CRLF line ends; a CR in a name is escaped
        if line:
            fields = line.split("\t")
            if len(fields) != 2:
                raise ValueError(f"{path}:{number}: expected query<TAB>reference, got {line[:80]!r}")
            pairs.setdefault(_unescape(fields[0]), []).append(_unescape(fields[1]))
    return pairs


def save_ranking(path: Path, query_names: list[str], ref_names: list[str], order: np.ndarray,
                 scores: np.ndarray, descriptors: dict[str, np.ndarray] | None = None) -> Path:
    """Writes a ranking file atomically: each query's first E positions, and, when E < R,
    the descriptors that regenerate the rest (`RankingFile.full`).

    Args:
        path: the ``.npz`` to write.
        query_names: [Q] names; ref_names: [R] names.
        order: int32 [Q, E] reference indices, best first (E <= R; E = R: every row a
            permutation of range(R)). A readable query's row holds its best readable
            references, then unreadable ones by index; an unreadable query's is range(E).
        scores: float32 [Q, E] the score at each position of `order` (-inf where none).
        descriptors: needed when E < R: "query_descriptors" float32 [Q', G, D] and
            "query_rows" int [Q'] (the readable queries), "ref_descriptors" float32 [R', D]
            and "ref_columns" int [R'] increasing (the readable references), as ranked.

    Returns:
        `path`.

    Raises:
        ValueError: E < R without `descriptors`.
    """
    order = np.asarray(order, np.int32)
    if order.ndim == 2 and order.shape[1] < len(ref_names) and not descriptors:
        raise ValueError(f"{path}: a ranking of {order.shape[1]} of {len(ref_names)} references needs the "
                         "descriptors to regenerate the rest")
    extra = {k: descriptors[k] for k in RANKING_DESCRIPTOR_KEYS} if descriptors and order.shape[1] < len(ref_names) \
        else {}
    atomic_save_npz(Path(path), {
        "query_names": np.array(query_names, dtype=str), "ref_names": np.array(ref_names, dtype=str),
        "order": order, "scores": scores, **extra})
    return Path(path)


def read_ranking(path: Path) -> dict[str, np.ndarray]:
    """Reads the first positions of a ranking file (`save_ranking`): query_names [Q],
    ref_names [R], order int32 [Q, E], scores float32 [Q, E] (E = R for a full ranking;
    `RankingFile` regenerates the rest)."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in ("query_names", "ref_names", "order", "scores")}


def order_to_names(order: np.ndarray, query_names: list[str], ref_names: list[str]) -> dict[str, list[str]]:
    """int [Q, R] reference indices (best first) -> {query name: [reference names]}."""
    refs = np.asarray(ref_names, dtype=object)
    return {q: refs[order[i]].tolist() for i, q in enumerate(query_names)}


# --- the global ranking kept to a depth, the rest regenerated on demand ------------------------
#
# At the hackathon's size (18,027 queries x 36,748 references) a full ranking is 4.9 GiB of
# order + scores. Stage 1 keeps each query's first `depth` references (all that stages 2 and 3
# read) and the descriptors it ranked with; `RankingFile.full` regenerates the rest of any
# query's ranking from them, a batch of queries at a time.

RANKING_DESCRIPTOR_KEYS = ("query_descriptors", "query_rows", "ref_descriptors", "ref_columns")


def similarities(block: np.ndarray, ref_t: np.ndarray) -> np.ndarray:
    """float32 [b, G, D] query descriptors, [D, R'] references -> float32 [b, R']: each
    reference's best inner product over the query's G descriptors, by one matrix product
    (-inf where it is NaN)."""
    b, g, d = block.shape
    sims = np.ascontiguousarray(block.reshape(b * g, d), np.float32) @ ref_t
    sims[np.isnan(sims)] = -np.inf
    return sims.reshape(b, g, -1).max(axis=1)


def complete_orders(top: np.ndarray, sims: np.ndarray, ref_columns: np.ndarray,
                    n_refs: int) -> tuple[np.ndarray, np.ndarray]:
    """Appends the rest of the ranking to the first positions of readable queries.

    The rest is ordered as a full stable ranking orders it: the readable references not in
    `top` by descending `sims` (ties by index), then the unreadable ones not in `top`, by
    index.

    Args:
        top: int [b, E] reference indices, best first, the first E positions of each
            ranking (readable references by score, then unreadable ones by index).
        sims: float32 [b, R'] the score of each readable reference (column j: reference
            `ref_columns[j]`).
        ref_columns: int [R'] increasing indices of the readable references.
        n_refs: R, all references.

    Returns:
        (int32 [b, R] reference indices best first, each row a permutation of range(R)
        beginning with the row of `top`; float32 [b, R] the score at each position: `sims`
        below E, -inf for unreadable references, and 0 at the first E positions, which the
        caller fills from its own scores).
    """
    b, e = top.shape
    r_ok = len(ref_columns)
    column = np.full(n_refs, -1, np.int64)
    column[ref_columns] = np.arange(r_ok)
    order = np.empty((b, n_refs), np.int32)
    scores = np.full((b, n_refs), -np.inf, np.float32)
    order[:, :e] = top
    scores[:, :e] = 0
    n_top_ok = min(e, r_ok)  # a readable query's top holds its best min(E, R') readable references
    if r_ok > n_top_ok:
        in_top = np.zeros((b, r_ok), bool)
        top_cols = column[top]
        rows = np.broadcast_to(np.arange(b)[:, None], top.shape)
        ok = top_cols >= 0
        in_top[rows[ok], top_cols[ok]] = True
        rest = np.argsort(-sims, axis=1, kind="stable")
        keep = ~np.take_along_axis(in_top, rest, axis=1)
        rest = rest[keep].reshape(b, r_ok - n_top_ok)
        order[:, e:e + rest.shape[1]] = ref_columns[rest]
        scores[:, e:e + rest.shape[1]] = np.take_along_axis(sims, rest, axis=1)
    failed = np.setdiff1d(np.arange(n_refs), ref_columns)
    n_top_failed = e - n_top_ok
    order[:, e + r_ok - n_top_ok:] = failed[n_top_failed:]
    return order, scores


class RankingFile:
    """A ranking file (`save_ranking`) read for use: its first positions in memory, the rest
    of any query's ranking regenerated on demand (`full`).

    Attributes:
        query_names: str [Q]; ref_names: str [R].
        order: int32 [Q, E] the first E positions of each ranking; scores: float32 [Q, E].
        depth: E (R when the file holds the full ranking).
        complete: whether E == R.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        with np.load(self.path, allow_pickle=False) as f:
            self.query_names, self.ref_names = f["query_names"], f["ref_names"]
            self.order, self.scores = f["order"], f["scores"]
            have = set(f.files)
            self._desc = {k: f[k] for k in RANKING_DESCRIPTOR_KEYS if k in have}
        n_refs = len(self.ref_names)
        self.depth = self.order.shape[1] if self.order.ndim == 2 else 0
        self.complete = self.depth == n_refs
        if not self.complete and len(self._desc) != len(RANKING_DESCRIPTOR_KEYS):
            raise ValueError(f"{self.path}: a ranking of {self.depth} of {n_refs} references without the "
                             "descriptors to regenerate the rest")
        if not self.complete:
            self._row = np.full(len(self.query_names), -1, np.int64)
            self._row[self._desc["query_rows"]] = np.arange(len(self._desc["query_rows"]))
            self._ref_t = np.ascontiguousarray(self._desc["ref_descriptors"].T, np.float32)

    def __len__(self) -> int:
        return len(self.query_names)

    def full(self, rows) -> tuple[np.ndarray, np.ndarray]:
        """The full rankings of some queries.

        Args:
            rows: int [b] query indices.

        Returns:
            (int32 [b, R] reference indices best first, float32 [b, R] the score at each
            position; -inf where none exists). The first E positions are the file's; below
            them readable references follow by descending inner product of the stored
            descriptors (ties by index), unreadable ones last by index. A query without a
            descriptor gets the references in index order.
        """
        rows = np.asarray(rows, np.int64)
        if self.complete:
            return self.order[rows].astype(np.int32), self.scores[rows]
        n_refs = len(self.ref_names)
        order = np.tile(np.arange(n_refs, dtype=np.int32), (len(rows), 1))
        scores = np.full(order.shape, -np.inf, np.float32)
        described = self._row[rows] >= 0
        if described.any():
            block = self._desc["query_descriptors"][self._row[rows[described]]]
            sub_order, sub_scores = complete_orders(self.order[rows[described]],
                                                    similarities(block, self._ref_t),
                                                    self._desc["ref_columns"], n_refs)
            sub_scores[:, :self.depth] = self.scores[rows[described]]
            order[described], scores[described] = sub_order, sub_scores
        return order, scores

    def batches(self, batch: int = 128):
        """Yields (rows int [b], order int32 [b, R], scores float32 [b, R]) over all queries,
        `batch` at a time (memory about batch x R x 17 bytes)."""
        for start in range(0, len(self), batch):
            rows = np.arange(start, min(start + batch, len(self)))
            yield (rows, *self.full(rows))
