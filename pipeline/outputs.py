"""The files a run leaves in its output folder, in the hackathon's formats."""

from pathlib import Path

import numpy as np

from .cache import atomic_write_json


def order_to_names(order: np.ndarray, query_names: list[str], ref_names: list[str]) -> dict[str, list[str]]:
    """int [Q, R] reference indices (best first) -> {query name: reference names}."""
    refs = np.asarray(ref_names, dtype=object)
    return {q: refs[order[i]].tolist() for i, q in enumerate(query_names)}


def nsml_results(rankings: dict[str, list[str]]) -> list[tuple[int, tuple[str, list[str]]]]:
    """The hackathon ``infer`` return value: [(i, (query name, [reference names]))]."""
    return list(enumerate(rankings.items()))


def write_rankings(out_dir: Path, rankings: dict[str, list[str]]) -> None:
    """Writes ``rankings.json`` ({query: [every reference, best first]}) and
    ``nsml_results.json`` ([[i, [query, [references]]], ...]), each atomically."""
    atomic_write_json(Path(out_dir) / "rankings.json", rankings)
    atomic_write_json(Path(out_dir) / "nsml_results.json", nsml_results(rankings))
