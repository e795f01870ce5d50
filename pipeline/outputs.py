"""The files a run leaves in its output folder, in the hackathon's formats.

``rankings.json`` and ``nsml_results.json`` hold queries x references names (about 10 GB
each at the hackathon's 18,027 x 36,748): `write_streamed` writes both, and scores every
stage, a batch of queries at a time, holding only the batch.
"""

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

from stages.common.cache import atomic_write_json
from stages.common.rankings_json import NSML, RANKINGS, RankingsWriter, needs_ascii

from .evaluate import MetricsAccumulator

# Runs of at most this many (query, reference) names keep their rankings in memory as
# {query: [references]} dicts (`run`'s return value, the report); larger ones get
# `StreamedRankings`, which regenerates a query's ranking when asked for it.
IN_MEMORY_NAMES = 20_000_000


def nsml_results(rankings: Mapping[str, list[str]]) -> list[tuple[int, tuple[str, list[str]]]]:
    """The hackathon ``infer`` return value: [(i, (query name, [reference names]))]."""
    return list(enumerate(rankings.items()))


def write_rankings(out_dir: Path, rankings: dict[str, list[str]]) -> None:
    """Writes ``rankings.json`` ({query: [every reference, best first]}) and
    ``nsml_results.json`` ([[i, [query, [references]]], ...]), each atomically."""
    atomic_write_json(Path(out_dir) / "rankings.json", rankings)
    write_nsml_results(out_dir, rankings)


def write_nsml_results(out_dir: Path, rankings: dict[str, list[str]]) -> None:
    """Writes ``nsml_results.json`` ([[i, [query, [references]]], ...]) atomically."""
    atomic_write_json(Path(out_dir) / "nsml_results.json", nsml_results(rankings))


class StreamedRankings(Mapping):
    """{query: [every reference, best first]} computed when asked for, not held.

    Args:
        query_names: [Q] names, in the order of the rankings files.
        ref_names: [R] names.
        rows_to_order: int [b] query indices -> int [b, R] their rankings (reference
            indices, best first).
        batch: queries computed together when iterating `items` or `values`.
    """

    def __init__(self, query_names, ref_names, rows_to_order: Callable[[np.ndarray], np.ndarray], batch: int = 128):
        self._queries = list(query_names)
        self._row = {q: i for i, q in enumerate(self._queries)}
        self._refs = np.asarray(list(ref_names), dtype=object)
        self._rows_to_order, self._batch = rows_to_order, batch

    def __getitem__(self, query: str) -> list[str]:
        return self._refs[self._rows_to_order(np.array([self._row[query]]))[0]].tolist()

    def __iter__(self):
        return iter(self._queries)

    def __len__(self) -> int:
        return len(self._queries)

    def items(self):
        for start in range(0, len(self._queries), self._batch):
            rows = np.arange(start, min(start + self._batch, len(self._queries)))
            for i, row in zip(rows, self._rows_to_order(rows), strict=True):
                yield self._queries[i], self._refs[row].tolist()

    def values(self):
        return (refs for _, refs in self.items())


def write_streamed(out_dir: Path, query_names: list[str], ref_names: list[str],
                   batches: Iterable[tuple[np.ndarray, dict[str, np.ndarray]]], stages: tuple[str, ...],
                   ground_truth: dict[str, set[str]] | None = None, keep: bool = False,
                   sink=None) -> dict:
    """Writes ``rankings.json`` and ``nsml_results.json`` of the last stage, and scores
    every stage, from rankings produced a batch of queries at a time.

    Both files are byte for byte what `write_rankings` writes from the whole dict, and
    appear (renamed from temp files) only once every query is written.

    Args:
        out_dir: the output folder.
        query_names: [Q] names; ref_names: [R] names.
        batches: (rows int [b] query indices, {stage: int [b, R] rankings as reference
            indices}) for each of `stages`, over every query in order.
        stages: the stages ranked, in pipeline order; the last one is written.
        ground_truth: {query: relevant references}, or None (no metrics).
        keep: also return the rankings as {stage: {query: [references]}} dicts (memory grows
            as Q x R x stages pointers).
        sink: benchmarks only: an open binary file that receives both files' bytes instead
            of the two files.

    Returns:
        {"metrics": {stage: `evaluate` metrics} (empty without ground truth), "aps":
         {stage: {query: AP}}, "first_relevant": {stage: {query: 1-based rank or None}},
         "rankings": {stage: {query: [references]}} or None without `keep`}.
    """
    out_dir = Path(out_dir)
    ascii_only = needs_ascii(list(query_names) + list(ref_names))
    ref_index = {r: j for j, r in enumerate(ref_names)}
    refs = np.asarray(list(ref_names), dtype=object)
    accumulators = {s: MetricsAccumulator(ground_truth) for s in stages} if ground_truth is not None else {}
    kept: dict[str, dict[str, list[str]]] = {s: {} for s in stages}
    with RankingsWriter(out_dir / "rankings.json", ref_names, RANKINGS, ascii_only, sink) as rankings_file, \
            RankingsWriter(out_dir / "nsml_results.json", ref_names, NSML, ascii_only, sink) as nsml_file:
        for rows, by_stage in batches:
            names = [query_names[i] for i in rows]
            rankings_file.add_batch(names, by_stage[stages[-1]])
            nsml_file.add_batch(names, by_stage[stages[-1]])
            for stage in stages:
                order = by_stage[stage]
                if stage in accumulators:
                    for q, row in zip(names, order, strict=True):
                        accumulators[stage].add_order(q, row, ref_index)
                if keep:
                    kept[stage].update({q: refs[row].tolist() for q, row in zip(names, order,
                                                                                                strict=True)})
    return {"metrics": {s: m.result() for s, m in accumulators.items()},
            "aps": {s: m.aps for s, m in accumulators.items()},
            "first_relevant": {s: m.first for s, m in accumulators.items()},
            "rankings": kept if keep else None}
