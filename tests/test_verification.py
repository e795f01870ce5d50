"""Geometric verification that means something: degenerate inputs, blank regions, any
resolution and orientation, plausible models only, and the calibrated merge."""

import cv2
import numpy as np
import pytest

from stages.common.conf import resolve
from stages.local_delf import extract as local_extract
from stages.local_delf.backends import DenseLite0
from stages.rerank import calibrate, merge, ransac, verify

RANSAC = {"backend": "opencv", "model": "affine", "threshold": 0.04, "max_iters": 1000, "confidence": 0.999999,
          "refine_iters": 0, "seed": 0}
CHECKS = verify.default_conf["checks"]
VERIFIED = calibrate.DEFAULT["min_inliers"]  # "counted as verified" without a fitted calibration


def photo(name: str, side: int = 400) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    image = np.ascontiguousarray(image[..., :3])
    scale = side / max(image.shape[:2])
    return cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)


def reencode(rgb: np.ndarray, quality: int = 60) -> np.ndarray:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.cvtColor(cv2.imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def camera_view(rgb: np.ndarray, seed: int = 0, strength: float = 0.08) -> np.ndarray:
    """A photo of a printed image from another angle: perspective, brightness, on grey."""
    rng = np.random.default_rng(seed)
    h, w = rgb.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    dst = (src + rng.uniform(-strength, strength, (4, 2)) * [w, h] + [w * 0.1, h * 0.1]).astype(np.float32)
    out = cv2.warpPerspective(rgb, cv2.getPerspectiveTransform(src, dst), (int(w * 1.2), int(h * 1.2)),
                              borderValue=(120, 120, 120))
    return cv2.convertScaleAbs(out, alpha=1.1, beta=-10)


@pytest.fixture(scope="module")
def local_conf():
    return resolve(local_extract.default_conf, local_extract.confs, "delf-lite0")


@pytest.fixture(scope="module")
def backend(local_conf, weights_cache):
    return DenseLite0(local_conf, weights_cache)


@pytest.fixture(scope="module")
def describe(backend, local_conf):
    """uint8 RGB -> stage-2 entry (queries at every conf rotation, references upright), with a
    PCA learned on a few photos, as stage 2 does."""
    sample = [local_extract._describe_raw(backend, photo(n), [0]) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    from stages.common.pca import learn_pca_whitening

    pca = learn_pca_whitening(np.concatenate([s["descriptors"] for s in sample]), 40, shrinkage=1.0)

    def run(rgb, query=False):
        rotations = local_conf["query_rotations"] if query else [0]
        return local_extract.describe(backend, rgb, rotations, pca, local_conf["rotated_scales"])

    return run


def inliers(describe, query_rgb, ref_rgb) -> int:
    conf = resolve(verify.default_conf, verify.confs, "mnn-affine-opencv")
    return verify.verify_pair(describe(query_rgb, query=True), describe(ref_rgb), conf)


# --- RANSAC on degenerate input -----------------------------------------------------------

def degenerate_inputs():
    rng = np.random.default_rng(0)
    line = np.stack([np.linspace(0.1, 0.9, 12), np.full(12, 0.5)], 1)
    cases = {f"{m}_points": (p := rng.uniform(0, 1, (m, 2)), p * 0.9 + 0.05) for m in range(6)}
    cases["collinear"] = (line, line * 0.8 + 0.1)
    cases["duplicates"] = (np.full((15, 2), 0.3), np.full((15, 2), 0.6))
    cases["two_points_repeated"] = (np.repeat([[0.2, 0.2], [0.7, 0.7]], 8, 0),
                                    np.repeat([[0.3, 0.1], [0.6, 0.9]], 8, 0))
    cases["nan"] = (np.full((8, 2), np.nan), np.full((8, 2), 0.5))
    return cases


@pytest.mark.parametrize("backend_name", ransac.BACKENDS)
@pytest.mark.parametrize("model", ["affine", "homography", "similarity"])
@pytest.mark.parametrize("case", sorted(degenerate_inputs()))
def test_failed_estimation_is_zero_inliers_on_every_backend(backend_name, model, case):
    pts_q, pts_r = degenerate_inputs()[case]
    conf = {**RANSAC, "backend": backend_name, "model": model}
    fitted, mask = ransac.fit(pts_q, pts_r, conf)
    assert mask.dtype == bool and mask.shape == (len(pts_q),)
    if case in ("duplicates", "two_points_repeated", "nan") or len(pts_q) <= ransac.MIN_SAMPLES[model]:
        # nothing determines a model: no fit, or one that the plausibility checks refuse
        assert fitted is None or ransac.degeneracy(fitted, pts_q, pts_r, mask, pts_q, pts_r, CHECKS) is not None


@pytest.mark.parametrize("backend_name", ransac.BACKENDS)
def test_collinear_inliers_verify_only_when_the_image_itself_is_a_strip(backend_name):
    x = np.linspace(0.05, 0.95, 30)
    strip = np.stack([x, np.full_like(x, 0.02)], 1)  # a one-row strip image: every keypoint on the line
    seen = strip * 0.5 + [0.3, 0.4]  # the strip in another photo, smaller
    model, mask = ransac.fit(strip, seen, {**RANSAC, "backend": backend_name})
    assert model is not None and mask.all()
    assert ransac.degeneracy(model, strip, seen, mask, strip, seen, CHECKS) is None
    # the same line of matches inside images whose keypoints cover the whole area
    everywhere = np.random.default_rng(0).uniform(0, 1, (300, 2))
    assert ransac.degeneracy(model, strip, seen, mask, everywhere, everywhere, CHECKS) == "spread"


def test_implausible_models_are_named():
    pts = np.random.default_rng(0).uniform(0, 1, (50, 2))
    every = np.ones(50, bool)

    def reason(linear):
        model = np.eye(3)
        model[:2, :2] = linear
        return ransac.degeneracy(model, pts, pts @ np.asarray(linear).T, every, pts, pts @ np.asarray(linear).T,
                                 CHECKS)

    assert reason(np.eye(2)) is None
    assert reason([[0.8, 0.3], [-0.2, 1.1]]) is None
    assert reason([[-1.0, 0.0], [0.0, 1.0]]) == "mirrored"
    assert reason(np.eye(2) * 20) == "scale"
    assert reason([[4.0, 0.0], [0.0, 0.3]]) == "shear"
    patch = pts * 0.02 + 0.5  # every inlier in 2% of the image
    shifted = np.array([[1.0, 0, 0.1], [0, 1.0, 0], [0, 0, 1]])
    assert ransac.degeneracy(shifted, patch, patch + [0.1, 0], every, pts, pts, CHECKS) == "spread"
    # the exact identity, unless most keypoints are inliers (a copy)
    assert ransac.degeneracy(np.eye(3), pts[:10], pts[:10], every[:10], pts, pts, CHECKS) == "identity"
    assert ransac.degeneracy(np.eye(3), pts, pts, every, pts, pts, CHECKS) is None
    assert ransac.degeneracy(None, pts, pts, every, pts, pts, CHECKS) == "no model"


# --- real images through stages 2 and 3 ----------------------------------------------------

@pytest.mark.parametrize("name,crop", [("astronaut", None), ("text", (slice(60, 83), slice(0, 502))),
                                       ("coffee", (slice(100, 164), slice(200, 264)))])
def test_an_identical_or_reencoded_copy_always_verifies(describe, name, crop):
    from skimage import data

    image = getattr(data, name)()
    image = np.stack([image] * 3, -1) if image.ndim == 2 else np.ascontiguousarray(image[..., :3])
    if crop:
        image = np.ascontiguousarray(image[crop])
    assert inliers(describe, image, image) > VERIFIED
    assert inliers(describe, reencode(image), image) > VERIFIED


def test_blank_and_plain_images_verify_nothing(describe):
    black, white = np.zeros((480, 640, 3), np.uint8), np.full((480, 640, 3), 255, np.uint8)
    grey = np.full((400, 400, 3), 128, np.uint8)
    assert describe(black, query=True)["keypoints_xy"].shape == (0, 2)
    assert inliers(describe, black, white) == 0
    assert inliers(describe, grey, photo("coffee")) == 0


def on_white_canvas(rgb: np.ndarray, size=(800, 1000), at=(100, 150)) -> np.ndarray:
    canvas = np.full(size + (3,), 255, np.uint8)
    h, w = rgb.shape[:2]
    canvas[at[0]:at[0] + h, at[1]:at[1] + w] = rgb
    return canvas


def test_unrelated_products_on_the_same_white_canvas_do_not_verify(describe):
    names = ["astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field"]
    shots = {n: on_white_canvas(photo(n, 300)) for n in names}
    for a in names:
        for b in names:
            if a != b:
                assert inliers(describe, shots[a], shots[b]) <= VERIFIED, (a, b)
    assert inliers(describe, camera_view(shots["coffee"]), shots["coffee"]) > VERIFIED


def test_the_decision_does_not_depend_on_the_file_resolution(describe):
    cover = photo("astronaut", 500)[:, 50:449]  # 399 x 500, like a DVD cover scan
    big = cv2.resize(cover, None, fx=6, fy=6, interpolation=cv2.INTER_CUBIC)  # 2394 x 3000
    query = camera_view(cover, seed=1)
    small_n, big_n = inliers(describe, query, cover), inliers(describe, query, big)
    assert small_n > VERIFIED and big_n > VERIFIED
    assert abs(small_n - big_n) <= 0.25 * max(small_n, big_n)
    unrelated = camera_view(photo("coffee", 500), seed=1)
    assert inliers(describe, unrelated, cover) <= VERIFIED and inliers(describe, unrelated, big) <= VERIFIED


@pytest.mark.parametrize("degrees", [0, 90, 180, 270])
def test_a_query_in_any_orientation_verifies(describe, degrees):
    cover = photo("astronaut", 500)
    query = np.ascontiguousarray(np.rot90(camera_view(cover, seed=2), k=degrees // 90))
    assert inliers(describe, query, cover) > VERIFIED


# --- calibration and the calibrated merge ---------------------------------------------------

def test_calibration_learns_how_much_inliers_say():
    rng = np.random.default_rng(0)
    n = 400
    same = rng.random(n) < 0.3
    global_scores = np.where(same, rng.normal(0.5, 0.1, n), rng.normal(0.4, 0.1, n))
    inliers_ = np.where(same, rng.integers(40, 200, n), rng.integers(0, 30, n))
    fitted = calibrate.fit(global_scores, inliers_, same)
    assert fitted["w_verify"] > 0 and fitted["w_global"] > 0
    assert 5 <= fitted["min_inliers"] <= 40  # the chance level of the unrelated pairs
    p = calibrate.probability(fitted, np.array([0.4, 0.4]), np.array([10, 120]))
    assert p[1] > 0.9 > 0.5 > p[0]
    # verification that carries no information gets (almost) no weight
    noise = rng.integers(0, 60, n)
    blind = calibrate.fit(global_scores, noise, same)
    assert abs(blind["w_verify"]) < 0.3 * fitted["w_verify"]


def test_calibration_never_lets_the_probability_fall_with_the_global_score():
    # Training pairs sampled as hard negatives: the other-class pairs are the most similar
    # ones, so an unconstrained fit gives the global score a negative weight, which would
    # put every query's best unverified global match last (seen on bench_scale.py's set).
    rng = np.random.default_rng(1)
    n = 600
    same = rng.random(n) < 0.2
    global_scores = np.where(same, rng.normal(0.45, 0.08, n), rng.normal(0.6, 0.08, n))
    inliers_ = np.where(same, rng.integers(20, 150, n), rng.integers(0, 25, n))
    x = calibrate.features(global_scores, inliers_, 20.0)
    unconstrained, _ = calibrate._fit_logistic(x, same.astype(float), 1.0)
    assert unconstrained[0] < 0  # the case this guards against
    fitted = calibrate.fit(global_scores, inliers_, same)
    assert fitted["w_global"] == 0.0 and fitted["w_verify"] > 0
    order = np.array([[3, 1, 0, 2]])
    scores = np.array([[0.9, 0.8, 0.7, 0.6]])
    # nothing verified: the global order stays
    assert merge.rerank(order, scores, np.zeros((1, 4)), 4, "calibrated", calibration=fitted).tolist() == [
        [3, 1, 0, 2]]
    # a well verified reference moves up; the unverified ones keep their global order
    out = merge.rerank(order, scores, np.array([[0, 0, 0, 120]]), 4, "calibrated", calibration=fitted)
    assert out.tolist() == [[2, 3, 1, 0]]


def test_calibration_without_enough_pairs_is_the_documented_default():
    fitted = calibrate.fit([0.5, 0.4, 0.3], [50, 10, 0], [True, False, False])
    assert {k: fitted[k] for k in calibrate.DEFAULT} == calibrate.DEFAULT


def test_calibrated_merge_hand_computed():
    calibration = {"w_global": 1.0, "w_verify": 2.0, "min_inliers": 10.0, "bias": 0.0}
    order = np.array([[0, 1, 2, 3]])
    scores = np.array([[0.9, 0.8, 0.7, -np.inf]])
    # logits: 0.9 + 2 * max(0, log(1 + 5) - log(11)) = 0.9; 0.8 + 0 = 0.8;
    # 0.7 + 2 * (log(61) - log(11)) = 4.13; the unreadable reference (-inf) stays last.
    counts = np.array([[5, 10, 60, 500]])
    out = merge.rerank(order, scores, counts, 4, "calibrated", calibration=calibration)
    assert out.tolist() == [[2, 0, 1, 3]]
    # no inliers anywhere: the global order
    assert merge.rerank(order, scores, np.zeros((1, 4)), 4, "calibrated", calibration=calibration).tolist() == [
        [0, 1, 2, 3]]
