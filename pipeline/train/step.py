"""One optimisation step on a P x K batch: the three losses and both optimisers' updates."""

from .losses import class_logits, pair_loss
from .network import Network, attention_pool, gem_tf


def make_train_step(net: Network, conf: dict, opt_backbone, opt_head):
    """Builds the compiled training step.

    Args:
        net: the network; its backbone and head variables are updated in place.
        conf: the training conf (loss keys).
        opt_backbone: keras optimiser of ``net.backbone_vars``, built.
        opt_head: keras optimiser of ``net.head_vars``, built.

    Returns:
        step(x, y): x float32 [B, S, S, 3] preprocessed images, y int32 [B] labels ->
        {"loss", "class_loss", "pair_loss", "class_acc" and, with attention,
        "attention_loss", "attention_acc": float32 scalar tensors}; applies one update of
        each optimiser.
    """
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
