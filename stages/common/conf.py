"""Named configurations: presets merged onto defaults, and a stable hash for cache keys."""

import argparse
import copy
import hashlib
import json
from pathlib import Path
from typing import Any


def merge(default: dict, override: dict | None) -> dict:
    """Returns a deep copy of `default` with `override` merged in, recursively for dicts.

    Raises:
        KeyError: `override` names a key that `default` does not have (a typo would
            otherwise be silently ignored).
    """
    out = copy.deepcopy(default)
    for key, value in (override or {}).items():
        if key not in out:
            raise KeyError(f"unknown conf key {key!r}; known: {sorted(out)}")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve(default: dict, presets: dict[str, dict], name: str, override: dict | None = None) -> dict:
    """Merges preset `name` and then `override` onto `default`.

    Raises:
        ValueError: `name` is not a preset.
    """
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
    conf = merge(merge(default, presets[name]), override)
    conf["name"] = name
    return conf


def conf_hash(*parts: Any) -> str:
    """A short, stable hash of JSON-serialisable parts (confs, file digests), for cache keys."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" -> (I, N): this process takes every N-th item starting at item I.

    Raises:
        ValueError: not two integers with 0 <= I < N.
    """
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError as e:
        raise ValueError(f"shard must look like I/N, e.g. 0/4; got {text!r}") from e
    if not 0 <= i < n:
        raise ValueError(f"shard I/N needs 0 <= I < N; got {text!r}")
    return i, n


def stage_parser(doc: str, confs: dict, default: str) -> argparse.ArgumentParser:
    """The command-line parser every stage module shares (hloc style): a named conf, the
    cache folder, --overwrite and --shard; the stage adds its own inputs.

    Args:
        doc: the stage module's docstring; its first line is the description.
        confs: the stage's named confs.
        default: the conf name used without --conf.
    """
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="cache folder")
    parser.add_argument("--conf", default=default, choices=sorted(confs), help="named conf")
    parser.add_argument("--overwrite", action="store_true", help="recompute cached entries")
    parser.add_argument("--shard", type=parse_shard, default=(0, 1),
                        help="I/N: compute only every N-th item from item I, so N processes share the work")
    return parser
