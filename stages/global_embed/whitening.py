"""Whitening of global descriptors learned from matching pairs of the training classes
("Lw"), and a disk cache for any learned whitening. PCA whitening on the references, which
stage 2 also uses for its local descriptors, is in `stages.common.pca`.
"""

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stages.common.cache import atomic_save_npz, load_npz

# Eigenvalues below this fraction of the largest count as zero (float64 rounding of a
# 1280 x 1280 scatter is ~1e-13 relative).
RANK_TOLERANCE = 1e-9
# Part of `learn_cached`'s digest: bumped when a learning function changes its result.
LEARN_VERSION = 2


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


def learn_pair_whitening(x: np.ndarray, labels, dim: int | None = None, reg: float = 0.1,
                         complete_with: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Learns whitening from matching pairs (supervised, "Lw").

    Radenović et al., TPAMI 2018 (cirtorch ``utils/whiten.py whitenlearn``), after Mikolajczyk
    & Matas, ICCV 2007: whiten the intra-class scatter (differences of same-class pairs),
    then rotate onto the principal axes of the whitened data and keep `dim` of them. With
    few training images the intra-class scatter is rank-deficient, so `reg` times its mean
    eigenvalue is added to its diagonal.

    The training data spans at most N axes (its numerical rank). The rest of the eigenbasis
    is any rotation of a null space, fixed by float rounding alone: keeping it made the
    ranking depend on that rounding (on smvs_dvd's 250 training images, descriptors changed
    by 2e-7 moved global mAP from 0.5572 to 0.5264). So only the spanned axes are learned;
    when `dim` asks for more, the rest are the principal axes of `complete_with` (the
    references) in the part of the whitened space the training data leaves out, as PCA
    whitening of the database would choose them (smvs_dvd global mAP: 0.4732 with the
    249 learned axes alone, 0.5130 completed to 512).

    Args:
        x: float [N, D] descriptors of training images.
        labels: [N] class of each descriptor; classes need 2+ images to contribute pairs.
        dim: output dimensionality (default D).
        reg: relative diagonal loading of the intra-class scatter (> 0).
        complete_with: float [R, D] descriptors whose principal axes fill the dimensions
            beyond the training data's rank, or None (fewer dimensions then).

    Returns:
        {"mean": float32 [D], "projection": float32 [d, D]}, for `apply_whitening`; d = dim
        unless the training data and `complete_with` together span fewer axes.

    Raises:
        ValueError: no class has two or more images.
    """
    x = np.asarray(x, dtype=np.float64)
    dim = dim or x.shape[1]
    first, second = same_class_pairs(labels)
    if len(first) == 0:
        raise ValueError("learned whitening needs at least one class with two or more images")
    mean = x[first].mean(axis=0)
    diff = x[first] - x[second]
    scatter = diff.T @ diff / len(diff)
    scatter += reg * np.trace(scatter) / len(scatter) * np.eye(len(scatter))
    p = np.linalg.inv(np.linalg.cholesky(scatter))
    basis = _principal_axes((x - mean) @ p.T, dim)
    if len(basis.T) < dim and complete_with is not None and len(complete_with):
        y = (np.asarray(complete_with, np.float64) - mean) @ p.T
        y -= (y @ basis) @ basis.T  # the part the training axes do not explain
        basis = np.concatenate([basis, _principal_axes(y, dim - len(basis.T))], axis=1)
    return {"mean": mean.astype(np.float32), "projection": (basis.T @ p).astype(np.float32)}


def _principal_axes(y: np.ndarray, n: int) -> np.ndarray:
    """The first `n` principal axes (uncentred) of float64 rows `y` [M, D], as columns
    [D, <= n]: only those with non-zero variance (relative to the largest)."""
    eigval, eigvec = np.linalg.eigh(y.T @ y)
    order = np.argsort(eigval)[::-1]
    rank = int((eigval > RANK_TOLERANCE * max(eigval.max(), 1e-300)).sum())
    return eigvec[:, order[: min(n, rank)]]


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
    arrays = {k: v for k, v in kwargs.items() if isinstance(v, np.ndarray)}
    for value in arrays.values():  # large arguments (descriptors) by their bytes
        digest.update(repr((value.dtype.str, value.shape)).encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    rest = sorted((k, v) for k, v in kwargs.items() if k not in arrays)
    digest.update(repr((LEARN_VERSION, x.dtype.str, x.shape, [np.asarray(a).tolist() for a in args],
                        rest)).encode())
    path = Path(folder) / f"whitening-{learn.__name__}-{digest.hexdigest()[:16]}.npz"
    if path.exists():
        try:
            return load_npz(path)
        except ValueError:
            path.unlink(missing_ok=True)  # a corrupt file: learn again
    whitening = learn(x, *args, **kwargs)
    atomic_save_npz(path, whitening)
    return whitening
