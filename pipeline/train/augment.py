"""Training views of product photos: random augmentation, the plain view, augmented batches."""

import math

import cv2
import numpy as np

from stages.common.backbone import efficientnet_lite as lite


def augment(rgb: np.ndarray, size: int, rng: np.random.Generator, conf: dict) -> np.ndarray:
    """One random training view of a product photo.

    A random resized crop (Szegedy et al., CVPR 2015) whose corners are jittered into a
    random perspective, done as one `cv2.warpPerspective`; then a random 90-degree rotation
    (phone photos of covers are often sideways), brightness / contrast / saturation
    jitter and a Gaussian blur (camera shake, defocus).

    Args:
        rgb: uint8 [H, W, 3].
        size: output side, pixels.
        rng: random generator.
        conf: the training conf (augmentation keys).

    Returns:
        uint8 [size, size, 3].
    """
    h, w = rgb.shape[:2]
    area = h * w * rng.uniform(*conf["crop_scale"])
    ratio = math.exp(rng.uniform(math.log(conf["crop_ratio"][0]), math.log(conf["crop_ratio"][1])))
    cw, ch = min(w, math.sqrt(area * ratio)), min(h, math.sqrt(area / ratio))
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    src = np.array([[x0, y0], [x0 + cw, y0], [x0 + cw, y0 + ch], [x0, y0 + ch]], np.float32)
    if rng.random() < conf["perspective_prob"]:
        src += (rng.uniform(-1, 1, (4, 2)) * conf["perspective"] * np.array([cw, ch])).astype(np.float32)
    dst = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float32)
    # Shrinking by more than 2x with bilinear sampling aliases; pre-blur the source.
    shrink = min(cw, ch) / size
    if shrink > 2:
        rgb = cv2.GaussianBlur(rgb, (0, 0), 0.5 * shrink)
    out = cv2.warpPerspective(rgb, cv2.getPerspectiveTransform(src, dst), (size, size),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    if rng.random() < conf["rotate90_prob"]:
        out = np.rot90(out, int(rng.integers(1, 4)))
    s = conf["color_jitter"]
    if s > 0:
        x = out.astype(np.float32)
        gray = x.mean(axis=2, keepdims=True)
        x = gray + (x - gray) * rng.uniform(1 - s, 1 + s)  # saturation
        x = x.mean() + (x - x.mean()) * rng.uniform(1 - s, 1 + s)  # contrast
        x = x * rng.uniform(1 - s, 1 + s)  # brightness
        out = np.clip(x, 0, 255).astype(np.uint8)
    if rng.random() < conf["blur_prob"]:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(*conf["blur_sigma"]))
    return np.ascontiguousarray(out)


def plain_view(rgb: np.ndarray, size: int) -> np.ndarray:
    """The whole image squeezed to [size, size, 3] (no augmentation)."""
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


def augmented_batch(images: list[np.ndarray], indices: np.ndarray, size: int, seed: int, conf: dict) -> np.ndarray:
    """Augmented views of ``images[indices]``, preprocessed for the backbone.

    Args:
        images: uint8 [H, W, 3] images.
        indices: int [B] positions in `images`.
        size: side of the views, pixels.
        seed: seeds the batch's random generator, so a batch is the same in every run.
        conf: the training conf (augmentation keys).

    Returns:
        float32 [B, size, size, 3].
    """
    rng = np.random.default_rng(seed)
    return lite.preprocess(np.stack([augment(images[i], size, rng, conf) for i in indices]))
