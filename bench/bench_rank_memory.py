"""Peak memory of the global ranking and the outputs at the hackathon's size (issue 14):
18,027 queries x 36,748 references, synthetic whitened descriptors, d = 512.

Usage:
    python bench/bench_rank_memory.py                       # full size, files to a temp folder
    python bench/bench_rank_memory.py --sink null           # the same serialisation, bytes to /dev/null
    python bench/bench_rank_memory.py --queries 2000 --refs 4000 --keep-files   # small, keeps the output

A child process runs what `pipeline.run.run` runs after the descriptors are read, with the
pipeline's defaults: 7 region descriptors per query, DBA (k = 20) over the references, the
shortlist of the first 400 positions (`stages.global_embed.rank.shortlist_globally`:
faiss IndexFlatIP, 800 neighbours per query region), ``global_ranking.npz``, the
``pairs-global-top100.txt`` shortlist and ``reference_descriptors.npz``
(`rank.write_ranking`), then every query's full ranking regenerated a batch at a time and
streamed into ``rankings.json`` and ``nsml_results.json`` with the global metrics
(`pipeline.outputs.write_streamed`; each query has one relevant reference, the one its
descriptors were drawn around). The parent samples the child's RSS (phases: "shortlist",
"outputs") and reads its peak from wait4. Each file is about 10 GB at full size: check
`df -h` of `--out`'s filesystem, or use `--sink null` (the bytes are produced, then dropped).
The reranking merge (`stages.rerank.merge.Merger`) is not part of it: it adds [batch, R]
arrays per batch, no Q x R state.
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import fmt, header, peak_rss_mib, run_monitored, save_results, table  # noqa: E402

TARGET_GIB = 4.0
REGIONS = 7  # len(stages.global_embed.extract.default_conf["regions"])


def synthetic(n_queries: int, n_refs: int, dim: int, regions: int, seed: int = 0):
    """Unit-norm float32 reference descriptors [R, D] and query region descriptors
    [Q, G, D], each query drawn around one reference (its ground truth)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    refs = rng.standard_normal((n_refs, dim), dtype=np.float32)
    refs /= np.linalg.norm(refs, axis=1, keepdims=True)
    truth = rng.integers(0, n_refs, n_queries)
    queries = np.empty((n_queries, regions, dim), np.float32)
    for start in range(0, n_queries, 1024):  # in blocks: no [Q, G, D] float64 temporary
        t = truth[start:start + 1024]
        block = refs[t][:, None] + 1.2 * rng.standard_normal((len(t), regions, dim), dtype=np.float32) / np.sqrt(dim)
        queries[start:start + 1024] = block / np.linalg.norm(block, axis=2, keepdims=True)
    return refs, queries, truth


def child(args) -> None:
    import numpy as np

    from pipeline.outputs import write_streamed
    from pipeline.run import stage_batches
    from stages.common.cache import atomic_save_npz
    from stages.common.shortlist import RankingFile
    from stages.global_embed import expansion, rank

    out = Path(args.out)
    times = {}
    start = time.perf_counter()
    refs, queries, truth = synthetic(args.queries, args.refs, args.dim, args.regions)
    query_names = [f"query_{i:06d}.jpg" for i in range(args.queries)]
    ref_names = [f"reference_{j:06d}.jpg" for j in range(args.refs)]
    # as `load_from_store` hands them to the ranking: one small dict per image
    features = {n: {"descriptor": refs[j]} for j, n in enumerate(ref_names)}
    features.update({n: {"descriptor": queries[i, 0], "region_descriptors": queries[i]}
                     for i, n in enumerate(query_names)})
    ground_truth = {query_names[i]: {ref_names[j]} for i, j in enumerate(truth)}
    times["synthetic_s"] = time.perf_counter() - start

    print("PHASE shortlist", file=sys.stderr, flush=True)
    start = time.perf_counter()
    short = rank.shortlist_globally(query_names, ref_names, features, None, True, dict(expansion.default_conf),
                                    args.keep)
    ref_desc = short.pop("ranked_refs")
    ranking_path, _ = rank.write_ranking(out, query_names, ref_names, short.pop("order"), short.pop("scores"), 100,
                                         set(), short)
    atomic_save_npz(out / rank.REFERENCE_DESCRIPTORS, {"ref_names": np.array(ref_names, dtype=str),
                                                       "descriptors": ref_desc.astype(np.float16)})
    del short, ref_desc, features, refs, queries
    times["shortlist_s"] = time.perf_counter() - start

    print("PHASE outputs", file=sys.stderr, flush=True)
    start = time.perf_counter()
    ranking = RankingFile(ranking_path)
    sink = open("/dev/null", "wb") if args.sink == "null" else None  # noqa: SIM115
    try:
        streamed = write_streamed(out, query_names, ref_names, stage_batches(ranking), ("global",), ground_truth,
                                  keep=False, sink=sink)
    finally:
        if sink is not None:
            sink.close()
    times["outputs_s"] = time.perf_counter() - start
    sizes = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    print(json.dumps({"times": times, "metrics": streamed["metrics"]["global"], "sizes": sizes,
                      "child_peak_rss_mib": peak_rss_mib()}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=18027)
    parser.add_argument("--refs", type=int, default=36748)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--regions", type=int, default=REGIONS, help="descriptors per query")
    parser.add_argument("--keep", type=int, default=400, help="positions kept per query (the pipeline's expand_to)")
    parser.add_argument("--sink", choices=("file", "null"), default="file",
                        help="file: rankings.json and nsml_results.json written to --out; null: serialised, "
                             "then written to /dev/null")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temp folder, removed)")
    parser.add_argument("--keep-files", action="store_true", help="keep the output folder")
    parser.add_argument("--results", type=Path, default=None, help="JSON file of measured numbers")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args)
        return 0
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-rank-memory-"))
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--out", str(out)]
    for flag in ("queries", "refs", "dim", "regions", "keep", "sink"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    try:
        result = run_monitored(cmd, markers={"shortlist": "", "outputs": "PHASE outputs"})
        if result["returncode"] != 0:
            print(result["stderr"][-4000:], file=sys.stderr)
            return 1
        numbers = json.loads(result["stdout"].strip().splitlines()[-1])
    finally:
        if not args.keep_files:
            shutil.rmtree(out, ignore_errors=True)
    peak_gib = result["max_rss_mib"] / 1024
    t, sizes = numbers["times"], numbers["sizes"]
    print(header(f"Global ranking + streamed outputs: {args.queries:,} queries x {args.refs:,} references, "
                 f"d = {args.dim}, {args.regions} regions per query"))
    rows = [["shortlist: DBA, faiss top-400, global_ranking.npz, pairs, reference_descriptors.npz",
             fmt(t["shortlist_s"], 1), fmt(result["peak_tree_rss_mib"]["shortlist"] / 1024, 2)],
            [f"outputs: full rankings regenerated, rankings.json + nsml_results.json "
             f"({'to /dev/null' if args.sink == 'null' else 'to disk'}), metrics",
             fmt(t["outputs_s"], 1), fmt(result["peak_tree_rss_mib"]["outputs"] / 1024, 2)],
            ["whole child process (peak RSS from wait4)", fmt(result["wall_s"], 1), fmt(peak_gib, 2)]]
    print(table(["phase", "wall s", "peak RSS GiB (sampled)"], rows))
    gib = 1024 ** 3
    print(f"\nTarget < {TARGET_GIB:g} GiB: {'met' if peak_gib < TARGET_GIB else 'MISSED'} ({peak_gib:.2f} GiB). "
          "Files: " + ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in sorted(sizes.items()) if v > 1 << 20)
          + f". Global mAP {numbers['metrics']['mAP']:.4f} over {numbers['metrics']['n_queries']} queries.")
    save_results(args.results, "rank_memory", {"peak_rss_gib": peak_gib, "wall_s": result["wall_s"], **t,
                                               "sizes": sizes, "queries": args.queries, "refs": args.refs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
