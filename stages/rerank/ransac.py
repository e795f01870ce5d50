"""Geometric verification of putative matches: RANSAC inlier counts, seeded.

Two backends fit the same models with the same threshold (in original-image pixels):

- "opencv" (default, fast): ``cv2.estimateAffine2D`` / ``cv2.findHomography`` with
  ``cv2.RANSAC``. OpenCV 5's RANSAC draws its samples from its own fixed-seed generator
  (``cv2.setRNGSeed`` has no effect on it, checked on opencv-python-headless 5.0.0.93), so
  a call is deterministic but ignores any seed; the conf seed is applied by a seeded
  shuffle of the matches before the call, which changes the samples drawn.
- "skimage" (reference): ``skimage.measure.ransac`` with ``AffineTransform`` (3 samples)
  or ``ProjectiveTransform`` (4 samples), seeded through ``rng``, as the DELF reference code
  (tensorflow/models research/delf ``examples/match_images.py``,
  ``detect_to_retrieve/image_reranking.py``). It runs all ``max_trials`` (no early stop),
  so it is far slower.

As in DELF, a pair with no more matches than the model's minimal sample (3 for affine, 4
for homography) has 0 inliers: such a fit verifies nothing.
"""

import warnings

import cv2
import numpy as np

BACKENDS = ("opencv", "skimage")
MIN_SAMPLES = {"affine": 3, "homography": 4}


def _check(conf: dict) -> None:
    if conf["backend"] not in BACKENDS:
        raise ValueError(f"unknown RANSAC backend {conf['backend']!r}; choose one of {BACKENDS}")
    if conf["model"] not in MIN_SAMPLES:
        raise ValueError(f"unknown RANSAC model {conf['model']!r}; choose one of {sorted(MIN_SAMPLES)}")


def _fit_opencv(pts_q: np.ndarray, pts_r: np.ndarray, conf: dict) -> tuple[np.ndarray | None, np.ndarray]:
    perm = np.random.default_rng(conf["seed"]).permutation(len(pts_q))
    src = np.ascontiguousarray(pts_q[perm], np.float32)
    dst = np.ascontiguousarray(pts_r[perm], np.float32)
    cv2.setRNGSeed(int(conf["seed"]))  # no effect in OpenCV 5.0 (see module docstring)
    if conf["model"] == "affine":
        model, mask = cv2.estimateAffine2D(
            src, dst, method=cv2.RANSAC, ransacReprojThreshold=float(conf["threshold"]),
            maxIters=int(conf["max_iters"]), confidence=float(conf["confidence"]),
            refineIters=int(conf["refine_iters"]))
    else:
        model, mask = cv2.findHomography(
            src, dst, cv2.RANSAC, float(conf["threshold"]), maxIters=int(conf["max_iters"]),
            confidence=float(conf["confidence"]))
    inliers = np.zeros(len(perm), bool)
    if model is None or mask is None:
        return None, inliers
    inliers[perm] = mask.ravel().astype(bool)
    if model.shape == (2, 3):
        model = np.vstack([model, [0.0, 0.0, 1.0]])
    return model.astype(np.float64), inliers


def _fit_skimage(pts_q: np.ndarray, pts_r: np.ndarray, conf: dict) -> tuple[np.ndarray | None, np.ndarray]:
    from skimage.measure import ransac
    from skimage.transform import AffineTransform, ProjectiveTransform

    model_class = AffineTransform if conf["model"] == "affine" else ProjectiveTransform
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No inliers found" on hopeless pairs
        model, inliers = ransac(
            (np.asarray(pts_q, np.float64), np.asarray(pts_r, np.float64)), model_class,
            min_samples=MIN_SAMPLES[conf["model"]], residual_threshold=float(conf["threshold"]),
            max_trials=int(conf["max_iters"]), rng=int(conf["seed"]))
    if model is None or inliers is None:
        return None, np.zeros(len(pts_q), bool)
    return np.asarray(model.params, np.float64), np.asarray(inliers, bool)


def fit(pts_q: np.ndarray, pts_r: np.ndarray, conf: dict) -> tuple[np.ndarray | None, np.ndarray]:
    """Robustly fits the transform mapping query points to reference points.

    Args:
        pts_q: float [M, 2] query keypoints of the matches, (x, y) in original query pixels.
        pts_r: float [M, 2] matched reference keypoints, (x, y) in original reference pixels.
        conf: {"backend": "opencv" | "skimage", "model": "affine" | "homography",
            "threshold": reprojection error bound in pixels (reference image), "max_iters":
            RANSAC iterations (skimage: exactly this many trials), "confidence": OpenCV's
            early-stop confidence, "refine_iters": OpenCV affine Levenberg-Marquardt
            refinement iterations (0: none; it does not change the inlier mask),
            "seed": int}.

    Returns:
        (model float64 [3, 3] mapping homogeneous query (x, y, 1) to reference, or None
        when no model was found; inlier mask bool [M]). With M <= the minimal sample
        (3 affine, 4 homography) no model is fitted and the mask is all False.

    Raises:
        ValueError: unknown backend or model, or point arrays of different shapes.
    """
    _check(conf)
    pts_q, pts_r = np.asarray(pts_q), np.asarray(pts_r)
    if pts_q.shape != pts_r.shape or (len(pts_q) and (pts_q.ndim != 2 or pts_q.shape[1] != 2)):
        raise ValueError(f"point arrays must both be [M, 2], got {pts_q.shape} and {pts_r.shape}")
    if len(pts_q) <= MIN_SAMPLES[conf["model"]]:
        return None, np.zeros(len(pts_q), bool)
    if conf["backend"] == "opencv":
        return _fit_opencv(pts_q, pts_r, conf)
    return _fit_skimage(pts_q, pts_r, conf)


def count_inliers(pts_q: np.ndarray, pts_r: np.ndarray, conf: dict) -> tuple[int, np.ndarray]:
    """Number of RANSAC inliers among putative matches (see `fit`).

    Args:
        pts_q: float [M, 2] query keypoints of the matches, (x, y) in original pixels.
        pts_r: float [M, 2] matched reference keypoints, (x, y) in original pixels.
        conf: the RANSAC conf (see `fit`).

    Returns:
        (n_inliers int, inlier mask bool [M]); (0, all False) for empty or too few matches.

    Raises:
        ValueError: unknown backend or model, or point arrays of different shapes.
    """
    _, inliers = fit(pts_q, pts_r, conf)
    return int(inliers.sum()), inliers
