"""The files a run leaves in its output folder, in the hackathon's formats."""

from pathlib import Path

from stages.common.cache import atomic_write_json


def nsml_results(rankings: dict[str, list[str]]) -> list[tuple[int, tuple[str, list[str]]]]:
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
