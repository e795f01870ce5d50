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
for homography, 2 for similarity) has 0 inliers: such a fit verifies nothing. A failed
estimation (OpenCV returns no model, scikit-image a falsy ``FailedEstimation``, either
raises on degenerate input) is 0 inliers too. An affine fit that fails because every match
lies on one line (a one-row strip of keypoints) falls back to a similarity (4 degrees of
freedom, determined by two points), so that an image still verifies against its own copy.
"""

import warnings

import cv2
import numpy as np

BACKENDS = ("opencv", "skimage")
MIN_SAMPLES = {"affine": 3, "homography": 4, "similarity": 2}


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
    threshold, iters, confidence = float(conf["threshold"]), int(conf["max_iters"]), float(conf["confidence"])
    try:
        if conf["model"] == "affine":
            model, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold,
                                               maxIters=iters, confidence=confidence,
                                               refineIters=int(conf["refine_iters"]))
        elif conf["model"] == "similarity":
            model, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=threshold,
                                                      maxIters=iters, confidence=confidence,
                                                      refineIters=int(conf["refine_iters"]))
        else:
            model, mask = cv2.findHomography(src, dst, cv2.RANSAC, threshold, maxIters=iters, confidence=confidence)
    except cv2.error:  # degenerate input OpenCV refuses instead of failing softly
        model, mask = None, None
    inliers = np.zeros(len(perm), bool)
    if model is None or mask is None or not np.all(np.isfinite(model)):
        return None, inliers
    inliers[perm] = mask.ravel().astype(bool)
    if model.shape == (2, 3):
        model = np.vstack([model, [0.0, 0.0, 1.0]])
    return model.astype(np.float64), inliers


def _fit_skimage(pts_q: np.ndarray, pts_r: np.ndarray, conf: dict) -> tuple[np.ndarray | None, np.ndarray]:
    from skimage.measure import ransac
    from skimage.transform import AffineTransform, ProjectiveTransform, SimilarityTransform

    model_class = {"affine": AffineTransform, "homography": ProjectiveTransform,
                   "similarity": SimilarityTransform}[conf["model"]]
    failed = None, np.zeros(len(pts_q), bool)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "No inliers found" on hopeless pairs
        try:
            model, inliers = ransac(
                (np.asarray(pts_q, np.float64), np.asarray(pts_r, np.float64)), model_class,
                min_samples=MIN_SAMPLES[conf["model"]], residual_threshold=float(conf["threshold"]),
                max_trials=int(conf["max_iters"]), rng=int(conf["seed"]))
        except (ValueError, np.linalg.LinAlgError):
            return failed
    # scikit-image >= 0.26 reports a failed estimation by a falsy FailedEstimation object,
    # whose attributes raise; older releases return None.
    if model is None or not model or inliers is None:
        return failed
    params = np.asarray(model.params, np.float64)
    if not np.all(np.isfinite(params)):
        return failed
    return params, np.asarray(inliers, bool)


def fit(pts_q: np.ndarray, pts_r: np.ndarray, conf: dict) -> tuple[np.ndarray | None, np.ndarray]:
    """Robustly fits the transform mapping query points to reference points.

    Args:
        pts_q: float [M, 2] query keypoints of the matches, (x, y) in original query pixels.
        pts_r: float [M, 2] matched reference keypoints, (x, y) in original reference pixels.
        conf: {"backend": "opencv" | "skimage", "model": "affine" | "homography" | "similarity",
            "threshold": reprojection error bound in pixels (reference image), "max_iters":
            RANSAC iterations (skimage: exactly this many trials), "confidence": OpenCV's
            early-stop confidence, "refine_iters": OpenCV affine Levenberg-Marquardt
            refinement iterations (0: none; it does not change the inlier mask),
            "seed": int}.

    Returns:
        (model float64 [3, 3] mapping homogeneous query (x, y, 1) to reference, or None
        when no model was found or the estimation failed; inlier mask bool [M], all False
        then). With M <= the minimal sample (3 affine, 4 homography, 2 similarity) no model
        is fitted. An affine fit whose points are collinear is replaced by a similarity
        fit (see the module docstring).

    Raises:
        ValueError: unknown backend or model, or point arrays of different shapes.
    """
    _check(conf)
    pts_q, pts_r = np.asarray(pts_q), np.asarray(pts_r)
    if pts_q.shape != pts_r.shape or (len(pts_q) and (pts_q.ndim != 2 or pts_q.shape[1] != 2)):
        raise ValueError(f"point arrays must both be [M, 2], got {pts_q.shape} and {pts_r.shape}")
    if len(pts_q) <= MIN_SAMPLES[conf["model"]]:
        return None, np.zeros(len(pts_q), bool)
    fit_backend = _fit_opencv if conf["backend"] == "opencv" else _fit_skimage
    model, inliers = fit_backend(pts_q, pts_r, conf)
    if conf["model"] == "affine" and (model is None or _collinear(pts_q[inliers]) or _collinear(pts_r[inliers])):
        similar, similar_inliers = fit_backend(pts_q, pts_r, {**conf, "model": "similarity"})
        if similar is not None and similar_inliers.sum() > (0 if model is None else inliers.sum()) * 0.99:
            return similar, similar_inliers
    return model, inliers


def _collinear(pts: np.ndarray) -> bool:
    """Whether points lie on one line (an affine fit of them is not determined)."""
    if len(pts) < 3:
        return True
    centred = np.asarray(pts, np.float64) - np.mean(pts, axis=0)
    sv = np.linalg.svd(centred, compute_uv=False)
    return bool(sv[1] <= 1e-6 * max(sv[0], 1e-12))


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


def degeneracy(model: np.ndarray | None, pts_q: np.ndarray, pts_r: np.ndarray, inliers: np.ndarray,
               all_q: np.ndarray, all_r: np.ndarray, checks: dict) -> str | None:
    """Why a fitted model does not verify the pair, or None when it is plausible.

    A product seen in two photos maps by a transform of bounded scale change and shear,
    without a mirror, and its inliers cover an area of both images. Fits that break this
    are the common false verifications: blank or repetitive cells matched at the same grid
    positions (identity fits), inliers on one edge or line of text, a tiny patch. Such
    models count as unverified (0 inliers) instead of by their inliers.

    Args:
        model: float [3, 3] from `fit` (query -> reference), or None.
        pts_q, pts_r: float [M, 2] matched points, (x, y) in the units `model` maps.
        inliers: bool [M] the model's inlier mask.
        all_q, all_r: float [N, 2] every keypoint of each image (of the matched rotation
            group), which the inliers' spread is measured against.
        checks: {"identity": largest deviation of the model from the identity (linear
            part and translation, in the units of the points) that counts as an exact
            identity, "identity_ratio": the share of the smaller image's keypoints that
            must be inliers for an exact identity to count (a copy of the image),
            "max_scale": largest scale change along any axis (>= 1),
            "max_anisotropy": largest ratio of the two axis scales, "min_spread": smallest
            ratio of the inliers' extent to the keypoints' extent along the inliers'
            thinnest direction, in each image}.

    Returns:
        A short reason ("no model", "few points": fewer than 4 distinct inlier locations in
        an image, "identity", "mirrored", "scale", "shear", "spread"), or None.
    """
    if model is None or not inliers.any():
        return "no model"
    if min(_distinct(pts_q[inliers]), _distinct(pts_r[inliers])) < 4:
        return "few points"
    # An exact identity: two products pasted at the same place of same-size canvases, or
    # blank cells at the same grid positions, match along outlines and edges. Two photos
    # of one product are never framed alike to the pixel; a copy of one image is, but then
    # most of its keypoints are inliers.
    deviation = np.abs(np.asarray(model, np.float64)[:2] / model[2, 2] - np.eye(3)[:2]).max()
    if deviation <= checks["identity"] and inliers.sum() < checks["identity_ratio"] * min(len(all_q),
                                                                                          len(all_r)):
        return "identity"
    linear = np.asarray(model, np.float64)[:2, :2] / (model[2, 2] if model[2, 2] != 0 else 1.0)
    if np.linalg.det(linear) <= 0:
        return "mirrored"
    sv = np.linalg.svd(linear, compute_uv=False)
    if sv[0] > checks["max_scale"] or sv[1] < 1.0 / checks["max_scale"]:
        return "scale"
    if sv[0] > checks["max_anisotropy"] * sv[1]:
        return "shear"
    if min(_spread(pts_q[inliers], all_q), _spread(pts_r[inliers], all_r)) < checks["min_spread"]:
        return "spread"
    return None


def _distinct(pts: np.ndarray) -> int:
    """Number of distinct locations (to 1e-4 of the image side) among points."""
    return len(np.unique(np.round(np.asarray(pts, np.float64) * 1e4), axis=0))


def _spread(inliers: np.ndarray, every: np.ndarray) -> float:
    """Extent of `inliers` along their thinnest direction over the extent of `every` point
    along the same direction (1 where `every` has no extent there: a one-row strip)."""
    if len(inliers) < 3:
        return 0.0
    values, axes = np.linalg.eigh(np.cov(np.asarray(inliers, np.float64).T))
    thin = axes[:, 0]
    whole = float(thin @ np.cov(np.asarray(every, np.float64).T) @ thin)
    if whole <= 1e-12:
        return 1.0
    return float(np.sqrt(max(values[0], 0.0) / whole))
