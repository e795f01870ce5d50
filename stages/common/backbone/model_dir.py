"""The trained model directory written by `run_pipeline.py train` and read by both stages.

Layout (format version 1)::

    MODEL_DIR/
      config.json        architecture, training conf, data folder, train/dev classes,
                         best epoch and its dev metrics (written last, so a directory with
                         a config.json has its weights)
      weights.npz        every array the pipeline needs, one uncompressed .npz (no pickle):
                           backbone/<keras layer name>/<i>  EfficientNet-Lite0 weights in
                             `layer.set_weights` order, the layout of
                             `efficientnet_lite.imagenet_weights` (all layers, not only
                             the fine-tuned ones, so the directory stands alone)
                           global_head/kernel  float32 [1280, D], global_head/bias [D]
                           attention/conv1_kernel [112, A], attention/conv1_bias [A],
                           attention/conv2_kernel [A, 1], attention/conv2_bias [1]
      train_log.jsonl    one JSON object per epoch: losses, dev mAP / Recall@1, seconds
      checkpoint/        the trainer's resume state (a TensorFlow checkpoint of the
                         weights and optimiser state, plus the epoch and history);
                         not needed for inference

All weights live in one file, written by temp file + rename, so a reader never sees a
backbone from one epoch with a head from another. The identity string returned by
`load_backbone_weights` is a hash of that file, so caches keyed by it are invalidated
whenever the weights change.
"""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import logger
from ..cache import atomic_save_npz, atomic_write_json
from .efficientnet_lite import flatten_weights, unflatten_weights

FORMAT_VERSION = 1
CONFIG = "config.json"
WEIGHTS = "weights.npz"
TRAIN_LOG = "train_log.jsonl"
CHECKPOINT_DIR = "checkpoint"


class ModelDirError(ValueError):
    """A folder that is not a usable model directory; the message says why."""


def read_config(model_dir: Path) -> dict:
    """Reads ``config.json`` of a model directory.

    Raises:
        ModelDirError: the folder, its config or its weights file is missing, or the
            format version is not one this code reads.
    """
    model_dir = Path(model_dir)
    path = model_dir / CONFIG
    if not path.is_file():
        raise ModelDirError(f"{model_dir}: not a model directory (no {CONFIG}); "
                            "create one with `run_pipeline.py train --data DIR --output MODEL_DIR`")
    config = json.loads(path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ModelDirError(f"{path}: format_version {config.get('format_version')!r}, expected {FORMAT_VERSION}")
    if not (model_dir / WEIGHTS).is_file():
        raise ModelDirError(f"{model_dir}: {WEIGHTS} is missing")
    return config


def _group(model_dir: Path, prefix: str) -> dict[str, np.ndarray]:
    """The arrays of weights.npz whose key starts with ``prefix/``, prefix stripped."""
    path = Path(model_dir) / WEIGHTS
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k[len(prefix) + 1:]: f[k] for k in f.files if k.startswith(prefix + "/")}
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise ModelDirError(f"{path}: unreadable weights file ({e})") from e


def weights_identity(model_dir: Path) -> str:
    """``lite0-trained-<sha1 of weights.npz, 16 hex>``: changes whenever any weight changes."""
    digest = hashlib.sha1()
    with open(Path(model_dir) / WEIGHTS, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"lite0-trained-{digest.hexdigest()[:16]}"


def backbone_identity(model_dir: Path | None, name: str = "lite0") -> str:
    """Identity of the EfficientNet-Lite weights in use, without loading them: the trained
    (Lite0) model directory's (`weights_identity`) or the shipped ImageNet checkpoint's of
    variant ``name``."""
    if model_dir:
        return weights_identity(model_dir)
    from .efficientnet_lite import shipped_checkpoint

    return f"{name}-imagenet-" + shipped_checkpoint(name).name


def load_backbone_weights(model, model_dir: Path) -> str:
    """Sets the EfficientNet-Lite0 layers of `model` from a model directory, by layer name.

    Works for any model built by `efficientnet_lite.build_lite0` (a truncated one, e.g.
    only the stride-16 endpoint, takes the layers it has).

    Args:
        model: a keras.Model from `build_lite0`.
        model_dir: the model directory.

    Returns:
        An identity string for cache keys (`weights_identity`): it covers the backbone,
        the global head and the attention head, since all of them shape the features.

    Raises:
        ModelDirError: not a model directory, or it lacks the weights of a layer of `model`.
    """
    from .efficientnet_lite import set_weights

    read_config(model_dir)
    weights = unflatten_weights(_group(model_dir, "backbone"))
    try:
        set_weights(model, weights)
    except KeyError as e:
        raise ModelDirError(f"{model_dir}: {e.args[0]}") from e
    identity = weights_identity(model_dir)
    logger.info("EfficientNet-Lite0 weights from %s (%s)", model_dir, identity)
    return identity


def global_head_fn(kernel: np.ndarray, bias: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The projection head as a NumPy function: float [..., D_in] -> float32 [..., D_out].

    The input (a GeM-pooled vector) is L2-normalised first, so the head does not depend on
    the activation scale of the image size it was pooled at; the caller L2-normalises the
    output.
    """
    kernel = np.asarray(kernel, np.float32)
    bias = np.asarray(bias, np.float32)

    def head(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, np.float32)
        v = v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)
        # einsum's own loop, not BLAS: after TensorFlow has run, a BLAS matrix-vector
        # product waits on threads TensorFlow keeps busy (measured 8 ms instead of 0.3 ms
        # per call on 2 cores), and the pipeline calls this once per pooled vector.
        return np.einsum("...i,ij->...j", v, kernel) + bias

    return head


def load_global_head(model_dir: Path) -> Callable[[np.ndarray], np.ndarray] | None:
    """The trained projection of the global descriptor, or None if the directory has none.

    Returns:
        head(v): float [..., 1280] GeM vector -> float32 [..., D] (see `global_head_fn`).

    Raises:
        ModelDirError: not a model directory.
    """
    read_config(model_dir)
    arrays = _group(model_dir, "global_head")
    if not arrays:
        return None
    return global_head_fn(arrays["kernel"], arrays["bias"])


def attention_fn(arrays: dict[str, np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """DELF's attention score function as NumPy: float [h, w, C] -> float32 [h, w].

    softplus(conv2(relu(conv1(f)))) with 1x1 convolutions, on the raw (not normalised)
    feature map, as in Noh et al., ICCV 2017 (tensorflow/models research/delf
    ``delf_v1.py _PerformAttention``).
    """
    w1, b1 = np.asarray(arrays["conv1_kernel"], np.float32), np.asarray(arrays["conv1_bias"], np.float32)
    w2, b2 = np.asarray(arrays["conv2_kernel"], np.float32), np.asarray(arrays["conv2_bias"], np.float32)

    def score(feature_map: np.ndarray) -> np.ndarray:
        f = np.asarray(feature_map, np.float32)
        # One 2-D product: a 3-D matmul runs as many small batched ones, 10-50x slower here.
        hidden = np.maximum(f.reshape(-1, f.shape[-1]) @ w1 + b1, 0.0)
        logit = (hidden @ w2 + b2).reshape(f.shape[:-1])
        return np.logaddexp(0.0, logit).astype(np.float32)  # softplus, overflow-safe

    return score


def load_attention(model_dir: Path) -> Callable[[np.ndarray], np.ndarray] | None:
    """The trained DELF attention head, or None if the directory has none.

    Returns:
        score(feature_map): float [h, w, 112] stride-16 map -> float32 [h, w] keypoint
        scores (> 0; larger is more attended).

    Raises:
        ModelDirError: not a model directory.
    """
    read_config(model_dir)
    arrays = _group(model_dir, "attention")
    return attention_fn(arrays) if arrays else None


def save_model_dir(model_dir: Path, backbone: dict[str, list[np.ndarray]], config: dict,
                   global_head: dict[str, np.ndarray] | None = None,
                   attention: dict[str, np.ndarray] | None = None) -> str:
    """Writes the weights and the config of a model directory, each atomically.

    Args:
        model_dir: the folder (created if needed).
        backbone: {keras layer name: [weights]} for every weighted EfficientNet-Lite0 layer.
        config: JSON-serialisable; ``format_version`` and ``weights`` (file and identity)
            are added.
        global_head: {"kernel": [D_in, D], "bias": [D]} or None.
        attention: {"conv1_kernel", "conv1_bias", "conv2_kernel", "conv2_bias"} or None.

    Returns:
        The identity string of the written weights.
    """
    model_dir = Path(model_dir)
    arrays = {f"backbone/{k}": w for k, w in flatten_weights(backbone).items()}
    for prefix, group in (("global_head", global_head), ("attention", attention)):
        arrays.update({f"{prefix}/{k}": np.asarray(v, np.float32) for k, v in (group or {}).items()})
    atomic_save_npz(model_dir / WEIGHTS, arrays)
    identity = weights_identity(model_dir)
    atomic_write_json(model_dir / CONFIG, {"format_version": FORMAT_VERSION, **config,
                                           "weights": {"file": WEIGHTS, "identity": identity}})
    return identity


def write_train_log(model_dir: Path, history: list[dict]) -> None:
    """Rewrites ``train_log.jsonl`` (one JSON object per epoch) atomically."""
    from ..cache import atomic_write_bytes

    text = "".join(json.dumps(h, sort_keys=True) + "\n" for h in history)
    atomic_write_bytes(Path(model_dir) / TRAIN_LOG, text.encode())


def read_train_log(model_dir: Path) -> list[dict]:
    """The per-epoch records of ``train_log.jsonl`` ([] when there is none)."""
    path = Path(model_dir) / TRAIN_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

