"""Dense-feature keypoint selection in the DELF recipe (NumPy, and OpenCV for the texture test).

Noh et al., "Large-Scale Image Retrieval with Attentive Deep Local Features", ICCV 2017;
tensorflow/models research/delf ``feature_extractor.py``: every feature-map cell at every
pyramid scale is a candidate keypoint located at its receptive-field centre; candidates
are ranked by a score (learned attention, or the feature norm without a trained head) and
the best `max_num` across all scales are kept (DELF's NMS uses IoU 1.0, i.e. none).
"""

import cv2
import numpy as np

from stages.common.backbone.efficientnet_lite import feature_centers

from .geometry import rescale_points

# Gray level (0-255) at and above which a flat patch is blank white: a catalogue shot's
# background, not the cream or light grey of a printed design (smvs_dvd covers lost their
# matches at 240).
BLANK_LEVEL = 250
# Blank patches are background only where, connected to the image border, they cover at
# least this share of the image: the white surround of a product shot, not the thin white
# margin of a cover scan or a white area of a design.
MIN_BACKGROUND = 0.2


def texture_fractions(rgb: np.ndarray, centers_xy: np.ndarray, window: int, contrast: float,
                      patch: int = 9, enlarged: float = 1.0, blank_window: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """How much of the `window` x `window` square around each point is textured, and how
    much is blank background.

    A `patch` x `patch` neighbourhood is textured when its gray levels have a standard
    deviation of at least `contrast`, and background when it is flat and white (mean gray
    level >= `BLANK_LEVEL`) and part of a white area connected to the image border that
    covers at least `MIN_BACKGROUND` of the image, as the surround of a catalogue shot is. A keypoint
    on a textureless region (a white background, a black frame, a wall) has a low textured
    fraction; one on the outline of a product shot on white has a large blank fraction, and
    its descriptor, which mostly sees "an edge against white", matches the outline of any
    other product. Lowe rejects low-contrast keypoints ("Distinctive Image Features from
    Scale-Invariant Keypoints", IJCV 2004, section 4); DELF's learned attention scores them
    low, which the untrained feature norm does not.

    Args:
        rgb: uint8 [h, w, 3], the network input at one pyramid level.
        centers_xy: float [N, 2] (x, y) points in `rgb`'s pixels.
        window: side of the square in pixels (odd).
        contrast: gray-level standard deviation (0-255) that counts as texture.
        patch: side of the neighbourhood the standard deviation is taken over (odd), in
            pixels of the image file.
        enlarged: how much `rgb` is enlarged from the file (>= 1): an enlarged image is
            smooth at its own pixel scale, so the patch grows with it (up to `window`).
        blank_window: side of the square the blank fraction is measured over (default
            `window`; a descriptor sees farther than its cell).

    Returns:
        (textured fraction float32 [N], blank fraction float32 [N]), each in [0, 1].
    """
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)
    patch = min(window, int(round(patch * max(enlarged, 1.0))) | 1)
    mean = cv2.boxFilter(gray, -1, (patch, patch), borderType=cv2.BORDER_REFLECT)
    mean_sq = cv2.boxFilter(gray * gray, -1, (patch, patch), borderType=cv2.BORDER_REFLECT)
    textured = mean_sq - mean * mean >= contrast * contrast
    blank = _background(~textured & (mean >= BLANK_LEVEL))
    h, w = gray.shape
    x = np.clip(np.round(centers_xy[:, 0]), 0, w - 1).astype(np.int64)
    y = np.clip(np.round(centers_xy[:, 1]), 0, h - 1).astype(np.int64)
    side = blank_window or window
    return (cv2.boxFilter(textured.astype(np.float32), -1, (window, window), borderType=cv2.BORDER_REFLECT)[y, x],
            cv2.boxFilter(blank.astype(np.float32), -1, (side, side), borderType=cv2.BORDER_REFLECT)[y, x])


def _background(blank: np.ndarray) -> np.ndarray:
    """The blank pixels connected to the image border, when they cover `MIN_BACKGROUND` of
    the image; none otherwise."""
    _, labels = cv2.connectedComponents(blank.astype(np.uint8), connectivity=4)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, edge[edge > 0])
    return background if background.mean() >= MIN_BACKGROUND else np.zeros_like(blank)


def cell_centers(map_hw, layers, input_hw) -> np.ndarray:
    """(x, y) receptive-field centres, in input pixels, of every cell of an [h, w] map,
    row by row: float32 [h*w, 2]."""
    cy = feature_centers(input_hw[0], layers)[:map_hw[0]]
    cx = feature_centers(input_hw[1], layers)[:map_hw[1]]
    gx, gy = np.meshgrid(cx, cy)
    return np.stack([gx.ravel(), gy.ravel()], axis=-1).astype(np.float32)


def dense_candidates(feature_map: np.ndarray, scores: np.ndarray, layers, input_hw, scale_xy):
    """All cells of one pyramid level as keypoint candidates.

    Args:
        feature_map: float [h, w, C] descriptors of one image scale.
        scores: float [h, w] keypoint score of each cell.
        layers: (kernel, stride) of the strided layers that made the map (receptive-field
            centres follow TF "SAME" padding, see `feature_centers`).
        input_hw: (height, width) in pixels of the network input at this scale.
        scale_xy: (sx, sy) size of that input over the original image size.

    Returns:
        (keypoints_xy float32 [h*w, 2] in original-image pixels, descriptors float32
        [h*w, C], scores float32 [h*w]).
    """
    h, w, c = feature_map.shape
    # With "SAME" padding the last cell's centre can fall past the border; it describes
    # the pixels at the border.
    original_wh = np.array([input_hw[1] / scale_xy[0], input_hw[0] / scale_xy[1]])
    xy = np.clip(rescale_points(cell_centers((h, w), layers, input_hw), scale_xy), 0,
                 np.round(original_wh) - 1).astype(np.float32)
    return xy, feature_map.reshape(-1, c).astype(np.float32), scores.reshape(-1).astype(np.float32)


def select_top(candidates: list[dict], max_num: int, score_threshold: float | None = None) -> dict:
    """Keeps the `max_num` best-scoring candidates across pyramid levels.

    Args:
        candidates: per level {"keypoints_xy" [n, 2], "descriptors" [n, C], "scores" [n],
            "scales" [n]}; levels may be empty.
        max_num: keypoints to keep at most.
        score_threshold: drop candidates scoring below it first (DELF uses 100 on its
            attention scores); None keeps all.

    Returns:
        The same keys, concatenated and sorted by descending score, at most `max_num` rows.
    """
    keys = ("keypoints_xy", "descriptors", "scores", "scales")
    if not candidates:
        return {"keypoints_xy": np.zeros((0, 2), np.float32), "descriptors": np.zeros((0, 0), np.float32),
                "scores": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32)}
    if score_threshold is not None:
        candidates = [{k: c[k][c["scores"] >= score_threshold] for k in keys} for c in candidates]
    merged = {k: np.concatenate([c[k] for c in candidates]) for k in keys}
    keep = np.argsort(-merged["scores"], kind="stable")[:max_num]
    return {k: v[keep] for k, v in merged.items()}
