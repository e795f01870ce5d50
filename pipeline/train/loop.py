"""The training loop: set-up or resumption, epochs, dev metrics, the best epoch kept in the
model directory, early stopping."""

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

from stages.common import logger
from stages.common.backbone import efficientnet_lite as lite
from stages.common.backbone import model_dir as md
from stages.common.conf import conf_hash, merge
from stages.common.dataset import load_dataset

from .augment import augmented_batch, plain_view
from .checkpoint import TrainingCheckpoint, read_state
from .conf import RESUMABLE_KEYS
from .data import epoch_batches, load_dev, load_training_images, split_classes
from .network import KerasFeatureModel, Network, attention_pool, gem_tf
from .step import make_train_step


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

    from ..evaluate import evaluate

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
    run_hash = conf_hash({k: v for k, v in conf.items() if k not in RESUMABLE_KEYS},
                         train_classes, dev_classes, counts)
    logger.info("training conf: %s", conf)
    logger.info("%d training classes, %d dev classes %s; devices: %s", len(train_classes), len(dev_classes),
                dev_classes, [d.device_type for d in tf.config.list_physical_devices()])

    if overwrite and out_dir.exists():
        _clear(out_dir)
    saved = _saved_state(out_dir, run_hash, resume)
    state = saved or {"run_hash": run_hash, "epoch": 0, "best": None, "bad_epochs": 0, "history": [],
                      "baseline_dev": None}
    if state["epoch"] >= conf["epochs"] or (dev_classes and state["bad_epochs"] >= conf["patience"]):
        logger.info("%s: training already finished at epoch %d (best %s); --overwrite retrains",
                    out_dir, state["epoch"], state["best"])
        return out_dir

    images, labels = load_training_images(dataset.train, train_classes, int(round(1.5 * conf["input_size"])))
    dev = load_dev({c: dataset.train[c] for c in dev_classes}, conf["dev_resize"]) if dev_classes else None

    keras.utils.set_random_seed(conf["seed"])
    net = Network(conf, len(train_classes), lite.imagenet_weights(cache_dir), conf["seed"])
    opt_backbone = keras.optimizers.Adam(conf["backbone_lr"])
    opt_head = keras.optimizers.Adam(conf["lr"])
    opt_backbone.build(net.backbone_vars)
    opt_head.build(net.head_vars)
    step = make_train_step(net, conf, opt_backbone, opt_head)
    checkpoint = TrainingCheckpoint(out_dir, net, opt_backbone, opt_head)
    logger.info("trainable: %d backbone tensors (%d weights), %d head tensors (%d weights)",
                len(net.backbone_vars), sum(int(np.prod(v.shape)) for v in net.backbone_vars),
                len(net.head_vars), sum(int(np.prod(v.shape)) for v in net.head_vars))

    if saved is not None:
        checkpoint.restore(saved)
        logger.info("resuming %s after epoch %d (best %s)", out_dir, state["epoch"], state["best"])
    else:
        if dev is not None:
            start = time.perf_counter()
            state["baseline_dev"] = dev_metrics(KerasFeatureModel(net, with_head=False), dev, conf)
            logger.info("dev, ImageNet backbone without head (the untrained pipeline): %s (%.0f s)",
                        _fmt(state["baseline_dev"]), time.perf_counter() - start)
        if conf["imprint_classifier"]:
            _imprint(net, images, labels, conf)

    config = _model_config(conf, net, data_root, train_classes, dev_classes, run_hash)
    while state["epoch"] < conf["epochs"]:
        epoch = state["epoch"] + 1
        start = time.perf_counter()
        record = {"epoch": epoch, **_train_epoch(step, images, labels, epoch, conf),
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
        checkpoint.save(state)
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


def _clear(out_dir: Path) -> None:
    """Deletes what a training run writes in `out_dir` (nothing else in it)."""
    for name in (md.CONFIG, md.WEIGHTS, md.TRAIN_LOG, md.CHECKPOINT_DIR):
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _saved_state(out_dir: Path, run_hash: str, resume: bool) -> dict | None:
    """The state of the checkpoint to continue, None for a fresh run; raises ValueError
    when `out_dir` cannot be continued or must not be overwritten."""
    state = read_state(out_dir)
    if state is not None and state["run_hash"] != run_hash:
        raise ValueError(f"{out_dir} holds a checkpoint of another conf or data (hash {state['run_hash']}, "
                         f"now {run_hash}); pass --overwrite to start over or choose another --output")
    if resume and state is None:
        raise ValueError(f"--resume: {out_dir} holds no checkpoint")
    if state is None and (out_dir / md.WEIGHTS).exists():
        raise ValueError(f"{out_dir} holds a model without a checkpoint to resume; "
                         "pass --overwrite to replace it or choose another --output")
    return state


def _model_config(conf: dict, net: Network, data_root: Path, train_classes: list[str], dev_classes: list[str],
                  run_hash: str) -> dict:
    """The config.json of the model directory, without the best epoch."""
    return {
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


def _train_epoch(step, images: list[np.ndarray], labels: np.ndarray, epoch: int, conf: dict) -> dict:
    """Runs one epoch of `step`; returns {"steps": n, loss name: mean over the steps}.

    The epoch's batches and augmentation are seeded by (seed, epoch), so a resumed run
    sees the same batches as an uninterrupted one."""
    import tensorflow as tf

    size = conf["input_size"]
    rng = np.random.default_rng([conf["seed"], epoch])
    batches = epoch_batches(labels, conf["batch_classes"], conf["batch_images"], rng)
    seeds = rng.integers(0, 2**63 - 1, len(batches))
    sums: dict[str, float] = {}
    with ThreadPoolExecutor(max_workers=1) as pool:  # augments the next batch during the step
        pending = pool.submit(augmented_batch, images, batches[0], size, seeds[0], conf)
        bar = tqdm(range(len(batches)), desc=f"epoch {epoch}/{conf['epochs']}", unit="batch", disable=None)
        for i in bar:
            x = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(augmented_batch, images, batches[i + 1], size, seeds[i + 1], conf)
            stats = {k: float(v) for k, v in step(tf.constant(x), tf.constant(labels[batches[i]])).items()}
            for k, val in stats.items():
                sums[k] = sums.get(k, 0.0) + val
            bar.set_postfix(loss=f"{sums['loss'] / (i + 1):.3f}")
        bar.close()
    return {"steps": len(batches), **{k: s / len(batches) for k, s in sums.items()}}


def _is_better(metrics: dict, best: dict | None) -> bool:
    """Whether dev `metrics` beat the `best` so far: higher mAP, ties broken by Recall@1."""
    if best is None:
        return True
    new, old = (metrics["mAP"], metrics["Recall@1"]), (best["mAP"], best["Recall@1"])
    return new[0] > old[0] + 1e-6 or (abs(new[0] - old[0]) <= 1e-6 and new[1] > old[1])


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
    """`record` as "key value, ..." for the log, floats to 4 decimals."""
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items())
