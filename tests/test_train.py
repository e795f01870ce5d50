"""Training: data split, batches, augmentation, losses, the model directory and a tiny run."""

import json

import numpy as np
import pytest

from pipeline import train as tr
from pipeline.train import augment, checkpoint, data, loop, losses, network
from stages.common.backbone import efficientnet_lite as lite
from stages.common.backbone import model_dir as md
from stages.common.conf import resolve
from stages.common.dataset import load_dataset
from tests.conftest import write_image

TINY = {"input_size": 64, "embed_dim": 32, "attention_hidden": 16, "batch_classes": 2, "batch_images": 2,
        "dev_classes": 2, "dev_resize": 96, "dev_scales": [1.0], "epochs": 2, "finetune_from_block": 14,
        "lr": 3e-3, "perspective_prob": 0.0, "rotate90_prob": 0.0, "blur_prob": 0.0, "crop_scale": [0.7, 1.0]}


def synthetic_classes(root, n_classes=6, n_images=4, size=96):
    """Class folders in the hackathon layout; each class is a fixed random colour pattern,
    its images shifted and brightened copies; the first image is named "reference"."""
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        base = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
        base = np.kron(base, np.ones((size // 12 + 2, size // 12 + 2, 1), np.uint8))
        for i in range(n_images):
            dy, dx = rng.integers(0, base.shape[0] - size, 2)
            view = np.clip(base[dy:dy + size, dx:dx + size].astype(int) + int(rng.integers(-20, 20)), 0, 255)
            name = "reference" if i == 0 else f"photo{i}"
            write_image(root / "train" / "train_data" / f"{c:03d}" / f"{name}.png", view.astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    return synthetic_classes(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def trained(tiny_data, weights_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    conf = resolve(tr.default_conf, tr.confs, "lite0", TINY)
    tr.train(conf, tiny_data, out, weights_cache)
    return conf, out


def test_split_holds_out_whole_classes():
    classes = {f"{c:03d}": [f"x{i}" for i in range(5)] for c in range(50)}
    classes["050"] = ["only"]  # one image: cannot be a dev class
    train, dev = data.split_classes(classes, 10, seed=0)
    assert len(dev) == 10 and "050" not in dev
    assert not set(train) & set(dev) and sorted(train + dev) == sorted(classes)
    assert data.split_classes(classes, 10, seed=0) == (train, dev)
    assert data.split_classes(classes, 0, seed=0) == (sorted(classes), [])
    with pytest.raises(ValueError):
        data.split_classes({"a": [1, 2], "b": [1, 2]}, 1, seed=0)


def test_dev_task_prefers_the_reference_file(tmp_path):
    paths = {"007": [tmp_path / "canon.jpg", tmp_path / "reference.jpg", tmp_path / "droid.jpg"],
             "008": [tmp_path / "a.jpg", tmp_path / "b.jpg"]}
    queries, refs, truth = data.dev_queries_and_references(paths)
    assert list(refs) == ["007/reference", "008/a"]
    assert sorted(queries) == ["007/canon", "007/droid", "008/b"]
    assert truth["007/canon"] == {"007/reference"} and truth["008/b"] == {"008/a"}


@pytest.mark.parametrize("counts", [[5] * 40, [4, 4, 4, 4], [1, 5, 2, 3]])
def test_epoch_batches_cover_every_image_with_p_classes_of_k(counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    batches = data.epoch_batches(labels, 8, 3, np.random.default_rng(0))
    p = min(8, len(counts))
    assert all(len(b) == p * 3 for b in batches)
    assert set(np.concatenate(batches).tolist()) == set(range(len(labels)))
    for b in batches:
        classes, n = np.unique(labels[b], return_counts=True)
        assert len(classes) == p and set(n.tolist()) == {3}


def test_augment_shape_dtype_and_determinism():
    rgb = (np.random.default_rng(0).random((120, 90, 3)) * 255).astype(np.uint8)
    a = augment.augment(rgb, 64, np.random.default_rng(1), tr.default_conf)
    b = augment.augment(rgb, 64, np.random.default_rng(1), tr.default_conf)
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)


def test_losses_on_hand_made_embeddings():
    import tensorflow as tf

    labels = tf.constant([0, 0, 1, 1])
    good = tf.math.l2_normalize(tf.constant([[1.0, 0.1], [1.0, -0.1], [0.1, 1.0], [-0.1, 1.0]]), -1)
    bad = tf.math.l2_normalize(tf.constant([[1.0, 0.1], [0.1, 1.0], [1.0, -0.1], [-0.1, 1.0]]), -1)
    assert float(losses.pair_loss(good, labels, 10.0, -5.0)) < float(losses.pair_loss(bad, labels, 10.0, -5.0))
    weights = tf.constant([[1.0, 0.0], [0.0, 1.0]])
    plain = losses.class_logits(good, weights, labels, 16.0, 0.0)
    arc = losses.class_logits(good, weights, labels, 16.0, 0.3)
    target = tf.one_hot(labels, 2)
    # the margin lowers only the target logit
    assert np.all((plain - arc).numpy()[target.numpy() == 1] > 0)
    np.testing.assert_allclose((plain - arc).numpy()[target.numpy() == 0], 0, atol=1e-5)


def test_attention_numpy_matches_tensorflow():
    rng = np.random.default_rng(0)
    arrays = {"conv1_kernel": rng.normal(size=(112, 8)), "conv1_bias": rng.normal(size=8),
              "conv2_kernel": rng.normal(size=(8, 1)), "conv2_bias": rng.normal(size=1)}
    fmap = rng.random((5, 7, 112)).astype(np.float32)
    scores = md.attention_fn(arrays)(fmap)
    assert scores.shape == (5, 7) and scores.dtype == np.float32 and np.all(scores > 0)
    tf_scores = network.attention_scores_tf(fmap[None],
                                            {f"attention/{k}": v.astype(np.float32) for k, v in arrays.items()})
    np.testing.assert_allclose(scores, tf_scores.numpy()[0, ..., 0], rtol=1e-4, atol=1e-5)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(md.ModelDirError, match="not a model directory"):
        md.load_global_head(tmp_path)


def test_training_reduces_the_loss_and_keeps_the_best(trained):
    conf, out = trained
    log = md.read_train_log(out)
    assert [r["epoch"] for r in log] == [1, 2]
    assert log[1]["loss"] < log[0]["loss"]
    assert all(0 <= r["dev_mAP"] <= 1 and 0 <= r["dev_Recall@1"] <= 1 for r in log)
    config = md.read_config(out)
    assert config["best"]["epoch"] in (1, 2)
    assert config["best"]["dev"]["mAP"] == max(r["dev_mAP"] for r in log)
    assert not set(config["classes"]["train"]) & set(config["classes"]["dev"])
    assert len(config["classes"]["dev"]) == 2
    json.dumps(config)  # plain JSON


def test_model_dir_round_trips_to_identical_descriptors(trained, tiny_data, weights_cache):
    """Descriptors from the checkpoint's in-process network equal those of the pipeline's
    loader (`Lite(weights_dir=...)`) on the saved directory."""
    from stages.global_embed.extract import default_conf, describe
    from stages.global_embed.models import Lite

    conf, out = trained
    config = md.read_config(out)
    state = checkpoint.read_state(out)
    assert state["epoch"] == 2
    # Rebuild the network of the best epoch from the saved weights, in process.
    net = network.Network(conf, len(config["classes"]["train"]), lite.imagenet_weights(weights_cache), 0)
    weights = lite.unflatten_weights(md._group(out, "backbone"))
    lite.set_weights(net.backbone, weights)
    head = md._group(out, "global_head")
    net.v["head/kernel"].assign(head["kernel"])
    net.v["head/bias"].assign(head["bias"])
    in_process = network.KerasFeatureModel(net)

    loaded = Lite(weights_cache, weights_dir=out)
    assert loaded.head is not None and loaded.identity.startswith("lite0-trained-")
    rgb = (np.random.default_rng(3).random((90, 120, 3)) * 255).astype(np.uint8)
    a, b = describe(in_process, rgb, default_conf), describe(loaded, rgb, default_conf)
    assert a.shape == (len(default_conf["regions"]), conf["embed_dim"])
    np.testing.assert_allclose(a, b, atol=1e-5)
    # The best epoch's dev metrics, measured in process during training, are reproduced
    # by the pipeline's loader on the saved directory.
    dataset = load_dataset(tiny_data, require_test=False)
    dev = data.load_dev({c: dataset.train[c] for c in config["classes"]["dev"]}, conf["dev_resize"])
    again = loop.dev_metrics(loaded, dev, conf)
    assert again["mAP"] == pytest.approx(config["best"]["dev"]["mAP"], abs=1e-6)
    assert again["Recall@1"] == pytest.approx(config["best"]["dev"]["Recall@1"], abs=1e-6)
    # and it differs from the untrained pipeline
    imagenet = Lite(weights_cache)
    assert describe(imagenet, rgb, default_conf).shape[1] == lite.HEAD_CHANNELS
    assert imagenet.identity != loaded.identity


def test_attention_loader_and_local_backend(trained, weights_cache):
    from stages.local_delf.backends import DenseLite0
    from stages.local_delf.extract import default_conf

    _, out = trained
    score = md.load_attention(out)
    fmap = np.random.default_rng(0).random((6, 9, lite.STRIDE16_CHANNELS)).astype(np.float32)
    assert score(fmap).shape == (6, 9)
    backend = DenseLite0({**default_conf, "weights_dir": str(out), "resize_to": 128, "image_scales": [1.0]},
                         weights_cache)
    assert backend.attention is not None
    feats = backend((np.random.default_rng(1).random((100, 128, 3)) * 255).astype(np.uint8))
    assert feats["descriptors"].shape[1] == lite.STRIDE16_CHANNELS and len(feats["scores"]) > 0


def test_resume_continues_from_the_saved_epoch(trained, tiny_data, weights_cache, tmp_path, caplog):
    import shutil

    conf, out = trained
    copy = tmp_path / "model"
    shutil.copytree(out, copy)
    # Same conf and epochs: nothing left to do, the directory is unchanged.
    before = md.weights_identity(copy)
    tr.train(conf, tiny_data, copy, weights_cache)
    assert md.weights_identity(copy) == before and len(md.read_train_log(copy)) == 2
    # One more epoch continues at epoch 3 with the saved history.
    tr.train({**conf, "epochs": 3}, tiny_data, copy, weights_cache, resume=True)
    log = md.read_train_log(copy)
    assert [r["epoch"] for r in log] == [1, 2, 3]
    assert log[:2] == md.read_train_log(out)
    assert checkpoint.read_state(copy)["epoch"] == 3
    # Another conf refuses the checkpoint; a model without one is not overwritten silently.
    with pytest.raises(ValueError, match="another conf"):
        tr.train({**conf, "embed_dim": 16}, tiny_data, copy, weights_cache)
    shutil.rmtree(copy / md.CHECKPOINT_DIR)
    with pytest.raises(ValueError, match="without a checkpoint"):
        tr.train(conf, tiny_data, copy, weights_cache)


def test_nsml_save_and_load_the_model_directory(trained, tmp_path, monkeypatch):
    from pipeline import nsml

    _, out = trained
    monkeypatch.setitem(nsml._state, "model_dir", None)  # restored after the test
    nsml.configure(model_dir=out)
    nsml.save(tmp_path / "session")
    monkeypatch.setitem(nsml._state, "model_dir", None)
    nsml.load(tmp_path / "session")
    restored = nsml._state["model_dir"]
    assert md.read_config(restored)["best"] == md.read_config(out)["best"]
    assert md.weights_identity(restored) == md.weights_identity(out)
    assert not (restored / md.CHECKPOINT_DIR).exists()


def test_cli_help_and_bad_data(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tr.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--data", "--output", "--epochs", "--resume", "--stop-gradient-sim", "--classifier", "--dev-classes"):
        assert flag in text
    assert tr.main(["--data", str(tmp_path / "missing"), "--output", str(tmp_path / "m")]) == 2
