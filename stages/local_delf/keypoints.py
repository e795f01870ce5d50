"""Dense-feature keypoint selection in the DELF recipe (pure NumPy).

Noh et al., "Large-Scale Image Retrieval with Attentive Deep Local Features", ICCV 2017;
tensorflow/models research/delf ``feature_extractor.py``: every feature-map cell at every
pyramid scale is a candidate keypoint located at its receptive-field centre; candidates
are ranked by a score (learned attention, or the feature norm without a trained head) and
the best `max_num` across all scales are kept (DELF's NMS uses IoU 1.0, i.e. none).
"""

import numpy as np

from stages.common.backbone.efficientnet_lite import feature_centers

from .geometry import rescale_points


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
    cy = feature_centers(input_hw[0], layers)[:h]
    cx = feature_centers(input_hw[1], layers)[:w]
    gx, gy = np.meshgrid(cx, cy)
    xy = rescale_points(np.stack([gx.ravel(), gy.ravel()], axis=-1), scale_xy)
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
    merged = {k: np.concatenate([c[k] for c in candidates]) for k in keys}
    keep = np.argsort(-merged["scores"], kind="stable")
    if score_threshold is not None:
        keep = keep[merged["scores"][keep] >= score_threshold]
    keep = keep[:max_num]
    return {k: v[keep] for k, v in merged.items()}
