"""Pooling and normalisation of CNN feature maps into global descriptors (pure NumPy)."""

import numpy as np

from stages.common.pca import l2_normalize


def gem(feature_map: np.ndarray, p: float = 3.0, eps: float = 1e-6) -> np.ndarray:
    """Generalized-mean (GeM) pooling over the spatial axes.

    Radenović, Tolias, Chum, "Fine-tuning CNN Image Retrieval with No Human Annotation",
    TPAMI 2018 (cirtorch ``layers/functional.py gem``): (mean(clamp(x, eps)^p))^(1/p).
    p = 1 is average pooling; p -> inf approaches max pooling.

    Args:
        feature_map: float [..., H, W, C] non-negative activations.
        p: the GeM power (> 0).
        eps: activations are clamped to at least eps before the power.

    Returns:
        float32 [..., C].
    """
    x = np.maximum(np.asarray(feature_map, dtype=np.float64), eps)
    return (np.mean(x ** p, axis=(-3, -2)) ** (1.0 / p)).astype(np.float32)


def combine_scales(descriptors: np.ndarray, p: float = 3.0) -> np.ndarray:
    """Merges per-scale L2-normalised descriptors into one, L2-normalised.

    As cirtorch ``extract_ms``: the generalized mean (power p) of the per-scale vectors.

    Args:
        descriptors: float [S, D], one row per image scale.
        p: power of the mean; 1 averages.

    Returns:
        float32 [D], unit L2 norm.
    """
    x = np.maximum(np.asarray(descriptors, dtype=np.float64), 0.0) if p != 1 else np.asarray(descriptors, np.float64)
    return l2_normalize((np.mean(x ** p, axis=0) ** (1.0 / p)).astype(np.float32))
