"""Keypoint geometry: feature-map cells to image pixels, and undoing query rotations.

Pixel convention everywhere: (x, y) with pixel centres at integer coordinates, origin at
the top-left pixel of the original (EXIF-oriented, full-resolution) image.
"""

import numpy as np


def rescale_points(xy: np.ndarray, scale_xy) -> np.ndarray:
    """Maps (x, y) points of an image resized by `scale_xy` = (sx, sy) (new / old size)
    back to the old image: old = (new + 0.5) / s - 0.5 (pixel centres stay centres).

    Args:
        xy: float [N, 2] points in the resized image.
        scale_xy: (sx, sy) > 0.

    Returns:
        float32 [N, 2] points in the original image.
    """
    s = np.asarray(scale_xy, np.float64)
    return ((np.asarray(xy, np.float64) + 0.5) / s - 0.5).astype(np.float32)


def rotate_image(image: np.ndarray, degrees: int) -> np.ndarray:
    """Rotates counter-clockwise by 0, 90, 180 or 270 degrees (no interpolation).

    Raises:
        ValueError: any other angle.
    """
    if degrees % 90:
        raise ValueError(f"rotation must be a multiple of 90 degrees, got {degrees}")
    return np.ascontiguousarray(np.rot90(image, k=(degrees // 90) % 4))


def unrotate_points(xy: np.ndarray, degrees: int, size_wh) -> np.ndarray:
    """Maps (x, y) points found in `rotate_image(image, degrees)` back to `image`.

    Args:
        xy: float [N, 2] points in the rotated image.
        degrees: the counter-clockwise rotation that was applied (multiple of 90).
        size_wh: (width, height) of the ORIGINAL, unrotated image.

    Returns:
        float32 [N, 2] points in the original image.
    """
    w, h = size_wh
    x, y = np.asarray(xy, np.float64).T
    k = (degrees // 90) % 4
    if k == 0:
        ox, oy = x, y
    elif k == 1:  # np.rot90 once: rotated[r, c] = original[c, w - 1 - r]
        ox, oy = w - 1 - y, x
    elif k == 2:
        ox, oy = w - 1 - x, h - 1 - y
    else:  # rotated[r, c] = original[h - 1 - c, r]
        ox, oy = y, h - 1 - x
    return np.stack([ox, oy], axis=-1).astype(np.float32).reshape(-1, 2)
