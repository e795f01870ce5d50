"""``run_pipeline.py train``: the flags, built from the training conf, and `main`."""

import argparse
import os
import sys
import time
from pathlib import Path

from stages.common import logger, setup_logging
from stages.common.backbone import model_dir as md
from stages.common.conf import resolve

from .conf import N_BLOCKS, confs, default_conf
from .loop import train

REPO = Path(__file__).resolve().parents[2]

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
    """The parser of `main`: the run options plus one flag per `FLAGS` entry, its default from `default_conf`."""
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


def conf_from_args(args: argparse.Namespace) -> dict:
    """The resolved training conf: the ``--conf`` preset with the flags given on the command line on top.

    Args:
        args: parsed by `build_parser`.

    Returns:
        The conf `train` takes (`default_conf` keys plus "name").
    """
    override = {key: getattr(args, key) for key, *_ in FLAGS.values() if getattr(args, key) is not None}
    for key in ("stop_gradient_sim", "learn_gem_p", "imprint_classifier"):
        if getattr(args, key) is not None:
            override[key] = getattr(args, key)
    return resolve(default_conf, confs, args.conf, override)


def main(argv=None) -> int:
    """``run_pipeline.py train ...``.

    Args:
        argv: the arguments after ``train`` (None: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on bad input (logged).
    """
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
