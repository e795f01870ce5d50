"""PCA whitening and L2 normalisation of descriptors, shared by the global descriptor
(stage 1, whitening learned on the references) and the local descriptors (stage 2, PCA to
40-d as DELF does).

Jégou & Chum, "Negative evidences and co-occurrences in image retrieval", ECCV 2012; as
used after GeM in cirtorch (``utils/whiten.py pcawhitenlearn``): centre, rotate onto the
principal axes and scale each by 1 / sqrt(eigenvalue), keep the top `dim` axes, L2-normalise.
"""

import numpy as np


def l2_normalize(x: np.ndarray, axis: int = -1, eps: float = 1e-12) -> np.ndarray:
    """Divides by the L2 norm along `axis`; all-zero vectors stay zero. Returns float32."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), eps)


def learn_pca_whitening(x: np.ndarray, dim: int | None = None, shrinkage: float = 0.0) -> dict[str, np.ndarray]:
    """Learns PCA whitening.

    Args:
        x: float [N, D] descriptors (N >= 2).
        dim: output dimensionality (default min(N - 1, D)).
        shrinkage: eigenvalues are raised to the power -(1 - shrinkage) / 2 instead of
            -1/2; 0 is full whitening, 1 plain PCA rotation (a milder, safer whitening
            when N is small).

    Returns:
        {"mean": float32 [D], "projection": float32 [dim, D]}.

    Raises:
        ValueError: fewer than 2 descriptors.
    """
    x = np.asarray(x, dtype=np.float64)
    if len(x) < 2:
        raise ValueError("PCA whitening needs at least 2 descriptors")
    mean = x.mean(axis=0)
    xc = x - mean
    cov = xc.T @ xc / len(x)
    eigval, eigvec = np.linalg.eigh(cov)
    order = np.argsort(eigval)[::-1]
    dim = min(dim or (len(x) - 1), x.shape[1], len(x) - 1)
    eigval, eigvec = eigval[order[:dim]], eigvec[:, order[:dim]]
    scale = np.maximum(eigval, 1e-9 * eigval.max()) ** (-(1.0 - shrinkage) / 2.0)
    projection = (eigvec * scale).T
    return {"mean": mean.astype(np.float32), "projection": projection.astype(np.float32)}


def apply_whitening(x: np.ndarray, whitening: dict[str, np.ndarray]) -> np.ndarray:
    """Whitens descriptors: float [N, D] -> float32 [N, dim], unit L2 norm."""
    return l2_normalize((np.asarray(x, np.float32) - whitening["mean"]) @ whitening["projection"].T)
