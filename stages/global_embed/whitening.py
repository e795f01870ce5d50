"""PCA whitening learned on reference descriptors (unsupervised).

Jégou & Chum, "Negative evidences and co-occurrences in image retrieval", ECCV 2012; as
used after GeM in cirtorch (``utils/whiten.py pcawhitenlearn``): centre, rotate onto the
principal axes and scale each by 1 / sqrt(eigenvalue), keep the top `dim` axes, L2-normalise.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .pooling import l2_normalize


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


def same_class_pairs(labels) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs (i < j) whose labels are equal: (first int64 [P], second int64 [P])."""
    labels = np.asarray(labels)
    first, second = [], []
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        a, b = np.triu_indices(len(idx), k=1)
        first.append(idx[a])
        second.append(idx[b])
    if not first:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(first).astype(np.int64), np.concatenate(second).astype(np.int64)


def learn_pair_whitening(x: np.ndarray, labels, dim: int | None = None, reg: float = 0.1) -> dict[str, np.ndarray]:
    """Learns whitening from matching pairs (supervised, "Lw").

    Radenović et al., TPAMI 2018 (cirtorch ``utils/whiten.py whitenlearn``), after Mikolajczyk
    & Matas, ICCV 2007: whiten the intra-class scatter (differences of same-class pairs),
    then rotate onto the principal axes of the whitened data and keep `dim` of them. With
    few training images the intra-class scatter is rank-deficient, so `reg` times its mean
    eigenvalue is added to its diagonal.

    Args:
        x: float [N, D] descriptors of training images.
        labels: [N] class of each descriptor; classes need 2+ images to contribute pairs.
        dim: output dimensionality (default D).
        reg: relative diagonal loading of the intra-class scatter (> 0).

    Returns:
        {"mean": float32 [D], "projection": float32 [dim, D]}, for `apply_whitening`.

    Raises:
        ValueError: no class has two or more images.
    """
    x = np.asarray(x, dtype=np.float64)
    first, second = same_class_pairs(labels)
    if len(first) == 0:
        raise ValueError("learned whitening needs at least one class with two or more images")
    mean = x[first].mean(axis=0)
    diff = x[first] - x[second]
    scatter = diff.T @ diff / len(diff)
    scatter += reg * np.trace(scatter) / len(scatter) * np.eye(len(scatter))
    p = np.linalg.inv(np.linalg.cholesky(scatter))
    whitened = (x - mean) @ p.T
    eigval, eigvec = np.linalg.eigh(whitened.T @ whitened)
    eigvec = eigvec[:, np.argsort(eigval)[::-1]]
    projection = (eigvec.T @ p)[: dim or x.shape[1]]
    return {"mean": mean.astype(np.float32), "projection": projection.astype(np.float32)}


def learn_cached(folder: Path | None, learn: Callable[..., dict], x: np.ndarray, *args, **kwargs) -> dict:
    """`learn(x, *args, **kwargs)`, memoised on disk.

    Learning the whitening is an eigendecomposition of a D x D matrix (1280 x 1280 for
    EfficientNet-Lite0): 0.5 s on one core, but 12 s when OpenBLAS runs it on two threads of
    a busy machine, on every run. The result is a deterministic function of its inputs, so
    it is saved as ``whitening-<learn name>-<digest>.npz`` in `folder` (the global feature
    store, whose descriptors it was learned from), the digest covering the descriptors'
    bytes and every other argument; any change of them learns again.

    Args:
        folder: where the file lives; None learns without caching.
        learn: `learn_pair_whitening` or `learn_pca_whitening`.
        x: float [N, D] descriptors, the first argument of `learn`.

    Returns:
        The whitening dict `learn` returns ({"mean", "projection"}).
    """
    if folder is None:
        return learn(x, *args, **kwargs)
    from pipeline.cache import atomic_save_npz, load_npz

    x = np.ascontiguousarray(x)
    digest = hashlib.sha1(x.tobytes())
    digest.update(repr((x.dtype.str, x.shape, [np.asarray(a).tolist() for a in args], sorted(kwargs.items()))).encode())
    path = Path(folder) / f"whitening-{learn.__name__}-{digest.hexdigest()[:16]}.npz"
    if path.exists():
        try:
            return load_npz(path)
        except ValueError:
            path.unlink(missing_ok=True)  # a corrupt file: learn again
    whitening = learn(x, *args, **kwargs)
    atomic_save_npz(path, whitening)
    return whitening
