"""The training conf: defaults, named presets and the keys a resumed run may change."""

from stages.common.backbone import efficientnet_lite as lite

N_BLOCKS = len(lite.block_specs())  # 16 MBConv blocks; the head conv counts as block 16

default_conf = {
    # Network.
    "input_size": 256,  # square training crops, pixels
    "finetune_from_block": 11,  # blocks >= this (0..15) and the head conv are trained
    "embed_dim": 512,  # projection head output (global descriptor dimension)
    "gem_p": 3.0,
    "learn_gem_p": False,  # the pipeline pools with its own gem_p; see the warning at the end of train()
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
