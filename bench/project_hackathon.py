"""Projection of the hackathon's phase 2 (18,027 queries, 36,748 references, mAP@1000) on this
machine, from the per-image and per-pair costs the other benchmarks measured.

Usage:
    python bench/project_hackathon.py --results BENCH_RESULTS.json [--train-images N]

Reads the JSON the benchmarks write with --json (sections "extraction", "shortlist",
"search", "verification_real", "e2e") and prints the arithmetic as a markdown table.
Assumptions, printed with the result: every reference lands in some query's shortlist
(18,027 x 100 picks over 36,748 references), so all of them get local features; the share
of queries verified deeper (windows past the top k) and the pairs it adds are smvs_dvd's;
stage costs scale linearly with counts (no cache reuse across queries beyond the per-image
features); the measured throughput is this machine's under the load it had then.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import header, table  # noqa: E402

QUERIES, REFERENCES = 18_027, 36_748


def hours(s: float) -> str:
    return f"{s / 3600:,.2f} h" if s >= 3600 else f"{s / 60:,.1f} min" if s >= 60 else f"{s:,.1f} s"


def project(results: dict, train_images: int, top_k: int) -> tuple[str, dict]:
    ex = results["extraction"]
    t_global = ex["global_s_per_image_default"]
    t_ref = 1.0 / ex["local_ips_delf-lite0_references"]
    t_query = 1.0 / ex["local_ips_delf-lite0_queries"]
    runs = {r["label"]: r for r in results["shortlist"]["runs"]}
    default = runs.get(f"k{top_k}-expand300") or next(iter(runs.values()))
    n_smvs_queries = 100
    pairs_per_query = default["pairs"] / n_smvs_queries
    pairs_per_s = default["pairs"] / default["timings"]["rerank"]
    rank_s = results["search"]["rank_all_faiss_s_per_query"]  # the pipeline ranks with faiss
    rank_blas_s = results["search"].get("rank_all_blas_s_per_query")
    images = QUERIES + REFERENCES + train_images
    rows = [
        ["1 global descriptors", f"({QUERIES:,} + {REFERENCES:,} + {train_images:,} training) images x "
         f"{t_global:.3f} s", images * t_global],
        ["1 full ranking (faiss IndexFlatIP, every reference)", f"{QUERIES:,} queries x {rank_s * 1e3:.1f} ms",
         QUERIES * rank_s],
        ["2 local features, references", f"{REFERENCES:,} x {t_ref:.3f} s", REFERENCES * t_ref],
        ["2 local features, queries (3 rotations)", f"{QUERIES:,} x {t_query:.3f} s", QUERIES * t_query],
        ["3 verification", f"{QUERIES:,} queries x {pairs_per_query:.1f} pairs (top {top_k} + deeper windows, "
         f"smvs share) / {pairs_per_s:.0f} pairs/s (2 workers)", QUERIES * pairs_per_query / pairs_per_s],
    ]
    total = sum(r[2] for r in rows)
    body = [[a, b, hours(c), f"{c / total:.0%}"] for a, b, c in rows]
    body.append(["**total**", "", f"**{hours(total)}**", "100%"])
    text = table(["stage", "arithmetic", "time on this machine", "share"], body)
    extra = pairs_per_query - top_k
    notes = [f"Deeper windows: on smvs_dvd the default run verified {extra:.0f} pairs per query beyond the top "
             f"{top_k} on average (windows of {top_k} for the queries whose best shortlisted reference had under 30 "
             f"inliers); the projection assumes the same share of phase-2 queries needs them, and a weaker global "
             f"stage would raise it (each window adds {top_k} pairs for the queries it covers)."]
    notes += [f"Inputs measured: global {t_global:.3f} s/image (3 scales, 512 px); delf-lite0 {t_ref:.3f} s per "
             f"reference, {t_query:.3f} s per query (3 rotations); verification {pairs_per_s:.0f} pairs/s with 2 "
             f"workers in the default smvs_dvd run ({default['pairs']:,} pairs for 100 queries: "
             f"{pairs_per_query:.1f} per query); full ranking {rank_s * 1e3:.1f} ms per query at 36,748 "
             "references (7 regions)."]
    if rank_blas_s:
        notes.append(f"With a numpy matrix product + argsort instead of faiss-cpu (k = R), the full ranking "
                     f"would take {hours(QUERIES * rank_blas_s)} instead of {hours(QUERIES * rank_s)}.")
    if "full_ranking_output_gib" in results["search"]:
        notes.append(f"Memory: the full ranking (order + scores for every query and reference) would be "
                     f"{results['search']['full_ranking_output_gib']:.2f} GiB; the pipeline never holds it "
                     "whole (rankings and outputs are streamed a batch of queries at a time; "
                     "`bench/bench_rank_memory.py` measures the peak RSS at this size).")
    cache = results.get("e2e", {})
    if "cache_local_reference_bytes_per_image" in cache:
        disk = (REFERENCES * cache["cache_local_reference_bytes_per_image"]
                + QUERIES * cache["cache_local_query_bytes_per_image"])
        disk_g = (images * cache.get("cache_global_reference_bytes_per_image", 0))
        notes.append(f"Disk: local features {disk / 1e9:.1f} GB ({REFERENCES:,} x "
                     f"{cache['cache_local_reference_bytes_per_image'] / 1e3:.0f} KB + {QUERIES:,} x "
                     f"{cache['cache_local_query_bytes_per_image'] / 1e3:.0f} KB), global descriptors "
                     f"{disk_g / 1e9:.1f} GB.")
    cold = cache.get("cold_timings")
    if cold:
        # The cold smvs_dvd run's own stage times, per image: 687 images described globally
        # (100 queries, 337 references, 250 training), local features of 100 queries and 337
        # references; they include everything the isolated timings leave out (TensorFlow
        # tracing, reads, writes, PCA learning) and whatever load the machine had then.
        g_cold = cold["global"] / 687
        l_pred = 100 * t_query + 337 * t_ref
        factor = cold["local"] / l_pred
        cold_total = (images * g_cold + QUERIES * rank_s + factor * (REFERENCES * t_ref + QUERIES * t_query)
                      + QUERIES * pairs_per_query / pairs_per_s)
        notes.append(f"At the cold smvs_dvd run's own stage rates instead (global {cold['global']:.0f} s / 687 images "
                     f"= {g_cold:.3f} s per image; local {cold['local']:.0f} s, {factor:.2f}x the isolated per-image "
                     f"times for its 100 queries and 337 references): **{hours(cold_total)}** in all.")
    text += "\n\n" + "\n".join(f"- {n}" for n in notes)
    return text, {"total_s": total, **{r[0]: r[2] for r in rows}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, required=True, help="JSON written by the benchmarks' --json")
    parser.add_argument("--train-images", type=int, default=0,
                        help="training images described for the learned whitening (phase 2's count is not "
                             "given here; 0 leaves them out)")
    parser.add_argument("--top-k", type=int, default=100, help="shortlist length (the default 100)")
    args = parser.parse_args()
    results = json.loads(args.results.read_text())
    print(header("Hackathon phase 2 on this machine (projection)"))
    text, _ = project(results, args.train_images, args.top_k)
    print(f"{QUERIES:,} queries, {REFERENCES:,} references, default pipeline (top {args.top_k}, deeper windows to "
          "300), 2 cores.\n")
    print(text)


if __name__ == "__main__":
    main()
