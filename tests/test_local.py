"""Stage 2 local features: geometry, empty inputs, the delf-hub loading path (stub module)."""

import numpy as np
import pytest
import tensorflow as tf
from skimage import data

from stages.common.conf import resolve
from stages.local_delf import extract as local_extract
from stages.local_delf.backends import DelfHub, DenseLite0, Sift
from stages.local_delf.geometry import rotate_image, unrotate_points
from stages.local_delf.keypoints import select_top


def conf(name="delf-lite0", **override):
    return resolve(local_extract.default_conf, local_extract.confs, name, override)


@pytest.fixture(scope="module")
def lite0(weights_cache):
    return DenseLite0(conf(image_scales=[1.0], resize_to=320), weights_cache)


def textured_patch_image():
    """Flat grey 320x240 image with one textured 96x96 patch whose centre is (x=230, y=70)
    (a flat region has no keypoints)."""
    rgb = np.full((240, 320, 3), 128, np.uint8)
    patch = data.astronaut()[156:252, 176:272]
    rgb[22:118, 182:278] = patch
    return rgb


def test_keypoints_lie_inside_the_image(lite0):
    rgb = data.astronaut()[:300, :220]
    feats = local_extract.describe(lite0, rgb, [0, 90, 270], None)
    xy = feats["keypoints_xy"]
    assert len(xy) > 0
    assert np.all(xy >= 0) and np.all(xy[:, 0] <= 219) and np.all(xy[:, 1] <= 299)
    assert feats["image_size"].tolist() == [220, 300]
    assert set(feats["rotations"].tolist()) == {0, 90, 270}
    assert feats["descriptors"].dtype == np.float16


@pytest.mark.parametrize("degrees", [90, 270])
def test_rotation_moves_keypoints_accordingly(lite0, degrees):
    rgb = textured_patch_image()
    upright = lite0(rgb)
    rotated = lite0(rotate_image(rgb, degrees))
    back = unrotate_points(rotated["keypoints_xy"], degrees, (320, 240))
    # every keypoint, the strongest first, sits on the textured patch (within one stride,
    # 16 px) in both: the flat grey around it gives none
    for xy in (back, upright["keypoints_xy"]):
        assert len(xy) and np.all(np.abs(xy - [230, 70]) <= 48 + 16)
    # on an image textured everywhere, the whole grid of cells maps onto the upright grid
    # within one stride along each axis (border cells are clipped into the image)
    rgb = np.ascontiguousarray(data.astronaut()[40:280, 100:420])
    upright, rotated = lite0(rgb), lite0(rotate_image(rgb, degrees))
    back = unrotate_points(rotated["keypoints_xy"], degrees, (320, 240))
    dist = np.abs(back[:, None] - upright["keypoints_xy"][None]).max(axis=-1).min(axis=1)
    assert len(back) > 100 and dist.max() <= 16


def test_unrotate_points_inverts_rot90():
    img = np.zeros((5, 7), int)
    img[1, 5] = 1  # (x=5, y=1)
    for degrees in (0, 90, 180, 270):
        y, x = np.argwhere(rotate_image(img, degrees) == 1)[0]
        np.testing.assert_array_equal(unrotate_points(np.array([[x, y]]), degrees, (7, 5)), [[5, 1]])


@pytest.mark.parametrize("shape", [(8, 8, 3), (1, 1, 3), (12, 400, 3)])
def test_tiny_images_give_zero_keypoints(lite0, weights_cache, shape):
    rgb = np.full(shape, 90, np.uint8)
    for backend in (lite0, Sift(conf("sift"), weights_cache)):
        feats = local_extract.describe(backend, rgb, [0, 90], None)
        assert feats["keypoints_xy"].shape == (0, 2)
        assert feats["descriptors"].shape == (0, backend.dim)


def test_flat_image_gives_zero_sift_keypoints(weights_cache):
    feats = Sift(conf("sift"), weights_cache)(np.full((200, 300, 3), 40, np.uint8))
    assert feats["keypoints_xy"].shape == (0, 2)


def test_rootsift_descriptors_are_unit_norm_inside(weights_cache):
    rgb = data.astronaut()
    feats = Sift(conf("sift"), weights_cache)(rgb)
    assert 100 < len(feats["keypoints_xy"]) <= 1000
    np.testing.assert_allclose(np.linalg.norm(feats["descriptors"], axis=1), 1.0, rtol=1e-5)
    assert np.all(feats["keypoints_xy"] >= -0.5) and np.all(feats["keypoints_xy"] <= 511.5)


def test_select_top_keeps_best_across_levels():
    levels = [{"keypoints_xy": np.array([[0, 0], [1, 1]], np.float32), "descriptors": np.eye(2, dtype=np.float32),
               "scores": np.array([1.0, 5.0], np.float32), "scales": np.array([1.0, 1.0], np.float32)},
              {"keypoints_xy": np.array([[9, 9]], np.float32), "descriptors": np.ones((1, 2), np.float32),
               "scores": np.array([3.0], np.float32), "scales": np.array([0.5], np.float32)}]
    top = select_top(levels, max_num=2)
    assert top["keypoints_xy"].tolist() == [[1, 1], [9, 9]] and top["scales"].tolist() == [1.0, 0.5]
    assert select_top(levels, max_num=5, score_threshold=2.0)["scores"].tolist() == [5.0, 3.0]


class StubDelf(tf.Module):
    """Same signature as tfhub.dev/google/delf/1 "default": locations are (y, x)."""

    @tf.function(input_signature=[
        tf.TensorSpec([None, None, 3], tf.float32, name="image"),
        tf.TensorSpec([], tf.float32, name="score_threshold"),
        tf.TensorSpec([None], tf.float32, name="image_scales"),
        tf.TensorSpec([], tf.int32, name="max_feature_num")])
    def default(self, image, score_threshold, image_scales, max_feature_num):
        h = tf.cast(tf.shape(image)[0], tf.float32)
        w = tf.cast(tf.shape(image)[1], tf.float32)
        locations = tf.stack([[0.0, 0.0], [h - 1, w - 1], [10.0, 20.0]])
        brightness = tf.reduce_mean(image)
        descriptors = tf.tile(tf.reshape(brightness, [1, 1]), [3, 40])
        return {"locations": locations, "descriptors": descriptors,
                "scales": tf.ones([3]), "attention": tf.fill([3], score_threshold)}


def test_delf_hub_backend_with_a_stub_module(tmp_path, weights_cache):
    module = StubDelf()
    tf.saved_model.save(module, str(tmp_path / "delf"), signatures={"default": module.default})
    backend = DelfHub(conf("delf-hub", hub_handle=str(tmp_path / "delf"), resize_to=100), weights_cache)
    rgb = np.full((300, 200, 3), 255, np.uint8)  # resized to 100 x 67 before the module
    feats = backend(rgb)
    # (y, x) of the resized image -> (x, y) of the original
    np.testing.assert_allclose(feats["keypoints_xy"][0], [0.0, 0.0], atol=1.6)
    np.testing.assert_allclose(feats["keypoints_xy"][1], [199, 299], atol=1.6)
    np.testing.assert_allclose(feats["keypoints_xy"][2], [(20 + 0.5) * 200 / 67 - 0.5, (10 + 0.5) * 3 - 0.5], atol=0.1)
    np.testing.assert_allclose(np.linalg.norm(feats["descriptors"], axis=1), 1.0, rtol=1e-5)
    assert feats["scores"].tolist() == [100.0, 100.0, 100.0]  # the conf's score_threshold reached the module
    entry = local_extract.describe(backend, rgb, [0], None)
    assert entry["descriptors"].shape == (3, 40) and entry["descriptors"].dtype == np.float16


def test_needs_extraction_reads_the_covered_rotations(tmp_path):
    from stages.common.cache import FeatureStore

    store = FeatureStore(tmp_path, "local", {"name": "t"}, "k")
    images = {}
    for name, rotations in (("both", [0, 90]), ("only0", [0])):
        images[name] = tmp_path / f"{name}.jpg"
        images[name].write_bytes(b"x")
        store.write(name, {"extracted_rotations": np.array(rotations, np.int16)}, images[name])
    images["absent"] = tmp_path / "absent.jpg"
    images["absent"].write_bytes(b"x")
    assert local_extract.needs_extraction(store, images, [0, 90], False) == ["only0", "absent"]
    assert local_extract.needs_extraction(store, images, [0], False) == ["absent"]
    assert local_extract.needs_extraction(store, images, [0], True) == ["both", "only0", "absent"]


def test_the_pca_store_is_keyed_by_the_data_folder_not_its_references(tmp_path):
    """Adding references to a data folder keeps its PCA store; another folder gets its own.
    Without a data folder the store is keyed by the sampled images and their files."""
    PCASource = local_extract.PCASource
    images = {}
    for name, size in (("a1", 3), ("a2", 4), ("b1", 5), ("b2", 6)):
        images[name] = tmp_path / f"{name}.jpg"
        images[name].write_bytes(b"x" * size)
    lite0_conf = conf(pca_max_images=60)

    def store(names, dataset=None):
        return local_extract.store_for(lite0_conf, tmp_path, PCASource({n: images[n] for n in names},
                                                                       dataset=dataset)).dir

    assert store(["a1", "a2"], "/data/A") == store(["a1", "a2", "b1", "b2"], "/data/A") != store(["a1"], "/data/B")
    first = store(["a1", "a2"])
    assert store(["a2", "a1"]) == first and store(["b1", "b2"]) != first
    images["a2"].write_bytes(b"y" * 9)  # same name, other file
    assert store(["a1", "a2"]) != first
    # SIFT learns no PCA: its features are shared across datasets.
    sift = conf("sift")
    assert (local_extract.store_for(sift, tmp_path, PCASource({"a1": images["a1"]})).dir
            == local_extract.store_for(sift, tmp_path, PCASource({"b1": images["b1"]}, dataset="/data/B")).dir)


class _StubDense:
    """A DenseLite0 stand-in: 50 random unit descriptors per image, seeded by its pixels."""

    dim, needs_pca, image_workers = DenseLite0.dim, True, 1

    def __call__(self, rgb, scales=None):
        rng = np.random.default_rng(int(rgb.sum()))
        desc = rng.normal(size=(50, self.dim)).astype(np.float32)
        return {"keypoints_xy": rng.uniform(0, 30, (50, 2)).astype(np.float32),
                "descriptors": desc / np.linalg.norm(desc, axis=1, keepdims=True),
                "scores": np.ones(50, np.float32), "scales": np.ones(50, np.float32)}


def test_the_pca_is_pinned_until_asked_to_relearn(tmp_path, monkeypatch):
    """Learned once on the source's images (training images here), kept when references are
    added and with overwrite; `relearn_since` learns it once again (later calls and other
    shards of the same run keep the new one), deleting the features the old one projected."""
    import time

    from conftest import write_image

    from stages.common.shortlist import write_pairs

    rng = np.random.default_rng(0)
    images = {name: write_image(tmp_path / "img" / f"{name}.png", rng.integers(0, 255, (32, 32, 3), np.uint8))
              for name in ("q1", "q2", "r1", "r2", "r3", "r4", "r5", "train:c/t1", "train:c/t2")}
    training = {n: p for n, p in images.items() if n.startswith("train:")}
    pairs, more = tmp_path / "pairs.txt", tmp_path / "more.txt"
    write_pairs(pairs, [(q, r) for q in ("q1", "q2") for r in ("r1", "r2", "r3", "r4")])
    write_pairs(more, [(q, r) for q in ("q1", "q2") for r in ("r1", "r2", "r3", "r4", "r5")])
    lite0_conf, stub, learned = conf(query_rotations=[0]), _StubDense(), []
    learn = local_extract._learn_pca
    monkeypatch.setattr(local_extract, "_learn_pca", lambda *a: learned.append(sorted(a[3].images)) or learn(*a))

    def run(pairs_path, overwrite=False, shard=(0, 1), since=None):
        source = local_extract.PCASource(training, "training", str(tmp_path / "data"), since)
        return local_extract.main(lite0_conf, pairs_path, images, tmp_path / "cache", overwrite, shard=shard,
                                  backend=lambda: stub, pca_source=source)

    folder = run(pairs)
    assert learned == [["train:c/t1", "train:c/t2"]]
    pca = (folder / "pca.npz").read_bytes()
    assert run(more) == folder and run(more, overwrite=True) == folder and len(learned) == 1
    assert (folder / "pca.npz").read_bytes() == pca
    r1 = (folder / "r1.npz").stat().st_mtime_ns
    since = time.time()
    assert run(more, since=since) == folder and len(learned) == 2
    assert (folder / "r1.npz").stat().st_mtime_ns != r1  # deleted with the old PCA, extracted again
    run(more, shard=(1, 2), since=since)
    run(pairs, since=since)
    assert len(learned) == 2
