"""The hand-offs between stages: the shortlist (pairs) file and the ranking file.

- Shortlist ``pairs-*.txt``: one "query<TAB>reference" line per pair, best first per query
  (hloc's ``pairs-query-netvlad50.txt``), so a user can `head` it. Stage 1 writes it, stages 2
  and 3 read it.
- Ranking ``*_ranking.npz``: the full order of the references for every query and the score
  at each position. Stage 1 writes the global one, the merge of stage 3 the reranked one.
"""

import re
from pathlib import Path

import numpy as np

from .cache import atomic_save_npz, atomic_write_bytes


def _escape(name: str) -> str:
    return name.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(text: str) -> str:
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
                 scores: np.ndarray) -> Path:
    """Writes a ranking file atomically.

    Args:
        path: the ``.npz`` to write.
        query_names: [Q] names; ref_names: [R] names.
        order: int32 [Q, R] reference indices, best first; every row a permutation of range(R).
        scores: float32 [Q, R] the score at each position of `order` (-inf where none).

    Returns:
        `path`.
    """
    atomic_save_npz(Path(path), {
        "query_names": np.array(query_names, dtype=str), "ref_names": np.array(ref_names, dtype=str),
        "order": order, "scores": scores})
    return Path(path)


def read_ranking(path: Path) -> dict[str, np.ndarray]:
    """Reads a ranking file (`save_ranking`): query_names [Q], ref_names [R], order int32
    [Q, R], scores float32 [Q, R]."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def order_to_names(order: np.ndarray, query_names: list[str], ref_names: list[str]) -> dict[str, list[str]]:
    """int [Q, R] reference indices (best first) -> {query name: [reference names]}."""
    refs = np.asarray(ref_names, dtype=object)
    return {q: refs[order[i]].tolist() for i, q in enumerate(query_names)}
