"""The trained network: EfficientNet-Lite0 with GeM + projection head and the DELF attention
head, the TensorFlow versions of their pooling, and the in-training backbone as a
`FeatureModel` for the dev metrics."""

import math

import numpy as np

from stages.common.backbone import efficientnet_lite as lite
from stages.common.backbone import model_dir as md

from .conf import N_BLOCKS


def gem_tf(x, p, eps: float = 1e-6):
    """GeM over the spatial axes of float [B, h, w, C] -> [B, C] (as `pooling.gem`)."""
    import tensorflow as tf

    return tf.reduce_mean(tf.maximum(x, eps) ** p, axis=[1, 2]) ** (1.0 / p)


def attention_scores_tf(fmap, v: dict):
    """DELF attention on float [B, h, w, C] -> float [B, h, w, 1] (same math as
    `model_dir.attention_fn`)."""
    import tensorflow as tf

    hidden = tf.nn.relu(tf.tensordot(fmap, v["attention/conv1_kernel"], 1) + v["attention/conv1_bias"])
    return tf.nn.softplus(tf.tensordot(hidden, v["attention/conv2_kernel"], 1) + v["attention/conv2_bias"])


def attention_pool(fmap, v: dict):
    """Attention-weighted mean of the L2-normalised features, L2-normalised: float
    [B, h, w, C] -> [B, C] (DELF's attentive pooling, plus the final normalisation)."""
    import tensorflow as tf

    prob = attention_scores_tf(fmap, v)
    return tf.math.l2_normalize(tf.reduce_mean(tf.math.l2_normalize(fmap, axis=-1) * prob, axis=[1, 2]), axis=-1)


def set_trainable(backbone, from_block: int) -> None:
    """Freezes the backbone except blocks >= `from_block`, the head conv counting as block
    16 (so 16 trains only it and 17 nothing); every BatchNorm stays frozen (and runs in
    inference mode)."""
    import keras

    for layer in backbone.layers:
        name = layer.name
        if name.startswith("block"):
            block = int(name[5:].split("_")[0])
        else:
            block = N_BLOCKS if name.startswith("head") else -1
        layer.trainable = block >= from_block and not isinstance(layer, keras.layers.BatchNormalization)


class Network:
    """The backbone plus every trained variable that is not a backbone layer.

    Attributes:
        backbone: keras.Model from `build_lite0`, outputs "stride16" and "head".
        v: {name: keras.Variable}: "gem_p", "head/kernel", "head/bias", "classifier",
            "pair_bias" and, with attention, "attention/conv{1,2}_{kernel,bias}",
            "attention/classifier".
    """

    def __init__(self, conf: dict, n_classes: int, imagenet: dict, seed: int):
        import keras

        self.conf = conf
        self.backbone = lite.build_lite0(outputs=("stride16", "head"))
        lite.set_weights(self.backbone, imagenet)
        set_trainable(self.backbone, conf["finetune_from_block"])
        rng = np.random.default_rng(seed)
        d, c, a = conf["embed_dim"], n_classes, conf["attention_hidden"]
        c16 = lite.STRIDE16_CHANNELS

        def var(name, value, trainable=True):
            return keras.Variable(np.asarray(value, np.float32), name=name.replace("/", "_"), trainable=trainable)

        # Orthogonal projection: at the start the head preserves the ImageNet cosines.
        q, _ = np.linalg.qr(rng.normal(size=(lite.HEAD_CHANNELS, max(d, 1))))
        init = {
            "gem_p": np.float32(conf["gem_p"]),
            "head/kernel": q[:, :d],
            "head/bias": np.zeros(d),
            "classifier": rng.normal(size=(d, c)) / math.sqrt(d),
            "pair_bias": np.float32(-0.5 * conf["pair_scale"]),
        }
        if conf["attention_weight"] > 0:
            init.update({
                "attention/conv1_kernel": rng.normal(size=(c16, a)) * math.sqrt(2.0 / c16),
                "attention/conv1_bias": np.zeros(a),
                "attention/conv2_kernel": rng.normal(size=(a, 1)) * math.sqrt(1.0 / a),
                "attention/conv2_bias": np.zeros(1),
                "attention/classifier": rng.normal(size=(c16, c)) / math.sqrt(c16),
            })
        self.v = {k: var(k, val) for k, val in init.items()}
        self.head_vars = [v for k, v in self.v.items() if k != "gem_p" or conf["learn_gem_p"]]
        self.backbone_vars = list(self.backbone.trainable_variables)

    def head_numpy(self):
        """The current projection head as the NumPy callable the pipeline will load."""
        return md.global_head_fn(np.asarray(self.v["head/kernel"]), np.asarray(self.v["head/bias"]))

    def attention_numpy(self) -> dict | None:
        """The attention head's arrays as `model_dir.save_model_dir` takes them, or None without one."""
        keys = ("conv1_kernel", "conv1_bias", "conv2_kernel", "conv2_bias")
        if "attention/conv1_kernel" not in self.v:
            return None
        return {k: np.asarray(self.v[f"attention/{k}"]) for k in keys}

    def backbone_weights(self) -> dict[str, list[np.ndarray]]:
        """{keras layer name: `layer.get_weights()`} of every weighted backbone layer."""
        return {layer.name: layer.get_weights() for layer in self.backbone.layers if layer.weights}


class KerasFeatureModel:
    """The in-training backbone as a `stages.global_embed.models.FeatureModel`, so dev
    images go through the pipeline's own `describe`."""

    returns_map = True
    identity = "in-training"

    def __init__(self, net: Network, with_head: bool = True):
        import tensorflow as tf

        self.head = net.head_numpy() if with_head else None
        # As `models._compiled`: traced per input shape (until TF generalises), which runs
        # about twice as fast on CPU as one trace with unknown height and width.
        self._run = tf.function(lambda x: net.backbone(x, training=False)["head"], reduce_retracing=True)

    def __call__(self, rgb):
        return self._run(lite.preprocess(rgb)[None])[0].numpy()
