"""Synthetic local-feature pairs with a known transform, for tests and the RANSAC benchmark.

RootSIFT (OpenCV SIFT, L1-normalised, square-rooted: unit L2 rows) on scikit-image photos
and on their warps, in the stage-2 feature-store format.
"""

import cv2
import numpy as np

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "camera", "immunohistochemistry")


def photo_gray(name: str, side: int = 512) -> np.ndarray:
    """A scikit-image photo as uint8 grayscale [H, W], resized so its longer side is `side`."""
    from skimage import data

    image = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    if image.ndim == 3:
        image = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_RGB2GRAY)
    scale = side / max(image.shape)
    if scale != 1:
        interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=interpolation)
    return np.ascontiguousarray(image)


def rootsift(gray: np.ndarray, n_features: int = 1000, contrast_threshold: float = 0.02) -> dict[str, np.ndarray]:
    """RootSIFT features of an image, as a stage-2 feature-store entry.

    Args:
        gray: uint8 [H, W].
        n_features: at most this many keypoints (the strongest).
        contrast_threshold: SIFT's (OpenCV default 0.04; lower finds more keypoints).

    Returns:
        {"keypoints_xy": float32 [N, 2] (x, y) pixels, "descriptors": float16 [N, 128] unit
        L2 rows, "scores": float32 [N], "scales": float32 [N], "rotations": int16 [N] zeros,
        "image_size": int32 [2] (width, height)}.
    """
    sift = cv2.SIFT_create(nfeatures=n_features, contrastThreshold=contrast_threshold)
    keypoints, desc = sift.detectAndCompute(gray, None)
    keypoints = keypoints[:n_features]
    n = len(keypoints)
    desc = np.zeros((0, 128), np.float32) if desc is None else desc[:n].astype(np.float32)
    desc = np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-12))
    return {
        "keypoints_xy": np.array([k.pt for k in keypoints], np.float32).reshape(n, 2),
        "descriptors": desc.astype(np.float16),
        "scores": np.array([k.response for k in keypoints], np.float32),
        "scales": np.array([k.size for k in keypoints], np.float32),
        "rotations": np.zeros(n, np.int16),
        "image_size": np.array([gray.shape[1], gray.shape[0]], np.int32),
    }


def random_homography(width: int, height: int, rng: np.random.Generator, strength: float = 0.15) -> np.ndarray:
    """A camera-like perspective change: each image corner moved by up to `strength` times
    the image size. Returns float64 [3, 3] mapping original (x, y, 1) to warped pixels."""
    src = np.float32([[0, 0], [width, 0], [width, height], [0, height]])
    dst = (src + rng.uniform(-strength, strength, (4, 2)) * [width, height]).astype(np.float32)
    return cv2.getPerspectiveTransform(src, dst).astype(np.float64)


def warp(gray: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Warps an image by float [3, 3] (or affine [2, 3]) `matrix` into a same-size frame."""
    h, w = gray.shape[:2]
    if matrix.shape == (2, 3) or np.allclose(matrix[2], [0, 0, 1]):
        return cv2.warpAffine(gray, np.asarray(matrix[:2], np.float64), (w, h))
    return cv2.warpPerspective(gray, np.asarray(matrix, np.float64), (w, h))
