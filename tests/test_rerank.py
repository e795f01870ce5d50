"""Stage 3: matchers, RANSAC backends, the rerank merge and the inlier cache."""

import numpy as np
import pytest

from stages.common.cache import FeatureStore
from stages.common.conf import resolve
from stages.rerank import inliers, matching, merge, ransac, synthetic, verify

RANSAC_CONF = {"backend": "opencv", "model": "affine", "threshold": 20.0, "max_iters": 1000,
               "confidence": 0.999999, "refine_iters": 10, "seed": 0}
TRUE_AFFINE = np.array([[0.85, 0.2, 30.0], [-0.15, 0.9, 45.0], [0.0, 0.0, 1.0]])


def unit(*rows) -> np.ndarray:
    a = np.array(rows, np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def sift_pair():
    """RootSIFT of a photo and of its known affine warp, with their mutual-NN matches."""
    gray = synthetic.photo_gray("astronaut", 384)
    query = synthetic.rootsift(gray, 800)
    ref = synthetic.rootsift(synthetic.warp(gray, TRUE_AFFINE), 800)
    pairs = matching.mutual_nn(query["descriptors"], ref["descriptors"])
    return query, ref, query["keypoints_xy"][pairs[:, 0]], ref["keypoints_xy"][pairs[:, 1]]


# --- RANSAC ---------------------------------------------------------------------------------

def test_both_backends_recover_the_affine_warp_and_agree(sift_pair):
    _, _, pts_q, pts_r = sift_pair
    grid = np.array([[x, y, 1.0] for x in (0, 192, 383) for y in (0, 192, 383)])
    counts = {}
    for backend in ("opencv", "skimage"):
        model, inliers = ransac.fit(pts_q, pts_r, {**RANSAC_CONF, "backend": backend})
        err = np.abs(grid @ model.T - grid @ TRUE_AFFINE.T)[:, :2].max()
        assert err < 3.0, f"{backend}: model off by {err:.1f} px"
        # inliers are the matches the true warp maps within the threshold
        true_err = np.linalg.norm(pts_q @ TRUE_AFFINE[:2, :2].T + TRUE_AFFINE[:2, 2] - pts_r, axis=1)
        assert np.mean(true_err[inliers] < 20) > 0.99
        counts[backend] = int(inliers.sum())
    assert counts["opencv"] > 0.6 * len(pts_q) > 100
    assert abs(counts["opencv"] - counts["skimage"]) <= 0.03 * counts["skimage"], counts


@pytest.mark.parametrize("backend", ["opencv", "skimage"])
def test_ransac_is_seeded(sift_pair, backend):
    _, _, pts_q, pts_r = sift_pair
    noisy_r = pts_r.copy()
    noisy_r[::2] = np.random.default_rng(1).uniform(0, 384, (len(pts_r[::2]), 2))  # 50% outliers
    conf = {**RANSAC_CONF, "backend": backend, "max_iters": 50, "seed": 3}
    n1, mask1 = ransac.count_inliers(pts_q, noisy_r, conf)
    n2, mask2 = ransac.count_inliers(pts_q, noisy_r, conf)
    assert n1 == n2 and np.array_equal(mask1, mask2)
    assert n1 >= 0.4 * len(pts_q)


@pytest.mark.parametrize("backend", ["opencv", "skimage"])
@pytest.mark.parametrize("model,sizes", [("affine", [0, 1, 2, 3]), ("homography", [0, 3, 4])])
def test_too_few_matches_give_zero(backend, model, sizes):
    conf = {**RANSAC_CONF, "backend": backend, "model": model}
    pts = np.array([[0, 0], [100, 0], [0, 100], [100, 100]], np.float32)
    for m in sizes:
        n, mask = ransac.count_inliers(pts[:m], pts[:m] + 5, conf)
        assert n == 0 and mask.shape == (m,) and not mask.any()
    n, _ = ransac.count_inliers(np.zeros((0, 2)), np.zeros((0, 2)), conf)
    assert n == 0


@pytest.mark.parametrize("backend", ["opencv", "skimage"])
def test_degenerate_matches_do_not_raise(backend):
    same = np.full((10, 2), 7.0, np.float32)
    n, mask = ransac.count_inliers(same, same, {**RANSAC_CONF, "backend": backend})
    assert isinstance(n, int) and mask.shape == (10,)


def test_homography_recovers_a_perspective_warp():
    rng = np.random.default_rng(0)
    h = synthetic.random_homography(400, 300, rng)
    pts_q = rng.uniform(0, 400, (200, 2))
    proj = np.c_[pts_q, np.ones(200)] @ h.T
    pts_r = proj[:, :2] / proj[:, 2:]
    pts_r[:60] = rng.uniform(0, 400, (60, 2))  # outliers
    for backend in ("opencv", "skimage"):
        conf = {**RANSAC_CONF, "backend": backend, "model": "homography", "threshold": 2.0}
        model, mask = ransac.fit(pts_q, pts_r, conf)
        assert mask[60:].all() and mask[:60].sum() <= 3
        assert np.allclose(model / model[2, 2], h / h[2, 2], atol=1e-3)


def test_bad_ransac_conf_raises():
    pts = np.zeros((10, 2))
    with pytest.raises(ValueError):
        ransac.count_inliers(pts, pts, {**RANSAC_CONF, "backend": "magsac"})
    with pytest.raises(ValueError):
        ransac.count_inliers(pts, np.zeros((9, 2)), RANSAC_CONF)


# --- matchers -------------------------------------------------------------------------------

REFS = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
# q0 and q1 both have r0 as nearest neighbour, r0 prefers q0; q2 <-> r2 is mutual;
# r1's nearest query is q1, whose nearest reference is r0.
QUERIES = unit([1, 0.1, 0], [1, 0.3, 0], [0, 0.2, 1])


def test_mutual_nn_keeps_only_mutual_pairs():
    assert matching.mutual_nn(QUERIES, REFS).tolist() == [[0, 0], [2, 2]]
    assert matching.mutual_nn(REFS, QUERIES).tolist() == [[0, 0], [2, 2]]


def test_mutual_nn_tie_keeps_first_row():
    queries = unit([1, 0.1, 0], [1, 0.1, 0], [0, 0, 1])
    assert matching.mutual_nn(queries, REFS).tolist() == [[0, 0], [2, 2]]


def test_distance_rule_is_one_directional_with_threshold():
    # distances to the nearest reference: q0 0.0998, q1 0.2901, q2 0.1975
    assert matching.distance_matches(QUERIES, REFS, 0.8).tolist() == [[0, 0], [1, 0], [2, 2]]
    assert matching.distance_matches(QUERIES, REFS, 0.25).tolist() == [[0, 0], [2, 2]]
    assert matching.distance_matches(QUERIES, REFS, 0.15).tolist() == [[0, 0]]
    assert matching.distance_matches(QUERIES, REFS, 0.05).shape == (0, 2)


def test_ratio_test_rejects_ambiguous_match():
    # q0 is almost equidistant to r0 and r1 (ratio 0.94); q1 is clearly r0's (ratio 0.07)
    queries = unit([1, 0.95, 0], [1, 0.1, 0])
    assert matching.ratio_matches(queries, REFS, 0.8).tolist() == [[1, 0]]
    assert matching.ratio_matches(queries, REFS, 0.95).tolist() == [[0, 0], [1, 0]]
    assert matching.ratio_matches(queries, REFS[:1], 0.8).tolist() == [[0, 0], [1, 0]]  # no 2nd neighbour


@pytest.mark.parametrize("method", matching.METHODS)
def test_matchers_on_empty_and_float16_inputs(method):
    conf = {"method": method, "distance_threshold": 0.8, "ratio": 0.8}
    for q, r in [(QUERIES[:0], REFS), (QUERIES, REFS[:0]), (QUERIES[:0], REFS[:0])]:
        out = matching.match(q, r, conf)
        assert out.shape == (0, 2) and out.dtype == np.int64
    half = matching.match(QUERIES.astype(np.float16), REFS.astype(np.float16), conf)
    assert np.array_equal(half, matching.match(QUERIES, REFS, conf))
    with pytest.raises(ValueError):
        matching.match(QUERIES, np.ones((3, 4), np.float32), conf)


# --- verify_pair ----------------------------------------------------------------------------

def test_verify_pair_matches_the_pure_functions_and_handles_empty(sift_pair):
    query, ref, pts_q, pts_r = sift_pair
    conf = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv")
    n = verify.verify_pair(query, ref, conf)
    # geometry in normalised coordinates: pixels over the image's longer side
    norm_q, norm_r = pts_q / max(query["image_size"]), pts_r / max(ref["image_size"])
    assert n == ransac.count_inliers(norm_q, norm_r, conf["ransac"])[0] > 100
    assert verify.verify_pair({"error": np.array("unreadable")}, ref, conf) == 0
    empty = {"keypoints_xy": np.zeros((0, 2), np.float32), "descriptors": np.zeros((0, 128), np.float16),
             "rotations": np.zeros(0, np.int16)}
    assert verify.verify_pair(query, empty, conf) == 0
    assert verify.verify_pair(empty, ref, conf) == 0


def test_verify_pair_takes_the_best_rotation_group(sift_pair):
    query, ref, _, _ = sift_pair
    conf = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv")
    n_true = verify.verify_pair(query, ref, conf)
    # rotation 0: the same descriptors at shuffled positions (geometrically wrong); rotation
    # 90: the real keypoints. Matched as one set, the shuffled copies win every tie.
    shuffled = np.random.default_rng(0).permutation(query["keypoints_xy"])
    n = len(shuffled)
    two_groups = {"keypoints_xy": np.concatenate([shuffled, query["keypoints_xy"]]),
                  "descriptors": np.concatenate([query["descriptors"]] * 2),
                  "rotations": np.repeat(np.array([0, 90], np.int16), n)}
    assert verify.verify_pair(two_groups, ref, conf) == n_true
    merged = {**two_groups, "rotations": np.zeros(2 * n, np.int16)}
    assert verify.verify_pair(merged, ref, conf) < 0.2 * n_true


# --- merge ----------------------------------------------------------------------------------

@pytest.mark.parametrize("rule", merge.RULES)
def test_merge_is_a_permutation_keeping_global_order_below_top_k(rule):
    rng = np.random.default_rng(0)
    n_q, n_r, top_k = 6, 40, 15
    order = np.stack([rng.permutation(n_r) for _ in range(n_q)])
    scores = -np.sort(-rng.random((n_q, n_r)), axis=1)
    inliers = [rng.integers(0, 60, rng.integers(0, top_k + 5)) for _ in range(n_q)]  # ragged, some > top_k
    out = merge.rerank(order, scores, inliers, top_k, rule=rule, min_inliers=10, weight=0.5)
    assert out.shape == order.shape and out.dtype == np.int32
    assert (np.sort(out, axis=1) == np.arange(n_r)).all()
    assert np.array_equal(out[:, top_k:], order[:, top_k:])
    assert all(set(out[q, :top_k]) == set(order[q, :top_k]) for q in range(n_q))
    assert not np.array_equal(out, order)  # something moved
    unchanged = merge.rerank(order, scores, [[]] * n_q, top_k, rule=rule)
    assert np.array_equal(unchanged, order)  # nothing verified: the global order


def test_delg_rule_hand_computed():
    order = np.array([[7, 3, 5, 1, 0, 2, 6, 4]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]])
    # positions 0-5 verified with these counts; min_inliers 10 leaves 7 and 3 unverified
    inliers = [[3, 25, 40, 25, 0, 7]]
    out = merge.rerank(order, scores, inliers, top_k=6, rule="delg", min_inliers=10)
    # 5 (40), then 3 and 1 (25 each, global order), then unverified 7, 0, 2 in global order
    assert out.tolist() == [[5, 3, 1, 7, 0, 2, 6, 4]]
    out = merge.rerank(order, scores, inliers, top_k=3, rule="delg", min_inliers=10)
    assert out.tolist() == [[5, 3, 7, 1, 0, 2, 6, 4]]


def test_weighted_rule_hand_computed():
    order = np.array([[4, 2, 0, 1, 3]])
    scores = np.array([[0.90, 0.85, 0.80, 0.30, 0.20]])
    # bonus 0.7 * min(n, 70) / 70: 0, 0.1 (n=10), 0.7 (n=140, capped), 0 (n=5 < min_inliers)
    inliers = [[0, 10, 140, 5]]
    out = merge.rerank(order, scores, inliers, top_k=4, rule="weighted", min_inliers=8, weight=0.7)
    # combined: 0.90, 0.95, 1.50, 0.30 -> 0, 2, 4, 1; then 3
    assert out.tolist() == [[0, 2, 4, 1, 3]]


def test_merge_rejects_bad_input():
    order, scores = np.zeros((1, 3), int), np.zeros((1, 3))
    with pytest.raises(ValueError):
        merge.rerank(order, scores, [[1]], 2, rule="vote")
    with pytest.raises(ValueError):
        merge.rerank(order, scores, [[1], [2]], 2)


# --- main and the pair cache ----------------------------------------------------------------

def _points_entry(xy: np.ndarray, desc: np.ndarray) -> dict:
    n = len(xy)
    return {"keypoints_xy": xy.astype(np.float32), "descriptors": desc.astype(np.float16),
            "scores": np.ones(n, np.float32), "scales": np.ones(n, np.float32),
            "rotations": np.zeros(n, np.int16), "image_size": np.array([640, 480], np.int32)}


@pytest.fixture
def local_store(tmp_path):
    """Queries q0, q1; references r0 (q0 moved by TRUE_AFFINE: 60 inliers), r1 (q1's
    descriptors at random places) and r2 (q1 exactly, shifted); r_bad is unreadable."""
    rng = np.random.default_rng(0)
    store = FeatureStore(tmp_path / "cache", "local", {"name": "synthetic"}, "k1")
    q = {f"q{i}": (rng.uniform(0, 480, (60, 2)), unit(*rng.standard_normal((60, 40)))) for i in range(2)}
    for name, (xy, desc) in q.items():
        store.write(name, _points_entry(xy, desc))
    xy0, desc0 = q["q0"]
    store.write("r0", _points_entry(xy0 @ TRUE_AFFINE[:2, :2].T + TRUE_AFFINE[:2, 2], desc0))
    store.write("r1", _points_entry(rng.uniform(0, 480, (60, 2)), q["q1"][1]))
    store.write("r2", _points_entry(q["q1"][0] + 12.0, q["q1"][1]))
    store.write_error("r_bad", "unreadable image")
    return store


def _write_pairs(path, pairs):
    path.write_text("".join(f"{q}\t{r}\n" for q, refs in pairs.items() for r in refs))
    return path


def test_main_caches_pairs_and_reruns_nothing(tmp_path, local_store):
    conf = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv")
    pairs = {"q0": ["r0", "r1", "r_bad"], "q1": ["r1", "r2"]}
    pairs_path = _write_pairs(tmp_path / "pairs.txt", pairs)
    cache = tmp_path / "cache"
    out = verify.main(conf, pairs_path, local_store.dir, cache, workers=1)
    counts = inliers.load_inliers(out, pairs_path)
    assert counts["q0"]["r0"] == 60 and counts["q1"]["r2"] == 60
    assert counts["q0"]["r1"] < 10 and counts["q1"]["r1"] < 10 and counts["q0"]["r_bad"] == 0

    store = FeatureStore.open(out)
    assert verify.pending_pairs(store, local_store, pairs) == {}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")}
    assert verify.main(conf, pairs_path, local_store.dir, cache, workers=1) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.npz")} == mtimes  # nothing rewritten

    # merge parameters are not part of the cache key; verification parameters are
    other_merge = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv",
                          {"merge": {"min_inliers": 3, "rule": "weighted"}})
    assert verify.store_for(other_merge, cache, local_store).dir == out
    other_ransac = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv", {"ransac": {"threshold": 8.0}})
    assert verify.store_for(other_ransac, cache, local_store).dir != out

    # a longer shortlist computes only the new pairs
    longer = {"q0": ["r0", "r1", "r_bad", "r2"], "q1": ["r1", "r2"]}
    assert verify.pending_pairs(store, local_store, longer) == {"q0": ["r2"]}
    verify.main(conf, _write_pairs(tmp_path / "longer.txt", longer), local_store.dir, cache, workers=1)
    assert (out / "q1.npz").stat().st_mtime_ns == mtimes["q1.npz"]
    assert set(inliers.load_inliers(out, longer)["q0"]) == {"r0", "r1", "r_bad", "r2"}

    # rewritten local features of a reference invalidate its pairs only
    rng = np.random.default_rng(5)
    local_store.write("r1", _points_entry(rng.uniform(0, 480, (30, 2)), unit(*rng.standard_normal((30, 40)))))
    assert verify.pending_pairs(store, local_store, longer) == {"q0": ["r1"], "q1": ["r1"]}


def test_overwrite_of_a_second_pairs_file_keeps_the_first_files_pairs(tmp_path, local_store):
    """An --overwrite run verifies the top-k and then a deeper window of the same query:
    the entry must end up holding both, as without --overwrite."""
    conf = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv")
    cache = tmp_path / "cache"
    top = _write_pairs(tmp_path / "top.txt", {"q0": ["r0"]})
    window = _write_pairs(tmp_path / "window.txt", {"q0": ["r1"]})
    for overwrite in (False, True):
        verify.main(conf, top, local_store.dir, cache, overwrite=overwrite, workers=1)
        out = verify.main(conf, window, local_store.dir, cache, overwrite=overwrite, workers=1)
        counts = inliers.load_inliers(out, top)["q0"]
        assert counts == {"r0": 60}, overwrite
        assert set(verify.cached_inliers(FeatureStore.open(out), "q0", local_store,
                                         verify._Stamps(local_store))) == {"r0", "r1"}


def test_main_skips_pairs_without_local_features(tmp_path, local_store):
    conf = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv")
    pairs = {"q0": ["r0", "r_missing"], "q_missing": ["r0"]}
    out = verify.main(conf, _write_pairs(tmp_path / "p.txt", pairs), local_store.dir, tmp_path / "cache", workers=1)
    assert inliers.load_inliers(out, pairs) == {"q0": {"r0": 60}, "q_missing": {}}
    assert verify.pending_pairs(FeatureStore.open(out), local_store, pairs) == {"q0": ["r_missing"],
                                                                              "q_missing": ["r0"]}


def test_main_keeps_the_inlier_matches_in_pixels(tmp_path, local_store):
    conf = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv")
    pairs = {"q0": ["r0", "r1"], "q1": ["r2"]}
    out = verify.main(conf, _write_pairs(tmp_path / "pairs.txt", pairs), local_store.dir, tmp_path / "cache",
                      workers=1)
    counts = inliers.load_inliers(out, pairs)
    matches = inliers.load_matches(out, "q0")
    assert set(matches) == {"r0", "r1"}
    q_xy, r_xy = matches["r0"]
    assert q_xy.dtype == r_xy.dtype == np.float32 and q_xy.shape == r_xy.shape == (counts["q0"]["r0"], 2)
    # original pixels (not the verification's normalised units): r0 is q0 moved by TRUE_AFFINE
    assert np.abs(q_xy @ TRUE_AFFINE[:2, :2].T + TRUE_AFFINE[:2, 2] - r_xy).max() < 0.1
    assert set(map(tuple, q_xy.round(2).tolist())) <= set(map(tuple, local_store.read("q0")["keypoints_xy"]
                                                              .round(2).tolist()))
    assert len(matches["r1"][0]) == counts["q0"]["r1"]
    q1_q, q1_r = inliers.load_matches(out, "q1")["r2"]
    assert np.allclose(q1_r - q1_q, 12.0, atol=0.1)
    assert inliers.load_matches(out, "q_absent") == {}


def test_entries_cached_before_matches_were_kept_still_work(tmp_path, local_store):
    """An entry without match arrays (written before they were kept): its counts are reused,
    its pairs read as "not kept", and new pairs added to it keep theirs."""
    conf = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv")
    cache = tmp_path / "cache"
    out = verify.main(conf, _write_pairs(tmp_path / "p.txt", {"q0": ["r0"]}), local_store.dir, cache, workers=1)
    store = FeatureStore.open(out)
    entry = store.read("q0")
    store.write("q0", {k: entry[k] for k in ("ref_names", "inliers", "ref_stamps")}, source=local_store.path("q0"))
    assert inliers.load_matches(out, "q0") == {"r0": None}
    longer = {"q0": ["r0", "r2"]}
    assert verify.pending_pairs(store, local_store, longer) == {"q0": ["r2"]}
    verify.main(conf, _write_pairs(tmp_path / "longer.txt", longer), local_store.dir, cache, workers=1)
    assert inliers.load_inliers(out, longer)["q0"]["r0"] == 60
    matches = inliers.load_matches(out, "q0")
    assert matches["r0"] is None and len(matches["r2"][0]) == inliers.load_inliers(out, longer)["q0"]["r2"]
    assert FeatureStore.open(out).read("q0")["match_counts"][0] == -1


def test_split_matches_refuses_inconsistent_arrays():
    entry = {"ref_names": np.array(["a", "b"]), "match_counts": np.array([2, -1], np.int32),
             "match_query_xy": np.zeros((3, 2), np.float32), "match_ref_xy": np.zeros((3, 2), np.float32)}
    assert inliers.split_matches(entry) == [None, None]
    entry["match_query_xy"] = entry["match_ref_xy"] = np.arange(4, dtype=np.float32).reshape(2, 2)
    first, second = inliers.split_matches(entry)
    assert first[0].tolist() == [[0, 1], [2, 3]] and second is None


@pytest.mark.parametrize("backend", ["threading", "loky"])
def test_parallel_backends_give_the_sequential_counts(tmp_path, local_store, backend):
    conf = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv")
    pairs = {"q0": ["r0", "r1", "r2"], "q1": ["r0", "r1", "r2"]}
    pairs_path = _write_pairs(tmp_path / "pairs.txt", pairs)
    seq = verify.main(conf, pairs_path, local_store.dir, tmp_path / "seq", workers=1)
    par = verify.main(conf, pairs_path, local_store.dir, tmp_path / "par", workers=2, backend=backend)
    assert inliers.load_inliers(par, pairs) == inliers.load_inliers(seq, pairs)


def test_align_inliers_follows_the_ranking():
    order = np.array([[2, 0, 1], [1, 2, 0]])
    inliers = {"qa": {"r2": 30, "r1": 4}, "qb": {"r0": 9}}
    out = merge.align_inliers(["qa", "qb"], ["r0", "r1", "r2"], order, inliers, top_k=2)
    assert [a.tolist() for a in out] == [[30, 0], [0, 0]]


def test_cached_counts_are_read_again_when_the_entry_is_rewritten(tmp_path):
    """`read_counts` keeps counts in memory for the run's repeated reads, but a query entry
    rewritten since (more pairs verified) is read again, and `load_inliers` sees the new
    counts; an entry that is deleted has none."""
    store = FeatureStore(tmp_path / "cache", "rerank", {"name": "t"}, "k1")

    def write(names, counts):
        store.write("q", {"ref_names": np.array(names), "inliers": np.array(counts, np.int32),
                          "ref_stamps": np.array(["s"] * len(names))})

    write(["a", "b"], [12, 0])
    assert inliers.load_inliers(store, {"q": ["a", "b", "c"]}) == {"q": {"a": 12, "b": 0}}
    assert inliers.read_counts(store, "q") is inliers.read_counts(store, "q")  # read once
    write(["a", "b", "c"], [12, 0, 40])
    assert inliers.load_inliers(store, {"q": ["a", "b", "c"]}) == {"q": {"a": 12, "b": 0, "c": 40}}
    store.path("q").unlink()
    assert inliers.read_counts(store, "q") is None
