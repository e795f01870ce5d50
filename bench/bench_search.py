"""Benchmark of stage 1 ranking: faiss vs numpy brute force on smvs_dvd, and global search at
scale (1k to 1M synthetic references): latency per query, index memory, Recall@10 of IVF
and HNSW against exact search.

Usage:
    python bench/bench_search.py --cache cache                # smvs_dvd ranking + the scale sweep
    python bench/bench_search.py --sizes 1000,10000 --skip-smvs  # a quick scale check

smvs_dvd part: the pipeline's own ranking (`stages.global_embed.rank.rank_globally`: learned whitening,
7 query regions, every reference ranked) by `search.rank_all` with faiss IndexFlatIP and with
a numpy matrix product + stable argsort, on the same descriptors, timed side by side; orders
compared. Then the same full ranking at the hackathon's size (36,748 references, synthetic).

Scale part (d = 512, the pipeline's whitened global dimension): references and held-out
queries are unit-normalised draws of a Gaussian fitted to the smvs_dvd whitened descriptors
(mean and covariance of the 687 images, plus a small isotropic floor so all 512 directions
have variance); with no cache to fit on, an isotropic Gaussian. For each size: exact faiss
IndexFlatIP and numpy brute force (same top-k), IVF (nprobe sweep) and HNSW32 (efSearch
sweep), each searched with all queries in one batch; latency = batch wall time / queries;
Recall@10 = overlap of each index's top 10 with exact search's, averaged. Memory: the
index's nominal bytes and the growth of this process's RSS while building it.
"""

import argparse
import gc
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SMVS, current_rss_mib, fmt, header, save_results, table, timed  # noqa: E402

DIM = 512


def smvs_descriptors(data: Path, cache: Path, dim: int | None = None):
    """Whitened smvs_dvd descriptors as the pipeline ranks them (learned whitening read from
    its cache): (query region descriptors [Q, G, D], reference descriptors [R, D], all
    whitened whole-image descriptors [N, D], whitening, features, names)."""
    from stages.common.cache import FeatureStore
    from stages.common.conf import resolve
    from stages.common.dataset import load_dataset
    from stages.common.extraction import load_from_store
    from stages.common.pca import apply_whitening
    from stages.global_embed import extract as global_extract
    from stages.global_embed.rank import learn_whitening

    dataset = load_dataset(data)
    conf = resolve(global_extract.default_conf, global_extract.confs, global_extract.DEFAULT_CONF)
    store_dir = global_extract.main(conf, dataset.images, cache)  # fully cached: computes nothing
    train, labels = dataset.training_images()
    images = {**dataset.images, **train}
    features, _ = load_from_store(FeatureStore.open(store_dir), images)
    ok_train = [k for k in train if k in features]
    _, whitening = learn_whitening("auto", dim or DIM, None, np.stack([features[k]["descriptor"] for k in ok_train]),
                                   [labels[k] for k in ok_train], store_dir / "whitening")
    every = apply_whitening(np.stack([f["descriptor"] for f in features.values()]), whitening)
    return dataset, features, whitening, every


def bench_smvs(data: Path, cache: Path, repeats: int) -> tuple[str, dict, np.ndarray]:
    from stages.common.pca import apply_whitening
    from stages.global_embed import search
    from stages.global_embed.rank import rank_globally

    dataset, features, whitening, every = smvs_descriptors(data, cache)
    qn, rn = list(dataset.queries), list(dataset.references)
    refs = apply_whitening(np.stack([features[n]["descriptor"] for n in rn]), whitening)
    regions = np.stack([features[n]["region_descriptors"] for n in qn])
    queries = apply_whitening(regions.reshape(-1, regions.shape[-1]), whitening).reshape(len(qn), regions.shape[1], -1)
    faiss_t, numpy_t, pipe_t = [], [], []
    for _ in range(repeats):
        with timed() as t:
            fo, fs = search.rank_all(queries, refs, backend="faiss")
        faiss_t.append(t.wall)
        with timed() as t:
            no, ns = search.rank_all(queries, refs, backend="blas")
        numpy_t.append(t.wall)
        with timed() as t:
            rank_globally(qn, rn, features, whitening, True)
        pipe_t.append(t.wall)
    same_order = int(np.all(fo == no, axis=1).sum())
    same_top100 = int(np.all(fo[:, :100] == no[:, :100], axis=1).sum())
    max_score_diff = float(np.abs(fs - ns).max())
    f, n, p = np.median(faiss_t), np.median(numpy_t), np.median(pipe_t)
    text = table(
        ["full ranking (smvs_dvd, whitened 512-d, 7 query regions)", "queries x refs",
         f"ms (median of {repeats})", "time vs faiss", "identical full orders", "identical top-100",
         "max score diff"],
        [["faiss IndexFlatIP, k = R (`rank_all(backend=\"faiss\")`)", f"{len(qn)} x {len(rn)}", fmt(f * 1e3, 2),
          "1x", "-", "-", "-"],
         ["numpy matrix product + stable argsort (`rank_all(backend=\"blas\")`)", f"{len(qn)} x {len(rn)}",
          fmt(n * 1e3, 2), f"{n / f:.2f}x", f"{same_order}/{len(qn)}", f"{same_top100}/{len(qn)}",
          f"{max_score_diff:.1e}"],
         ["`rank_globally` (whitening + faiss)", f"{len(qn)} x {len(rn)}", fmt(p * 1e3, 2),
          f"{p / f:.2f}x", "-", "-", "-"]])
    numbers = {"smvs_faiss_ms": f * 1e3, "smvs_numpy_ms": n * 1e3, "smvs_identical_orders": same_order,
               "smvs_queries": len(qn)}
    # What a smaller whitened dimension (cheaper search at scale) costs in global mAP.
    from pipeline.evaluate import evaluate
    from stages.common.shortlist import order_to_names

    rows = []
    for dim in (512, 256, 128, 64):
        _, feats, w, _ = smvs_descriptors(data, cache, dim)
        order, _ = rank_globally(qn, rn, feats, w, True)
        m = evaluate(order_to_names(order, qn, rn), dataset.ground_truth, recall_ks=(1, 10, 100))
        rows.append([dim, f"{m['mAP']:.4f}", f"{m['Recall@1']:.2f}", f"{m['Recall@10']:.2f}", f"{m['Recall@100']:.2f}"])
        numbers[f"smvs_global_map_d{dim}"] = m["mAP"]
    text += "\n\n" + table(["whitened dim (smvs_dvd, global stage only)", "mAP", "Recall@1", "Recall@10",
                             "Recall@100"], rows)
    return text, numbers, every


def bench_full_ranking(gaussian: "Gaussian", n_refs: int, n_queries: int, regions: int,
                       hackathon_queries: int) -> tuple[str, dict]:
    """The pipeline's full ranking (`rank_all`, every reference ranked for every query region
    set) at hackathon size, both backends, on synthetic descriptors."""
    from stages.global_embed import search

    refs = gaussian.draw(n_refs)
    queries = gaussian.draw(n_queries * regions).reshape(n_queries, regions, DIM)
    rows, numbers = [], {}
    orders = {}
    for backend in ("faiss", "blas"):
        with timed() as t:
            orders[backend], _ = search.rank_all(queries, refs, backend=backend)
        per_query = t.wall / n_queries
        numbers[f"rank_all_{backend}_s_per_query"] = per_query
        rows.append([f"`rank_all(backend=\"{backend}\")`", f"{n_queries} x {regions} regions x {n_refs:,}",
                     fmt(per_query * 1e3, 2), fmt(t.cpu / n_queries * 1e3, 2),
                     fmt(per_query * hackathon_queries / 60, 1)])
    same100 = int(np.all(orders["faiss"][:, :100] == orders["blas"][:, :100], axis=1).sum())
    rows[1].append(f"{numbers['rank_all_blas_s_per_query'] / numbers['rank_all_faiss_s_per_query']:.3f}x")
    rows[0].append("1x")
    for r in rows:
        r.append(f"{same100}/{n_queries}" if r is rows[1] else "-")
    out_bytes = 8.0 * hackathon_queries * n_refs  # order int32 + scores float32 for every query
    text = table(["full ranking at hackathon size", "queries x refs", "ms/query (wall)", "CPU ms/query",
                  f"projected min for {hackathon_queries:,} queries", "time vs faiss", "identical top-100"], rows)
    text += (f"\n\nThe full ranking's output for {hackathon_queries:,} queries x {n_refs:,} references (order int32 + "
             f"scores float32) is {out_bytes / 2**30:.2f} GiB in memory.")
    numbers["full_ranking_output_gib"] = out_bytes / 2**30
    return text, numbers


class Gaussian:
    """Unit-normalised draws of N(mean, cov + floor * I) in `DIM` dimensions."""

    def __init__(self, sample: np.ndarray | None, floor: float = 0.05, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        if sample is None:
            self.mean, self.chol = np.zeros(DIM), np.eye(DIM)
            return
        sample = np.asarray(sample, np.float64)
        cov = np.cov(sample.T)
        cov += floor * np.trace(cov) / DIM * np.eye(DIM)
        self.mean, self.chol = sample.mean(axis=0), np.linalg.cholesky(cov)

    def draw(self, n: int, chunk: int = 100_000) -> np.ndarray:
        out = np.empty((n, DIM), np.float32)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            x = self.rng.standard_normal((m, DIM)) @ self.chol.T + self.mean
            out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def numpy_topk(queries: np.ndarray, refs: np.ndarray, k: int, block: int = 64):
    """Exact top-k inner products by blocked numpy matrix products + argpartition."""
    ids = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), block):
        sims = queries[s:s + block] @ refs.T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        top = np.take_along_axis(sims, part, axis=1)
        ids[s:s + block] = np.take_along_axis(part, np.argsort(-top, axis=1, kind="stable"), axis=1)
    return ids


def recall_at(found: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(found, truth, strict=True)]))


def _search(index, queries, k):
    with timed() as t:
        _, ids = index.search(queries, k)
    return ids, t


def bench_scale(sizes: list[int], n_queries: int, k: int, gaussian: Gaussian, hnsw_max: int, nlist_cap: int,
                nprobes: list[int], efs: list[int]) -> tuple[str, dict]:
    import faiss

    rows, numbers = [], {}
    queries = gaussian.draw(n_queries)
    for n in sizes:
        refs = gaussian.draw(n)
        gc.collect()
        base = current_rss_mib()
        with timed() as t_build:
            flat = faiss.IndexFlatIP(DIM)
            flat.add(refs)
        flat_mem = current_rss_mib() - base
        truth, t = _search(flat, queries, k)
        flat_ms = t.wall / n_queries * 1e3
        threshold = faiss.cvar.distance_compute_blas_threshold
        rows.append([f"{n:,}", f"Flat (exact; faiss default, distance_compute_blas_threshold {threshold})", "-",
                     fmt(t_build.wall, 1), fmt(4 * DIM * n / 2**20, 0), fmt(flat_mem, 0),
                     fmt(flat_ms, 3), "1x", "1.000"])
        numbers[f"flat_{n}_ms_per_query"] = flat_ms
        numbers[f"flat_{n}_mib"] = 4 * DIM * n / 2**20
        # faiss 1.15 computes Flat distances with its own SIMD loop unless a batch has at
        # least distance_compute_blas_threshold queries (128,000 in faiss-cpu 1.15.1); a lower
        # threshold sends batches to BLAS.
        default_threshold = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 20
        ids, t = _search(flat, queries, k)
        faiss.cvar.distance_compute_blas_threshold = default_threshold
        blas_ms = t.wall / n_queries * 1e3
        rows.append([f"{n:,}", "Flat, BLAS path (distance_compute_blas_threshold 20)", "-", "-",
                     fmt(4 * DIM * n / 2**20, 0), "same", fmt(blas_ms, 3), f"{blas_ms / flat_ms:.2f}x",
                     f"{recall_at(ids, truth):.3f}"])
        numbers[f"flat_blas_{n}_ms_per_query"] = blas_ms
        with timed() as t:
            ids = numpy_topk(queries, refs, k)
        np_ms = t.wall / n_queries * 1e3
        rows.append([f"{n:,}", "numpy brute force (matmul + argpartition)", "-", "-", fmt(4 * DIM * n / 2**20, 0),
                     "(refs array)", fmt(np_ms, 3), f"{np_ms / flat_ms:.2f}x", f"{recall_at(ids, truth):.3f}"])
        numbers[f"numpy_{n}_ms_per_query"] = np_ms
        del flat
        gc.collect()
        nlist = int(min(nlist_cap, max(16, 2 ** int(np.log2(4 * np.sqrt(n))))))
        base = current_rss_mib()
        with timed() as t_build:
            quantizer = faiss.IndexFlatIP(DIM)
            ivf = faiss.IndexIVFFlat(quantizer, DIM, nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.cp.niter = 10
            train = refs[np.random.default_rng(1).choice(n, min(n, 40 * nlist), replace=False)]
            ivf.train(train)
            ivf.add(refs)
        ivf_mem = current_rss_mib() - base
        nominal = (4 * DIM + 8) * n / 2**20 + 4 * DIM * nlist / 2**20
        for nprobe in nprobes:
            if nprobe > nlist:
                continue
            ivf.nprobe = nprobe
            ids, t = _search(ivf, queries, k)
            ms = t.wall / n_queries * 1e3
            r10 = recall_at(ids, truth)
            rows.append([f"{n:,}", f"IVF{nlist},Flat", f"nprobe {nprobe}", fmt(t_build.wall, 1), fmt(nominal, 0),
                         fmt(ivf_mem, 0), fmt(ms, 3), f"{ms / flat_ms:.3f}x", f"{r10:.3f}"])
            numbers[f"ivf_{n}_nprobe{nprobe}_ms_per_query"] = ms
            numbers[f"ivf_{n}_nprobe{nprobe}_recall10"] = r10
        del ivf, quantizer
        gc.collect()
        if n <= hnsw_max:
            base = current_rss_mib()
            with timed() as t_build:
                hnsw = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
                hnsw.add(refs)
            hnsw_mem = current_rss_mib() - base
            nominal = (4 * DIM + 2 * 32 * 4 * 1.05) * n / 2**20
            for ef in efs:
                hnsw.hnsw.efSearch = max(ef, k)
                ids, t = _search(hnsw, queries, k)
                ms = t.wall / n_queries * 1e3
                r10 = recall_at(ids, truth)
                rows.append([f"{n:,}", "HNSW32,Flat", f"efSearch {max(ef, k)}", fmt(t_build.wall, 1), fmt(nominal, 0),
                             fmt(hnsw_mem, 0), fmt(ms, 3), f"{ms / flat_ms:.3f}x", f"{r10:.3f}"])
                numbers[f"hnsw_{n}_ef{max(ef, k)}_ms_per_query"] = ms
                numbers[f"hnsw_{n}_ef{max(ef, k)}_recall10"] = r10
            del hnsw
        else:
            rows.append([f"{n:,}", "HNSW32,Flat", "not built", "-", "-", "-", "-", "-", "-"])
        del refs
        gc.collect()
    text = table(["references", "index", "setting", "build s", "nominal MiB", "RSS growth MiB",
                  f"ms/query (batch of {n_queries}, top {k})", "time vs Flat", "Recall@10 vs Flat"], rows)
    return text, numbers


def bench_shortlist(n: int, n_queries: int, k: int, gaussian: Gaussian, pca_dims: list[int], k_factors: list[int],
                    repeats: int, ivfpq: bool) -> tuple[str, dict]:
    """The persistent index's approximate kind (`stages.global_embed.ann`: a PCA pre-search
    by matrix product, exact re-scoring of k_factor x k candidates) at `n` references, with
    the exact search it replaces and, with `ivfpq`, an IVF fast-scan PQ index re-scored the
    same way; each row with the 1-minute load average when it was measured."""
    import os

    import faiss

    from stages.global_embed import ann

    queries = gaussian.draw(n_queries)
    refs = gaussian.draw(n)
    rows, numbers = [], {}
    with timed() as t:
        truth = numpy_topk(queries, refs, k)
    exact_ms = t.wall / n_queries * 1e3
    rows.append([f"{n:,}", "exact (numpy matrix product + argpartition)", "-", "-", fmt(exact_ms, 2),
                 fmt(t.cpu / n_queries * 1e3, 2), "1.000", "1.000", f"{os.getloadavg()[0]:.2f}"])
    numbers[f"shortlist_{n}_exact_ms"] = exact_ms
    for p in pca_dims:
        conf = dict(ann.default_conf, pca_dim=p)
        with timed() as t_build:
            index = ann.build(refs, conf, force="pca")
        for kf in k_factors:
            for rep in range(repeats):
                with timed() as t:
                    ids, _ = ann.search_shortlist(index, refs, queries, k, dict(conf, k_factor=kf))
                ms = t.wall / n_queries * 1e3
                r10, r100 = recall_at(ids, truth, 10), recall_at(ids, truth, k)
                rows.append([f"{n:,}", f"`ann` PCA{p},Flat + exact re-scoring", f"k_factor {kf} ({kf * k} candidates)"
                             + (f", repeat {rep + 1}" if repeats > 1 else ""), fmt(t_build.wall, 0), fmt(ms, 2),
                             fmt(t.cpu / n_queries * 1e3, 2), f"{r10:.3f}", f"{r100:.3f}",
                             f"{os.getloadavg()[0]:.2f}"])
                numbers[f"shortlist_{n}_pca{p}_kf{kf}_cpu_ms"] = t.cpu / n_queries * 1e3
                numbers[f"shortlist_{n}_pca{p}_kf{kf}_ms"] = ms
                numbers[f"shortlist_{n}_pca{p}_kf{kf}_recall10"] = r10
                numbers[f"shortlist_{n}_pca{p}_kf{kf}_recall{k}"] = r100
        del index
        gc.collect()
    if ivfpq:
        nlist = 1024 if n <= 200_000 else 4096
        with timed() as t_build:
            index = faiss.index_factory(DIM, f"IVF{nlist},PQ{DIM // 4}x4fs", faiss.METRIC_INNER_PRODUCT)
            faiss.extract_index_ivf(index).cp.niter = 10
            index.train(refs[np.random.default_rng(1).choice(n, min(n, 40 * nlist), replace=False)])
            index.add(refs)
        for nprobe in (64, 256):
            faiss.extract_index_ivf(index).nprobe = nprobe
            with timed() as t:
                _, cand = index.search(queries, 10 * k)
                ids, _ = ann.rescore(queries[:, None], refs, cand, k)
            ms = t.wall / n_queries * 1e3
            rows.append([f"{n:,}", f"IVF{nlist},PQ{DIM // 4}x4fs + exact re-scoring", f"nprobe {nprobe}, "
                         f"{10 * k} candidates", fmt(t_build.wall, 0), fmt(ms, 2), fmt(t.cpu / n_queries * 1e3, 2),
                         f"{recall_at(ids, truth, 10):.3f}",
                         f"{recall_at(ids, truth, k):.3f}", f"{os.getloadavg()[0]:.2f}"])
    text = table(["references", "index", "setting", "build s", f"ms/query (wall, batch of {n_queries}, top {k})",
                  "CPU ms/query", "Recall@10 vs exact", f"Recall@{k} vs exact", "load (1 min)"], rows)
    return text, numbers


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SMVS, help="smvs_dvd folder")
    parser.add_argument("--cache", type=Path, default=Path("cache"),
                        help="cache holding the smvs_dvd global descriptors (default conf); read only, except "
                             "the learned whitening file it caches")
    parser.add_argument("--skip-smvs", action="store_true", help="only the synthetic scale sweep (isotropic "
                                                                 "unless the cache has smvs descriptors)")
    parser.add_argument("--repeats", type=int, default=5, help="smvs: repetitions (median reported)")
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated reference counts")
    parser.add_argument("--queries", type=int, default=500, help="held-out synthetic queries per size")
    parser.add_argument("--k", type=int, default=100, help="neighbours per query (the pipeline's shortlist)")
    parser.add_argument("--dim", type=int, default=512,
                        help="descriptor dimension of the synthetic references (the pipeline's whitened 512; a "
                             "lower one stands for a smaller --whiten-dim)")
    parser.add_argument("--nlist-cap", type=int, default=1024,
                        help="IVF lists: 4 sqrt(N) rounded down to a power of 2, at most this (k-means cost)")
    parser.add_argument("--nprobe", default="1,8,32,128", help="IVF nprobe values")
    parser.add_argument("--ef", default="100,200,400", help="HNSW efSearch values (at least k)")
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="build HNSW only up to this many references")
    parser.add_argument("--rank-refs", type=int, default=36_748,
                        help="full-ranking check: references (hackathon phase 2: 36,748); 0 skips it")
    parser.add_argument("--rank-queries", type=int, default=100, help="full-ranking check: queries timed")
    parser.add_argument("--shortlist", type=int, default=0, metavar="N",
                        help="only the persistent index's search (`stages.global_embed.ann`) at N references: "
                             "PCA pre-search + exact re-scoring against exact search")
    parser.add_argument("--pca-dims", default="64,128", help="--shortlist: pre-search dimensions")
    parser.add_argument("--k-factors", default="5,10", help="--shortlist: candidates per query / k")
    parser.add_argument("--shortlist-repeats", type=int, default=1, help="--shortlist: times each setting is timed")
    parser.add_argument("--ivfpq", action="store_true", help="--shortlist: also IVF fast-scan PQ + re-scoring")
    parser.add_argument("--json", type=Path, help="merge the measured numbers into this JSON file")
    args = parser.parse_args()
    import faiss

    global DIM
    DIM = args.dim

    print(header("Stage 1 search: faiss vs numpy, and scale"))
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads\n")
    numbers, sample = {}, None
    if not args.skip_smvs:
        text, numbers, sample = bench_smvs(args.data, args.cache, args.repeats)
        print(text + "\n")
    else:
        try:
            sample = smvs_descriptors(args.data, args.cache)[3]
        except Exception as e:  # no smvs descriptors in this cache: isotropic references
            print(f"(no smvs_dvd descriptors to fit: {type(e).__name__}: {e})\n")
    sizes = [int(s) for s in args.sizes.split(",") if s]
    gaussian = Gaussian(sample)
    if args.shortlist:
        # threads: OMP_NUM_THREADS / OPENBLAS_NUM_THREADS of the environment (faiss and numpy)
        text, more = bench_shortlist(args.shortlist, args.queries, args.k, gaussian,
                                     [int(x) for x in args.pca_dims.split(",")],
                                     [int(x) for x in args.k_factors.split(",")], args.shortlist_repeats, args.ivfpq)
        print(text)
        save_results(args.json, "shortlist_search", more)
        return
    print(f"Synthetic references, d = {DIM}: "
          + ("Gaussian fitted to the smvs_dvd whitened descriptors" if sample is not None else "isotropic Gaussian")
          + f", unit-normalised; {args.queries} held-out queries from the same distribution.\n")
    if args.rank_refs:
        text, more = bench_full_ranking(gaussian, args.rank_refs, args.rank_queries, 7, 18_027)
        print(text + "\n")
        numbers.update(more)
    start = time.perf_counter()
    text, more = bench_scale(sizes, args.queries, args.k, gaussian, args.hnsw_max, args.nlist_cap,
                             [int(x) for x in args.nprobe.split(",")], [int(x) for x in args.ef.split(",")])
    print(text)
    print(f"\n(scale sweep: {time.perf_counter() - start:.0f} s)")
    numbers.update(more)
    save_results(args.json, "search" if DIM == 512 else f"search_d{DIM}", numbers)


if __name__ == "__main__":
    main()
