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

Resuming: after every epoch ``checkpoint/`` holds a `tf.train.Checkpoint` of the network
and both optimisers, with the loop's state (epoch, best epoch, history) inside it; a run
on an output folder with a checkpoint of the same conf continues from it (the epoch count
and patience may change in between). Each epoch's augmentation is seeded by (seed,
epoch), so an interrupted and resumed run sees the same batches as an uninterrupted one.

Modules: `conf` (default_conf, confs), `data` (class split, dev task, P x K batches),
`augment`, `losses`, `network` (the network, its trainable blocks, the dev feature
model), `step` (the compiled train step), `checkpoint`, `loop` (`train`) and `cli`
(`main`).
"""

from .cli import main
from .conf import confs, default_conf
from .loop import train

__all__ = ["confs", "default_conf", "main", "train"]

