"""Whitening of global descriptors learned from matching pairs of the training classes
("Lw"), and a disk cache for any learned whitening. PCA whitening on the references, which
stage 2 also uses for its local descriptors, is in `stages.common.pca`.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stages.common.cache import atomic_save_npz, load_npz


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
