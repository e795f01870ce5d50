"""Training on the class folders: a fine-tuned global descriptor and a DELF attention head.

``python run_pipeline.py train --data DIR --output MODEL_DIR`` learns, from
``DIR/train/train_data/<class>/*``, a model directory (`stages.common.backbone.model_dir`) that
``run_pipeline.py --model MODEL_DIR`` uses in stage 1 (global descriptor) and stage 2
(DELF keypoint attention).

One network, one loop, three losses on each batch of P classes x K images:

- Global descriptor: EfficientNet-Lite0 (ImageNet) -> "head" map -> GeM (p = 3,
  Radenović et al., TPAMI 2018) -> L2 -> Dense projection -> L2 = embedding. Trained by
  (a) class logits with softmax cross-entropy on a cosine classifier (normalised softmax,
  Wang et al., "NormFace", ACM MM 2017), optionally with ArcFace's additive angular margin
  (Deng et al., CVPR 2019), and (b) a pairwise term: sigmoid binary cross-entropy on the
  scaled cosine of every same-class (target 1) and different-class (target 0) pair in the
  batch, balanced between the two, as in the hackathon code this project grew from
  (`stop_gradient_sim` stops that term's gradient at the backbone so only the head learns
  from pairs, as that code did). Only the blocks from `finetune_from_block` on and the
  head convolution are fine-tuned; BatchNorm stays frozen in inference mode (batches of
  ~24 are too small for batch statistics).
- DELF attention (Noh et al., ICCV 2017, tensorflow/models research/delf, second
  training step): on the stride-16 map with its gradient stopped (backbone frozen for
  it), scores = softplus(1x1 conv(ReLU(1x1 conv(f)))); the attention-weighted mean of the
  L2-normalised features feeds a classifier trained with cross-entropy. Unlike DELF's
  linear classifier, the pooled vector is L2-normalised and classified by cosine logits
  (scale `logit_scale`): the overall scale of the scores then carries no loss, only their
  relative weights, which is all keypoint ranking uses, and it learns in a few hundred
  steps instead of DELF's hundreds of thousands. Training it in the same pass as the
  global loss (as DELF's TF2 trainer does) costs nearly nothing extra.
  With the default `finetune_from_block` = 11 the stride-16 map (block 10) keeps its
  ImageNet weights, so stage 2's descriptors are unchanged and only their scores are
  learned.

Validation is honest: `dev_classes` whole classes are held out of training; within each,
one image (a file named ``reference*`` if any, else the first) is the reference and the
rest are queries. Every epoch the dev images are described with the pipeline's own
`stages.global_embed.extract.describe`, ranked by `stages.global_embed.rank.rank_globally` and scored by
`pipeline.evaluate.evaluate` (mAP, Recall@K). The best epoch by dev mAP is kept in the
model directory and training stops after `patience` epochs without improvement.

Resuming: after every epoch ``checkpoint/last.npz`` holds the weights, the optimiser
state and the history; a run on an output folder with a checkpoint of the same conf
continues from it (the epoch count and patience may change in between). Each epoch's
augmentation is seeded by (seed, epoch), so an interrupted and resumed run sees the same
batches as an uninterrupted one.
"""

import argparse
import math
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from stages.common import logger, setup_logging
from stages.common.backbone import efficientnet_lite as lite
from stages.common.backbone import model_dir as md
from stages.common.conf import conf_hash, merge, resolve
from stages.common.dataset import load_dataset
from stages.common.images import ImageReadError, read_image, resize_max_side

REPO = Path(__file__).resolve().parent.parent
N_BLOCKS = len(lite.block_specs())  # 16 MBConv blocks; the head conv counts as block 16

default_conf = {
    # Network.
    "input_size": 256,  # square training crops, pixels
    "finetune_from_block": 11,  # blocks >= this (0..15) and the head conv are trained
    "embed_dim": 512,  # projection head output (global descriptor dimension)
    "gem_p": 3.0,
    "learn_gem_p": False,  # the pipeline pools with its own gem_p; see README note in train()
    "attention_hidden": 512,  # DELF attention: 1x1 conv width
    # Losses.
    "classifier": "softmax",  # softmax (cosine classifier) | arcface (additive angular margin)
    "logit_scale": 16.0,  # s of the cosine logits
    "margin": 0.2,  # arcface margin m, radians
    "pair_weight": 1.0,
    "pair_scale": 10.0,  # pair logit = pair_scale * cosine + learned bias
    "stop_gradient_sim": False,
    "attention_weight": 1.0,  # 0 skips the attention head
    "imprint_classifier": True,  # start class weights at the mean embedding of each class
    # Optimisation.
    "batch_classes": 8,  # P
    "batch_images": 3,  # K
    "lr": 1e-3,  # head, classifiers, attention (Adam)
    "backbone_lr": 1e-4,  # fine-tuned backbone layers (Adam)
    "epochs": 12,
    "patience": 4,  # epochs without a dev mAP gain before stopping
    "seed": 0,
    # Augmentation (product photos).
    "crop_scale": [0.35, 1.0],  # area fraction of the random resized crop
    "crop_ratio": [0.75, 1.3333],  # aspect ratio range of the crop
    "perspective_prob": 0.5,
    "perspective": 0.12,  # corner jitter, fraction of the crop side
    "rotate90_prob": 0.25,
    "color_jitter": 0.3,  # brightness / contrast / saturation strength
    "blur_prob": 0.3,
    "blur_sigma": [0.4, 1.6],  # pixels at input size
    # Validation.
    "dev_classes": 10,  # whole classes held out; 0 trains on all and keeps the last epoch
    "dev_resize": 512,  # dev images: longest side, as the pipeline's stage 1
    "dev_scales": [1.0, 0.7071, 0.5],
    "dev_regions": True,  # score with query regions, as the pipeline does by default
}

confs = {
    "lite0": {},
    "lite0-arcface": {"classifier": "arcface", "logit_scale": 24.0},
    # The hackathon code's recipe: pairs only train the head.
    "lite0-hackathon": {"stop_gradient_sim": True},
    # Head and attention only (backbone as shipped): fastest, for a quick check.
    "lite0-head-only": {"finetune_from_block": N_BLOCKS + 1},
}

# Conf keys that may change between a run and its resumption.
RESUMABLE_KEYS = ("epochs", "patience")


# ---------------------------------------------------------------- data


def split_classes(classes: dict[str, list], n_dev: int, seed: int) -> tuple[list[str], list[str]]:
    """Holds out whole classes for validation.

    Args:
        classes: {class id: images}; only classes with 2+ images can be dev classes (one
            reference plus at least one query).
        n_dev: number of dev classes (0 for none).
        seed: the choice is a seeded permutation of the sorted class ids.

    Returns:
        (train class ids, dev class ids), both sorted and disjoint.

    Raises:
        ValueError: fewer than 2 classes would be left for training, or not enough
            classes with 2+ images for the dev split.
    """
    names = sorted(classes)
    eligible = [c for c in names if len(classes[c]) >= 2]
    if n_dev > len(eligible):
        raise ValueError(f"{n_dev} dev classes requested but only {len(eligible)} classes have 2+ images")
    rng = np.random.default_rng(seed)
    dev = sorted(eligible[i] for i in rng.permutation(len(eligible))[:n_dev])
    train = [c for c in names if c not in set(dev)]
    if len(train) < 2:
        raise ValueError(f"{len(names)} classes with {n_dev} held out leaves {len(train)} for training; need 2+")
    return train, dev


def dev_queries_and_references(dev: dict[str, list[Path]]):
    """Turns dev classes into a retrieval task.

    Per class, the reference is the first file whose stem starts with "reference" (the
    clean scan in the hackathon layout), else the first file; the others are queries.
    Names are ``<class>/<stem>``.

    Returns:
        (queries {name: path}, references {name: path}, ground truth {query: {reference}}).
    """
    queries, references, truth = {}, {}, {}
    for label in sorted(dev):
        paths = sorted(dev[label])
        ref = next((p for p in paths if p.stem.lower().startswith("reference")), paths[0])
        ref_name = f"{label}/{ref.stem}"
        references[ref_name] = ref
        for p in paths:
            if p != ref:
                queries[f"{label}/{p.stem}"] = p
                truth[f"{label}/{p.stem}"] = {ref_name}
    return queries, references, truth


def load_dev(dev: dict[str, list[Path]], max_side: int) -> dict:
    """The dev retrieval task with its images in memory (see `dev_queries_and_references`).

    Returns:
        {"queries": {name: uint8 rgb}, "references": {name: uint8 rgb}, "truth": {query: {ref}}},
        images downsized to `max_side`; unreadable ones left out.
    """
    q, r, truth = dev_queries_and_references(dev)
    names = list(q) + list(r)
    rgbs = dict(zip(names, load_images(list(q.values()) + list(r.values()), max_side, "reading dev images"),
                    strict=True))
    out = {"queries": {n: rgbs[n] for n in q if rgbs[n] is not None},
           "references": {n: rgbs[n] for n in r if rgbs[n] is not None}, "truth": truth}
    logger.info("dev split: %d queries, %d references", len(out["queries"]), len(out["references"]))
    return out


def load_images(paths, max_side: int, desc: str) -> list[np.ndarray | None]:
    """Reads and downsizes images (None for unreadable ones, logged)."""
    out = []
    for p in tqdm(paths, desc=desc, unit="img", leave=False, disable=None):
        try:
            out.append(resize_max_side(read_image(p), max_side)[0])
        except ImageReadError as e:
            logger.warning("skipping unreadable training image %s", e)
            out.append(None)
    return out


def epoch_batches(labels: np.ndarray, p: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Index batches of P classes x K images covering every image once per epoch.

    Each class's images are shuffled and cut into chunks of K (the last chunk topped up
    with other images of the class, with repeats if the class has fewer than K). Each
    batch takes one chunk from each of P distinct classes, preferring classes with the
    most chunks left; when fewer than P classes have chunks left, the batch is filled
    with fresh chunks of random other classes, so every batch holds exactly P * K images.

    Args:
        labels: int [N] class index of each image.
        p: classes per batch (capped at the number of classes).
        k: images per class.
        rng: the epoch's random generator.

    Returns:
        [int64 [P*K] image indices] per step.
    """
    classes = np.unique(labels)
    p = min(p, len(classes))

    def chunk_of(members, head):
        extra = rng.choice(members, k - len(head), replace=len(members) < k) if len(head) < k else []
        return np.concatenate([head, extra]).astype(np.int64)

    chunks = {}
    for c in classes:
        members = rng.permutation(np.flatnonzero(labels == c))
        chunks[c] = [chunk_of(members, members[i:i + k]) for i in range(0, len(members), k)]
    batches = []
    while any(chunks.values()):
        left = [c for c in classes if chunks[c]]
        order = sorted(left, key=lambda c: (-len(chunks[c]), rng.random()))
        chosen = order[:p]
        parts = [chunks[c].pop() for c in chosen]
        others = [c for c in classes if c not in set(chosen)]
        for c in rng.permutation(others)[: p - len(chosen)]:
            parts.append(chunk_of(np.flatnonzero(labels == c), np.zeros(0, np.int64)))
        batches.append(np.concatenate(parts))
    return [batches[i] for i in rng.permutation(len(batches))]


# ---------------------------------------------------------------- augmentation


def augment(rgb: np.ndarray, size: int, rng: np.random.Generator, conf: dict) -> np.ndarray:
    """One random training view of a product photo.

    A random resized crop (Szegedy et al., CVPR 2015) whose corners are jittered into a
    random perspective, done as one `cv2.warpPerspective`; then a random 90-degree rotation
    (phone photos of covers are often sideways), brightness / contrast / saturation
    jitter and a Gaussian blur (camera shake, defocus).

    Args:
        rgb: uint8 [H, W, 3].
        size: output side, pixels.
        rng: random generator.
        conf: the training conf (augmentation keys).

    Returns:
        uint8 [size, size, 3].
    """
    h, w = rgb.shape[:2]
    area = h * w * rng.uniform(*conf["crop_scale"])
    ratio = math.exp(rng.uniform(math.log(conf["crop_ratio"][0]), math.log(conf["crop_ratio"][1])))
    cw, ch = min(w, math.sqrt(area * ratio)), min(h, math.sqrt(area / ratio))
    x0, y0 = rng.uniform(0, w - cw), rng.uniform(0, h - ch)
    src = np.array([[x0, y0], [x0 + cw, y0], [x0 + cw, y0 + ch], [x0, y0 + ch]], np.float32)
    if rng.random() < conf["perspective_prob"]:
        src += (rng.uniform(-1, 1, (4, 2)) * conf["perspective"] * np.array([cw, ch])).astype(np.float32)
    dst = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float32)
    # Shrinking by more than 2x with bilinear sampling aliases; pre-blur the source.
    shrink = min(cw, ch) / size
    if shrink > 2:
        rgb = cv2.GaussianBlur(rgb, (0, 0), 0.5 * shrink)
    out = cv2.warpPerspective(rgb, cv2.getPerspectiveTransform(src, dst), (size, size),
                              flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    if rng.random() < conf["rotate90_prob"]:
        out = np.rot90(out, int(rng.integers(1, 4)))
    s = conf["color_jitter"]
    if s > 0:
        x = out.astype(np.float32)
        gray = x.mean(axis=2, keepdims=True)
        x = gray + (x - gray) * rng.uniform(1 - s, 1 + s)  # saturation
        x = x.mean() + (x - x.mean()) * rng.uniform(1 - s, 1 + s)  # contrast
        x = x * rng.uniform(1 - s, 1 + s)  # brightness
        out = np.clip(x, 0, 255).astype(np.uint8)
    if rng.random() < conf["blur_prob"]:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(*conf["blur_sigma"]))
    return np.ascontiguousarray(out)


def plain_view(rgb: np.ndarray, size: int) -> np.ndarray:
    """The whole image squeezed to [size, size, 3] (no augmentation)."""
    return cv2.resize(rgb, (size, size), interpolation=cv2.INTER_AREA)


# ---------------------------------------------------------------- model and losses


def gem_tf(x, p, eps: float = 1e-6):
    """GeM over the spatial axes of float [B, h, w, C] -> [B, C] (as `pooling.gem`)."""
    import tensorflow as tf

    return tf.reduce_mean(tf.maximum(x, eps) ** p, axis=[1, 2]) ** (1.0 / p)


def class_logits(emb, weights, labels, scale: float, margin: float):
    """Cosine classifier logits, with ArcFace's additive angular margin when margin > 0.

    Args:
        emb: float [B, D], unit rows.
        weights: float [D, C] class weights (normalised here).
        labels: int [B].
        scale: s, multiplies the cosines.
        margin: m in radians; the target logit is s * cos(theta + m) (Deng et al., CVPR
            2019, with their fallback cos(theta) - m sin(m) past theta = pi - m).

    Returns:
        float [B, C] logits.
    """
    import tensorflow as tf

    cos = tf.matmul(emb, tf.math.l2_normalize(weights, axis=0))
    if margin <= 0:
        return scale * cos
    cos = tf.clip_by_value(cos, -1.0 + 1e-7, 1.0 - 1e-7)
    sin = tf.sqrt(1.0 - cos ** 2)
    with_margin = cos * math.cos(margin) - sin * math.sin(margin)
    with_margin = tf.where(cos > math.cos(math.pi - margin), with_margin, cos - margin * math.sin(margin))
    target = tf.one_hot(labels, tf.shape(weights)[1], dtype=cos.dtype)
    return scale * (target * with_margin + (1.0 - target) * cos)


def pair_loss(emb, labels, scale: float, bias):
    """Balanced sigmoid cross-entropy on scaled cosines of all pairs in the batch.

    logit_ij = scale * cos(e_i, e_j) + bias, target 1 for same-class pairs, 0 otherwise;
    the mean over positive pairs and the mean over negative pairs are averaged, so the
    many negatives do not drown the few positives. The diagonal is left out.

    Args:
        emb: float [B, D] unit rows; labels: int [B]; bias: a scalar.

    Returns:
        A scalar loss (0 terms for an absent pair kind).
    """
    import tensorflow as tf

    logits = scale * tf.matmul(emb, emb, transpose_b=True) + bias
    same = tf.cast(tf.equal(labels[:, None], labels[None, :]), logits.dtype)
    off_diagonal = 1.0 - tf.eye(tf.shape(emb)[0], dtype=logits.dtype)
    bce = tf.nn.sigmoid_cross_entropy_with_logits(labels=same, logits=logits)
    pos, neg = same * off_diagonal, (1.0 - same) * off_diagonal
    return 0.5 * (tf.reduce_sum(bce * pos) / tf.maximum(tf.reduce_sum(pos), 1.0)
                  + tf.reduce_sum(bce * neg) / tf.maximum(tf.reduce_sum(neg), 1.0))


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
        keys = ("conv1_kernel", "conv1_bias", "conv2_kernel", "conv2_bias")
        if "attention/conv1_kernel" not in self.v:
            return None
        return {k: np.asarray(self.v[f"attention/{k}"]) for k in keys}

    def backbone_weights(self) -> dict[str, list[np.ndarray]]:
        return {layer.name: layer.get_weights() for layer in self.backbone.layers if layer.weights}


def make_train_step(net: Network, conf: dict, opt_backbone, opt_head):
    """A compiled step: (images float32 [B, S, S, 3] preprocessed, labels int32 [B]) ->
    {loss name: scalar}. Applies one optimiser update."""
    import tensorflow as tf

    v = net.v
    margin = conf["margin"] if conf["classifier"] == "arcface" else 0.0
    use_attention = "attention/conv1_kernel" in v
    n_backbone = len(net.backbone_vars)

    def embed(pooled):
        return tf.math.l2_normalize(
            tf.matmul(tf.math.l2_normalize(pooled, axis=-1), v["head/kernel"]) + v["head/bias"], axis=-1)

    @tf.function
    def step(x, y):
        with tf.GradientTape() as tape:
            out = net.backbone(x, training=False)
            pooled = gem_tf(out["head"], v["gem_p"])
            emb = embed(pooled)
            logits = class_logits(emb, v["classifier"], y, conf["logit_scale"], margin)
            class_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=logits))
            sim_emb = embed(tf.stop_gradient(pooled)) if conf["stop_gradient_sim"] else emb
            p_loss = pair_loss(sim_emb, y, conf["pair_scale"], v["pair_bias"])
            loss = class_loss + conf["pair_weight"] * p_loss
            # Accuracy of the nearest class weight (without the margin, which only training sees).
            nearest = tf.argmax(class_logits(emb, v["classifier"], y, 1.0, 0.0), -1, output_type=tf.int32)
            stats = {"class_loss": class_loss, "pair_loss": p_loss,
                     "class_acc": tf.reduce_mean(tf.cast(tf.equal(nearest, y), tf.float32))}
            if use_attention:
                fmap = tf.stop_gradient(out["stride16"])
                att = attention_pool(fmap, v)
                att_logits = class_logits(att, v["attention/classifier"], y, conf["logit_scale"], 0.0)
                att_loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=att_logits))
                loss = loss + conf["attention_weight"] * att_loss
                stats["attention_loss"] = att_loss
                stats["attention_acc"] = tf.reduce_mean(tf.cast(
                    tf.equal(tf.argmax(att_logits, -1, output_type=tf.int32), y), tf.float32))
            stats["loss"] = loss
        grads = tape.gradient(loss, net.backbone_vars + net.head_vars)
        if n_backbone:
            opt_backbone.apply(grads[:n_backbone], net.backbone_vars)
        opt_head.apply(grads[n_backbone:], net.head_vars)
        return stats

    return step


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


def dev_metrics(model, dev: dict, conf: dict) -> dict:
    """Dev retrieval metrics with the pipeline's descriptor, ranking and evaluation.

    Args:
        model: a FeatureModel (e.g. `KerasFeatureModel`).
        dev: {"queries": {name: rgb}, "references": {name: rgb}, "truth": {query: {ref}}}.
        conf: the training conf (dev_resize, dev_scales, dev_regions, gem_p).

    Returns:
        `pipeline.evaluate.evaluate` output (mAP, mAP@1000, Recall@1/5/10, n_queries).
    """
    from stages.common.shortlist import order_to_names
    from stages.global_embed.extract import default_conf as global_conf
    from stages.global_embed.extract import describe
    from stages.global_embed.rank import rank_globally

    from .evaluate import evaluate

    gconf = merge(global_conf, {"resize_max": conf["dev_resize"], "scales": conf["dev_scales"],
                                "gem_p": conf["gem_p"]})
    if not conf["dev_regions"]:
        gconf["regions"] = [[0, 0, 1, 1]]
    features = {}
    for name, rgb in {**dev["references"], **dev["queries"]}.items():
        regions = describe(model, rgb, gconf)
        features[name] = {"descriptor": regions[0], "region_descriptors": regions}
    queries, refs = list(dev["queries"]), list(dev["references"])
    order, _ = rank_globally(queries, refs, features, None, conf["dev_regions"])
    return evaluate(order_to_names(order, queries, refs), dev["truth"])


# ---------------------------------------------------------------- the loop


def _batch(images, indices, size, rng_seed, conf):
    """Augmented views of images[indices], preprocessed: float32 [B, size, size, 3]."""
    rng = np.random.default_rng(rng_seed)
    return lite.preprocess(np.stack([augment(images[i], size, rng, conf) for i in indices]))


def _checkpoint_arrays(net: Network, opt_backbone, opt_head) -> dict[str, np.ndarray]:
    arrays = {f"backbone/{k}": w for k, w in lite.flatten_weights(net.backbone_weights()).items()}
    arrays.update({f"var/{k}": np.asarray(v) for k, v in net.v.items()})
    for prefix, opt in (("opt_backbone", opt_backbone), ("opt_head", opt_head)):
        arrays.update({f"{prefix}/{i}": np.asarray(v) for i, v in enumerate(opt.variables)})
    return arrays


def _restore(arrays, net: Network, opt_backbone, opt_head) -> None:
    lite.set_weights(net.backbone, lite.unflatten_weights(
        {k[len("backbone/"):]: v for k, v in arrays.items() if k.startswith("backbone/")}))
    for k, v in net.v.items():
        v.assign(arrays[f"var/{k}"])
    for prefix, opt in (("opt_backbone", opt_backbone), ("opt_head", opt_head)):
        for i, v in enumerate(opt.variables):
            v.assign(arrays[f"{prefix}/{i}"])


def _run_hash(conf: dict, train_classes, dev_classes, counts) -> str:
    fixed = {k: v for k, v in conf.items() if k not in RESUMABLE_KEYS}
    return conf_hash(fixed, train_classes, dev_classes, counts)


def _is_better(metrics: dict, best: dict | None) -> bool:
    if best is None:
        return True
    new, old = (metrics["mAP"], metrics["Recall@1"]), (best["mAP"], best["Recall@1"])
    return new[0] > old[0] + 1e-6 or (abs(new[0] - old[0]) <= 1e-6 and new[1] > old[1])


def train(conf: dict, data_root: Path, out_dir: Path, cache_dir: Path, overwrite: bool = False,
          resume: bool = False) -> Path:
    """Trains on ``data_root/train/train_data`` and writes the model directory `out_dir`.

    Args:
        conf: a resolved training conf (see `default_conf`, `confs`).
        data_root: data folder in the hackathon layout (only train/train_data is read).
        out_dir: the model directory to write (see `stages.common.backbone.model_dir`).
        cache_dir: where the ImageNet weights conversion is cached.
        overwrite: discard what `out_dir` holds and start over.
        resume: demand a checkpoint to continue from (without it, a checkpoint of the
            same conf is continued anyway, and a fresh run starts when there is none).

    Returns:
        `out_dir`.

    Raises:
        ValueError: the data cannot be split, or `out_dir` holds a checkpoint of another
            conf or data (use `overwrite`), or `resume` without a checkpoint.
    """
    import keras
    import tensorflow as tf

    out_dir = Path(out_dir)
    dataset = load_dataset(data_root, require_test=False)
    train_classes, dev_classes = split_classes(dataset.train, conf["dev_classes"], conf["seed"])
    counts = [len(dataset.train[c]) for c in sorted(dataset.train)]
    run_hash = _run_hash(conf, train_classes, dev_classes, counts)
    logger.info("training conf: %s", conf)
    logger.info("%d training classes, %d dev classes %s; devices: %s", len(train_classes), len(dev_classes),
                dev_classes, [d.device_type for d in tf.config.list_physical_devices()])

    if overwrite and out_dir.exists():
        for name in (md.CONFIG, md.WEIGHTS, md.TRAIN_LOG, md.CHECKPOINT_DIR):
            path = out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
    checkpoint = md.load_checkpoint(out_dir)
    if checkpoint is not None and checkpoint[1]["run_hash"] != run_hash:
        raise ValueError(f"{out_dir} holds a checkpoint of another conf or data (hash {checkpoint[1]['run_hash']}, "
                         f"now {run_hash}); pass --overwrite to start over or choose another --output")
    if resume and checkpoint is None:
        raise ValueError(f"--resume: {out_dir} holds no checkpoint")
    if checkpoint is None and (out_dir / md.WEIGHTS).exists():
        raise ValueError(f"{out_dir} holds a model without a checkpoint to resume; "
                         "pass --overwrite to replace it or choose another --output")

    state = checkpoint[1] if checkpoint else {"run_hash": run_hash, "epoch": 0, "best": None, "bad_epochs": 0,
                                              "history": [], "baseline_dev": None}
    if state["epoch"] >= conf["epochs"] or (dev_classes and state["bad_epochs"] >= conf["patience"]):
        logger.info("%s: training already finished at epoch %d (best %s); --overwrite retrains",
                    out_dir, state["epoch"], state["best"])
        return out_dir

    size = conf["input_size"]
    paths, labels = [], []
    for i, c in enumerate(train_classes):
        paths += dataset.train[c]
        labels += [i] * len(dataset.train[c])
    images = load_images(paths, int(round(1.5 * size)), "reading training images")
    ok = [i for i, im in enumerate(images) if im is not None]
    images, labels = [images[i] for i in ok], np.array([labels[i] for i in ok], np.int32)
    dev = load_dev({c: dataset.train[c] for c in dev_classes}, conf["dev_resize"]) if dev_classes else None

    keras.utils.set_random_seed(conf["seed"])
    net = Network(conf, len(train_classes), lite.imagenet_weights(cache_dir), conf["seed"])
    opt_backbone = keras.optimizers.Adam(conf["backbone_lr"])
    opt_head = keras.optimizers.Adam(conf["lr"])
    opt_backbone.build(net.backbone_vars)
    opt_head.build(net.head_vars)
    step = make_train_step(net, conf, opt_backbone, opt_head)
    logger.info("trainable: %d backbone tensors (%d weights), %d head tensors (%d weights)",
                len(net.backbone_vars), sum(int(np.prod(v.shape)) for v in net.backbone_vars),
                len(net.head_vars), sum(int(np.prod(v.shape)) for v in net.head_vars))

    if checkpoint is not None:
        _restore(checkpoint[0], net, opt_backbone, opt_head)
        logger.info("resuming %s after epoch %d (best %s)", out_dir, state["epoch"], state["best"])
    else:
        if dev is not None:
            start = time.perf_counter()
            state["baseline_dev"] = dev_metrics(KerasFeatureModel(net, with_head=False), dev, conf)
            logger.info("dev, ImageNet backbone without head (the untrained pipeline): %s (%.0f s)",
                        _fmt(state["baseline_dev"]), time.perf_counter() - start)
        if conf["imprint_classifier"]:
            _imprint(net, images, labels, conf)

    config = {
        "architecture": {
            "backbone": "efficientnet-lite0", "input": "uint8 RGB, (x - 127) / 128",
            "global": {"map": "head", "channels": lite.HEAD_CHANNELS, "pool": "gem", "gem_p": conf["gem_p"],
                       "head": "l2n -> x @ kernel + bias -> l2n", "dim": conf["embed_dim"]},
            "attention": None if net.attention_numpy() is None else {
                "map": "stride16", "channels": lite.STRIDE16_CHANNELS, "hidden": conf["attention_hidden"],
                "score": "softplus(relu(f @ conv1 + b1) @ conv2 + b2)"},
        },
        "train_conf": conf, "data": str(Path(data_root).resolve()),
        "classes": {"train": train_classes, "dev": dev_classes}, "run_hash": run_hash,
    }

    while state["epoch"] < conf["epochs"]:
        epoch = state["epoch"] + 1
        start = time.perf_counter()
        rng = np.random.default_rng([conf["seed"], epoch])
        batches = epoch_batches(labels, conf["batch_classes"], conf["batch_images"], rng)
        seeds = rng.integers(0, 2**63 - 1, len(batches))
        sums: dict[str, float] = {}
        with ThreadPoolExecutor(max_workers=1) as pool:  # augments the next batch during the step
            pending = pool.submit(_batch, images, batches[0], size, seeds[0], conf)
            bar = tqdm(range(len(batches)), desc=f"epoch {epoch}/{conf['epochs']}", unit="batch", disable=None)
            for i in bar:
                x = pending.result()
                if i + 1 < len(batches):
                    pending = pool.submit(_batch, images, batches[i + 1], size, seeds[i + 1], conf)
                stats = {k: float(v) for k, v in step(tf.constant(x), tf.constant(labels[batches[i]])).items()}
                for k, val in stats.items():
                    sums[k] = sums.get(k, 0.0) + val
                bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.3f}")
            bar.close()
        record = {"epoch": epoch, "steps": len(batches), **{k: s / len(batches) for k, s in sums.items()},
                  "gem_p": float(np.asarray(net.v["gem_p"])), "seconds_train": time.perf_counter() - start}
        improved = True
        if dev is not None:
            t = time.perf_counter()
            metrics = dev_metrics(KerasFeatureModel(net), dev, conf)
            record.update({"dev_mAP": metrics["mAP"], "dev_Recall@1": metrics["Recall@1"],
                           "dev_Recall@5": metrics["Recall@5"], "seconds_dev": time.perf_counter() - t})
            improved = _is_better(metrics, state["best"] and state["best"]["dev"])
        record["seconds"] = time.perf_counter() - start
        state["history"].append(record)
        if improved:
            state["best"] = {"epoch": epoch, "dev": None if dev is None else
                             {k: record[f"dev_{k}"] for k in ("mAP", "Recall@1", "Recall@5")}}
            state["bad_epochs"] = 0
            config["architecture"]["global"]["gem_p"] = float(np.asarray(net.v["gem_p"]))
            md.save_model_dir(out_dir, net.backbone_weights(),
                              {**config, "best": state["best"], "baseline_dev": state["baseline_dev"]},
                              global_head={"kernel": np.asarray(net.v["head/kernel"]),
                                           "bias": np.asarray(net.v["head/bias"])},
                              attention=net.attention_numpy())
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        md.write_train_log(out_dir, state["history"])
        md.save_checkpoint(out_dir, _checkpoint_arrays(net, opt_backbone, opt_head), state)
        logger.info("epoch %d: %s%s", epoch, _fmt({k: v for k, v in record.items() if k != "epoch"}),
                    " (best so far, saved)" if improved else "")
        if dev is not None and state["bad_epochs"] >= conf["patience"]:
            logger.info("early stop: no dev mAP gain for %d epochs", state["bad_epochs"])
            break
    logger.info("best epoch %s -> %s", state["best"], out_dir)
    if conf["learn_gem_p"]:
        logger.warning("learned GeM p = %.3f (config.json); the pipeline pools with its conf gem_p",
                       float(np.asarray(net.v["gem_p"])))
    return out_dir


def _imprint(net: Network, images, labels, conf: dict) -> None:
    """Sets each class weight (global and attention classifiers) to the mean feature of
    the class's plain views (weight imprinting, Qi et al., CVPR 2018), so the first steps
    do not push the network towards random class directions."""
    import tensorflow as tf

    size, embs, atts = conf["input_size"], [], []
    for start in tqdm(range(0, len(images), 16), desc="imprinting class weights", leave=False, disable=None):
        x = lite.preprocess(np.stack([plain_view(im, size) for im in images[start:start + 16]]))
        out = net.backbone(tf.constant(x), training=False)
        embs.append(gem_tf(out["head"], net.v["gem_p"]).numpy())
        if "attention/classifier" in net.v:
            atts.append(attention_pool(out["stride16"], net.v).numpy())

    def imprint(var, x):
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        weights = np.array(var)  # [D, C]; a class without readable images keeps its random column
        for c in np.unique(labels):
            centre = x[labels == c].mean(axis=0)
            weights[:, c] = centre / max(float(np.linalg.norm(centre)), 1e-12)
        var.assign(weights)

    imprint(net.v["classifier"], net.head_numpy()(np.concatenate(embs)))
    if atts:
        imprint(net.v["attention/classifier"], np.concatenate(atts))


def _fmt(record: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())


# ---------------------------------------------------------------- command line

# flag -> (conf key, type, help); defaults come from the resolved conf and are shown by --help.
FLAGS = {
    "--epochs": ("epochs", int, "maximum epochs (an epoch shows every training image once)"),
    "--patience": ("patience", int, "stop after this many epochs without a dev mAP gain"),
    "--input-size": ("input_size", int, "side of the square training crops, pixels"),
    "--finetune-from-block": ("finetune_from_block", int,
                              f"fine-tune EfficientNet-Lite0 blocks >= this (0..{N_BLOCKS - 1}) and the head conv "
                              f"({N_BLOCKS}: the head conv only; {N_BLOCKS + 1}: no backbone layer). Blocks <= 10 "
                              "make the stride-16 map that stage 2 describes"),
    "--embed-dim": ("embed_dim", int, "global descriptor dimension (projection head output)"),
    "--classifier": ("classifier", str, "softmax: cosine classifier with softmax cross-entropy; "
                                        "arcface: the same with an additive angular margin"),
    "--logit-scale": ("logit_scale", float, "scale s of the cosine class logits"),
    "--margin": ("margin", float, "ArcFace margin in radians (--classifier arcface)"),
    "--pair-weight": ("pair_weight", float, "weight of the pairwise sigmoid similarity loss (0 turns it off)"),
    "--pair-scale": ("pair_scale", float, "pair logit = scale * cosine + learned bias"),
    "--attention-weight": ("attention_weight", float, "weight of the DELF attention loss (0: no attention head)"),
    "--attention-hidden": ("attention_hidden", int, "width of the attention head's first 1x1 conv"),
    "--batch-classes": ("batch_classes", int, "P: classes per batch"),
    "--batch-images": ("batch_images", int, "K: images per class in a batch"),
    "--lr": ("lr", float, "Adam learning rate of the heads and classifiers"),
    "--backbone-lr": ("backbone_lr", float, "Adam learning rate of the fine-tuned backbone layers"),
    "--dev-classes": ("dev_classes", int, "whole classes held out for validation (0: none, keep the last epoch)"),
    "--dev-resize": ("dev_resize", int, "longest side of dev images, pixels (the pipeline uses 512)"),
    "--seed": ("seed", int, "seed of the dev split, initialisation and augmentation"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_pipeline.py train",
        description="Train the retrieval model on DATA/train/train_data/<class>/* and write a model "
                    "directory for `run_pipeline.py --model MODEL_DIR`: a fine-tuned EfficientNet-Lite0 "
                    "with a GeM + projection global descriptor (softmax/ArcFace class loss + pairwise "
                    "sigmoid similarity loss) and a DELF attention head for stage 2 keypoints. Whole "
                    "classes are held out as a dev set scored by mAP / Recall@1 every epoch; the best "
                    "epoch is kept. Defaults of the lite0 conf are shown in brackets (the other --conf presets "
                    "change a few; flags override the preset).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="data folder with train/train_data/<class>/")
    parser.add_argument("--output", type=Path, required=True,
                        help="model directory to write (config.json, weights.npz, train_log.jsonl, checkpoint/)")
    parser.add_argument("--cache", type=Path, default=REPO / "cache",
                        help="cache folder holding the converted ImageNet weights [%(default)s]")
    parser.add_argument("--conf", default="lite0", choices=sorted(confs),
                        help="named conf: lite0 (default); lite0-arcface (angular margin); lite0-hackathon "
                             "(pair loss trains the head only); lite0-head-only (backbone as shipped)")
    parser.add_argument("--resume", action="store_true",
                        help="require a checkpoint in --output and continue it (a checkpoint of the same conf "
                             "is continued even without this flag)")
    parser.add_argument("--overwrite", action="store_true", help="discard what --output holds and start over")
    parser.add_argument("--stop-gradient-sim", action="store_true", default=None,
                        help="the pairwise loss trains only the projection head, not the backbone [False]")
    parser.add_argument("--learn-gem-p", action="store_true", default=None,
                        help="learn the GeM power (the pipeline still pools with its own gem_p=3) [False]")
    parser.add_argument("--no-imprint", dest="imprint_classifier", action="store_false", default=None,
                        help="random class weights instead of the mean embedding of each class")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads TensorFlow may use per op (0: its default, all cores)")
    for flag, (key, kind, text) in FLAGS.items():
        choices = ["softmax", "arcface"] if key == "classifier" else None
        parser.add_argument(flag, dest=key, type=kind, default=None, choices=choices,
                            help=f"{text} [{default_conf[key]}]")
    return parser


def conf_from_args(args) -> dict:
    override = {key: getattr(args, key) for key, *_ in FLAGS.values() if getattr(args, key) is not None}
    for key in ("stop_gradient_sim", "learn_gem_p", "imprint_classifier"):
        if getattr(args, key) is not None:
            override[key] = getattr(args, key)
    return resolve(default_conf, confs, args.conf, override)


def main(argv=None) -> int:
    """`run_pipeline.py train ...`: returns 0 on success, 2 on bad input."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    setup_logging()
    conf = conf_from_args(args)
    if args.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads)
        tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    start = time.perf_counter()
    try:
        out = train(conf, args.data, args.output, args.cache, overwrite=args.overwrite, resume=args.resume)
    except (ValueError, md.ModelDirError) as e:
        logger.error("%s", e)
        return 2
    config = md.read_config(out) if (out / md.CONFIG).exists() else {}
    print(f"\nmodel directory {out} ({time.perf_counter() - start:.0f} s); best: {config.get('best')}; "
          f"untrained pipeline on dev: {config.get('baseline_dev')}")
    python = os.path.relpath(sys.executable)
    print(f"use it with: {sys.executable if python.startswith('..') else python} run_pipeline.py "
          f"--data {args.data} --model {out}")
    return 0
