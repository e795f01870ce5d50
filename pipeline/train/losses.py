"""The global descriptor's losses: cosine / ArcFace class logits and the pairwise term."""

import math


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
