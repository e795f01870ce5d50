"""Command lines of ``run_pipeline.py index`` and ``run_pipeline.py query`` (`pipeline.index`)."""

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from stages.common import logger, setup_logging
from stages.common.cache import CacheMismatchError
from stages.common.dataset import LayoutError, load_dataset

from . import index as run_index
from .engines import LocalEngine


def index_main(argv) -> int:
    """``run_pipeline.py index --data DATA [--output DIR] [--cache C] [the run's options]``."""
    from .cli import build_parser, config_from_args, unwritable

    parser = build_parser()
    parser.prog = "run_pipeline.py index"
    parser.description = ("Builds and saves the global index of DATA's references (faiss index, reference names and "
                          "paths, the conf with the whitening and DBA state, the verification calibration, the cache "
                          "of their features) into --output, for `run_pipeline.py query --index DIR IMAGE...`. Takes "
                          "the options of a pipeline run (the same ones give the batch run's rankings); --stages, "
                          "--report, --engine do not apply.")
    parser.add_argument("--index-kind", choices=["auto", "flat", "pca"], default="auto",
                        help="faiss index: flat (exact) below 100,000 references, pca above (a 128-d pre-search "
                             "whose 20 x k candidates are re-scored exactly; README, 'Index and query')")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data is required")
    setup_logging(logging.INFO)
    rc = config_from_args(args)
    for flag, folder in (("--cache", args.cache), ("--output", args.output)):
        if folder is None:
            continue
        reason = unwritable(Path(folder))
        if reason:
            logger.error("%s %s: cannot write there (%s)", flag, folder, reason)
            return 2
    try:
        dataset = load_dataset(args.data)
    except LayoutError as e:
        logger.error("%s", e)
        return 2
    out_dir = args.output or Path(__file__).resolve().parent.parent / "runs" / f"{Path(args.data).resolve().name}-index"
    start = time.perf_counter()
    try:
        with LocalEngine(rc.workers) as engine:
            path = run_index.build(dataset, out_dir, rc, engine,
                                   force_kind=None if args.index_kind == "auto" else args.index_kind)
    except (CacheMismatchError, ValueError) as e:
        logger.error("%s", e)
        return 2
    meta = json.loads(path.read_text())
    print(f"\nIndexed {len(meta['indexed'])} references ({meta['index']['factory']}; {len(meta['unreadable'])} "
          f"unreadable) in {time.perf_counter() - start:.1f} s -> {out_dir}")
    return 0


def query_main(argv) -> int:
    """``run_pipeline.py query --index DIR IMAGE... [--output DIR] [--cache C]``."""
    parser = argparse.ArgumentParser(
        prog="run_pipeline.py query",
        description="Ranks new photos against an index of `run_pipeline.py index` (global descriptor, faiss, local "
                    "features and verification of the top-k, the batch run's merge) without listing the reference "
                    "folder; writes rankings.json ({photo: [references, best first]}) into --output and prints each "
                    "photo's top references. A photo is named by its file stem.")
    parser.add_argument("--index", type=Path, required=True, help="index folder (`run_pipeline.py index --output`)")
    parser.add_argument("images", type=Path, nargs="+", metavar="IMAGE", help="photos to rank")
    parser.add_argument("--output", type=Path, default=None,
                        help="folder for rankings.json and the shortlists (default: INDEX/queries)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="cache folder (default: the one the index was built with)")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes for verification")
    parser.add_argument("--top", type=int, default=10, help="references printed per photo")
    parser.add_argument("--depth", type=int, default=None,
                        help="pca index only: references listed per photo (default 1000); a flat index lists all")
    args = parser.parse_args(argv)
    setup_logging(logging.INFO)
    try:
        loaded = run_index.load(args.index, args.cache)
        loaded.rc.workers = args.workers
        run_index.query_names(args.images)  # a missing or non-image file: one line, before any work
    except (run_index.IndexFolderError, run_index.QueryImageError) as e:
        logger.error("%s", e)
        return 2
    from .cli import unwritable

    out_dir = args.output or args.index / "queries"
    reason = unwritable(out_dir)
    if reason:
        logger.error("--output %s: cannot write there (%s)", out_dir, reason)
        return 2
    start = time.perf_counter()
    try:
        with LocalEngine(args.workers) as engine:
            result = run_index.query(loaded, args.images, out_dir, engine, args.depth)
    except (run_index.IndexFolderError, run_index.QueryImageError, CacheMismatchError) as e:
        logger.error("%s", e)
        return 2
    seconds = time.perf_counter() - start
    for name, refs in result["rankings"].items():
        print(f"{name}: " + " ".join(refs[:args.top]))
    for name, reason in result["skipped"].items():
        print(f"{name}: not ranked ({reason})", file=sys.stderr)
    if result["rankings_path"] is None:
        logger.error("no query image could be read: nothing was ranked")
        return 1
    print(f"\nRanked {len(result['rankings'])} photo(s) in {seconds:.1f} s -> {result['rankings_path']}")
    return 1 if result["skipped"] else 0
