import numpy as np
import pytest
import tensorflow as tf

from stages.common.pca import apply_whitening, l2_normalize, learn_pca_whitening
from stages.common.shortlist import read_pairs
from stages.global_embed.extract import DEFAULT_CONF, confs, default_conf, describe, region_slices
from stages.global_embed.models import FeatureModel, HubFeatureVector, KerasResNet50
from stages.global_embed.pooling import combine_scales, gem
from stages.global_embed.rank import write_ranking
from stages.global_embed.search import rank_all
from stages.global_embed.whitening import learn_cached, learn_pair_whitening, same_class_pairs


def test_gem_hand_computed():
    fmap = np.zeros((2, 2, 2), np.float32)
    fmap[..., 0] = [[1, 2], [3, 4]]
    fmap[..., 1] = 2.0
    # p = 1 is the mean; p = 3 is the cube root of the mean cube
    np.testing.assert_allclose(gem(fmap, p=1), [2.5, 2.0], rtol=1e-6)
    np.testing.assert_allclose(gem(fmap, p=3), [((1 + 8 + 27 + 64) / 4) ** (1 / 3), 2.0], rtol=1e-6)
    # large p approaches max pooling
    assert gem(fmap, p=200)[0] == pytest.approx(4.0, rel=0.01)


def test_combine_scales_is_unit_norm_generalized_mean():
    d = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    np.testing.assert_allclose(combine_scales(d, p=1), [2 ** -0.5, 2 ** -0.5], rtol=1e-6)
    assert np.linalg.norm(combine_scales(np.random.default_rng(0).random((3, 16)), p=3)) == pytest.approx(1.0)


def test_region_slices_cover_fractions_and_never_empty():
    slices = region_slices((10, 20), [[0, 0, 1, 1], [0.25, 0.5, 0.75, 1.0], [0.99, 0.99, 1, 1]])
    assert slices[0] == (slice(0, 10), slice(0, 20))
    assert slices[1] == (slice(2, 8), slice(10, 20))  # round(2.5) = 2, round(7.5) = 8
    ys, xs = slices[2]
    assert ys.stop > ys.start and xs.stop > xs.start


@pytest.mark.parametrize("backend", ["faiss", "blas"])
def test_rank_all_matches_brute_force_and_is_a_permutation(backend):
    rng = np.random.default_rng(1)
    refs = l2_normalize(rng.normal(size=(50, 16)))
    queries = l2_normalize(rng.normal(size=(7, 16)))
    order, scores = rank_all(queries, refs, backend=backend)
    sims = queries @ refs.T
    np.testing.assert_array_equal(order, np.argsort(-sims, axis=1, kind="stable"))
    np.testing.assert_allclose(scores, np.take_along_axis(sims, order, 1), rtol=1e-5, atol=1e-6)
    assert all(sorted(row) == list(range(50)) for row in order.tolist())


@pytest.mark.parametrize("backend", ["faiss", "blas"])
def test_rank_all_with_regions_takes_the_best_region(backend):
    refs = np.eye(3, dtype=np.float32)
    # query region 0 looks like ref 0 a little, region 1 exactly like ref 2
    queries = l2_normalize(np.array([[[0.6, 0.5, 0.0], [0.0, 0.0, 1.0]]], np.float32))
    order, scores = rank_all(queries, refs, backend=backend)
    assert order[0].tolist() == [2, 0, 1]
    assert scores[0, 0] == pytest.approx(1.0)


@pytest.mark.parametrize("backend", ["faiss", "blas"])
def test_rank_all_ranks_nan_references_last(backend):
    refs = np.array([[1, 0], [np.nan, np.nan], [0, 1]], np.float32)
    order, scores = rank_all(np.array([[0.0, 1.0]], np.float32), refs, backend=backend)
    assert order[0].tolist() == [2, 0, 1]
    assert scores[0, 2] == -np.inf


def integer_descriptors(rng, shape):
    """Small integers as float32: every inner product exact, many tied (faiss and numpy
    then compute the same scores, so their rankings must agree position by position)."""
    return rng.integers(-2, 3, size=shape).astype(np.float32)


@pytest.mark.parametrize("max_k", [2, 7, 49, 50, 2048])
@pytest.mark.parametrize("k", [1, 5, 25, 50])
def test_shortlist_is_the_top_of_the_stable_full_ranking(max_k, k):
    """faiss searches at most max_k neighbours (GPU indexes answer k <= 2048); where that
    cannot hold the exact top k, the matrix product ranks it: the result is always the
    first k positions of the stable full ranking, ties by index (R = 50, one NaN)."""
    from stages.global_embed.search import shortlist_all

    rng = np.random.default_rng(3)
    refs = integer_descriptors(rng, (50, 4))
    refs[20] = np.nan
    queries = integer_descriptors(rng, (6, 2, 4))
    order, scores = shortlist_all(queries, refs, k, backend="faiss", max_k=max_k)
    full_order, full_scores = rank_all(queries, refs, backend="blas")
    np.testing.assert_array_equal(order, full_order[:, :k])
    np.testing.assert_array_equal(scores, full_scores[:, :k])
    assert k == 50 or (full_scores[:, k - 1] == full_scores[:, k]).any()  # a tie across the cut, decided by index


class FakeGpuIndex:
    """A CPU IndexFlatIP that answers as a faiss GPU index: k <= 2048 or an error."""

    searches: list[int] = []

    def __init__(self, dim: int, gpus: int | None = None):
        import faiss

        assert gpus and gpus > 0, "the GPU path builds its index for the GPUs"
        self.index = faiss.IndexFlatIP(dim)

    def add(self, x):
        self.index.add(x)

    @property
    def ntotal(self):
        return self.index.ntotal

    def search(self, x, k):
        from stages.global_embed.search import GPU_MAX_K

        if k > GPU_MAX_K:
            raise RuntimeError(f"k = {k} > {GPU_MAX_K}: faiss GPU indexes answer k <= 2048")
        FakeGpuIndex.searches.append(k)
        return self.index.search(x, k)


@pytest.mark.parametrize("k", [400, 2047, 3000])
def test_gpu_path_ranks_more_than_2048_references_as_the_cpu(monkeypatch, k):
    """With faiss seeing a GPU (faked), ranking 5000 references asks faiss for <= 2048
    neighbours only and gives the CPU's ranking, position by position (k = 3000 cannot be
    searched on a GPU: the matrix product ranks that top)."""
    from stages.global_embed import search

    rng = np.random.default_rng(4)
    refs = integer_descriptors(rng, (5000, 6))
    queries = integer_descriptors(rng, (9, 3, 6))
    cpu_order, cpu_scores = rank_all(queries, refs, backend="faiss", top_k=k)
    FakeGpuIndex.searches = []
    monkeypatch.setattr(search, "faiss_gpus", lambda: 1)
    monkeypatch.setattr(search, "make_index", FakeGpuIndex)
    gpu_order, gpu_scores = rank_all(queries, refs, backend="faiss", top_k=k)
    np.testing.assert_array_equal(gpu_order, cpu_order)
    np.testing.assert_array_equal(gpu_scores, cpu_scores)
    np.testing.assert_array_equal(gpu_order, rank_all(queries, refs, backend="blas")[0])
    assert all(sorted(row) == list(range(5000)) for row in gpu_order.tolist())
    assert FakeGpuIndex.searches == ([] if k > 2047 else [min(2 * k, 2048)])


def test_rank_all_faiss_and_blas_agree():
    rng = np.random.default_rng(2)
    refs = l2_normalize(rng.normal(size=(300, 32)))
    queries = l2_normalize(rng.normal(size=(20, 3, 32)))
    faiss_order, faiss_scores = rank_all(queries, refs, backend="faiss")
    blas_order, blas_scores = rank_all(queries, refs, backend="blas")
    np.testing.assert_array_equal(faiss_order[:, :50], blas_order[:, :50])
    np.testing.assert_allclose(faiss_scores, blas_scores, atol=1e-5)


def test_shortlist_round_trip(tmp_path):
    order = np.array([[2, 0, 1], [1, 2, 0]], np.int32)
    _, pairs = write_ranking(tmp_path, ["q a", "q2"], ["r0", "r 1", "r2"], order, np.zeros((2, 3), np.float32),
                             top_k=2, unranked={"q2"})
    assert pairs.name == "pairs-global-top2.txt"
    assert read_pairs(pairs) == {"q a": ["r2", "r0"]}


def test_pca_whitening_decorrelates():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    w = learn_pca_whitening(x, dim=8)
    y = (x - w["mean"]) @ w["projection"].T
    np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(8), atol=1e-3)
    assert apply_whitening(x, w).shape == (500, 8)


def test_same_class_pairs():
    first, second = same_class_pairs(["a", "b", "a", "a", "c"])
    assert sorted(zip(first.tolist(), second.tolist(), strict=True)) == [(0, 2), (0, 3), (2, 3)]


def test_pair_whitening_brings_matching_pairs_together():
    """A nuisance direction that varies within classes is suppressed by learned whitening."""
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(20, 6))
    labels = np.repeat(np.arange(20), 4)
    x = centres[labels] + 0.05 * rng.normal(size=(80, 6))
    x[:, 0] += 5.0 * rng.normal(size=80)  # large within-class nuisance
    w = learn_pair_whitening(x, labels, dim=5)
    y = apply_whitening(x, w)
    same = labels[:, None] == labels[None]
    sims = y @ y.T
    raw = l2_normalize(x) @ l2_normalize(x).T
    assert sims[same].mean() - sims[~same].mean() > raw[same].mean() - raw[~same].mean() + 0.3
    with pytest.raises(ValueError):
        learn_pair_whitening(x[:3], [0, 1, 2])


class ConstantMap(FeatureModel):
    def __call__(self, rgb):
        return np.ones((4, 6, 8), np.float32) * rgb.mean()


def test_describe_returns_unit_region_descriptors():
    d = describe(ConstantMap(), np.full((100, 150, 3), 7, np.uint8), default_conf)
    assert d.shape == (len(default_conf["regions"]), 8)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, rtol=1e-5)


class ColumnMap(FeatureModel):
    """A map that is not mirror-equivariant, as a CNN's is not: the pixels plus their column."""

    def __call__(self, rgb):
        return rgb.astype(np.float32) + np.arange(rgb.shape[1], dtype=np.float32)[None, :, None]


def test_flip_augmentation_makes_the_descriptor_mirror_invariant():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (40, 60, 3), np.uint8)
    mirror = np.ascontiguousarray(image[:, ::-1])
    flip = dict(default_conf, scales=[1.0], flip=True)
    a, b = describe(ColumnMap(), image, flip), describe(ColumnMap(), mirror, flip)
    # whole image and the centred regions (rows 0-2) equal; the top-left region (row 3,
    # [0, 0, .75, .75]) of one is the top-right one (row 5, [0, .25, .75, 1]) of the other
    np.testing.assert_allclose(a[:3], b[:3], atol=1e-6)
    np.testing.assert_allclose(a[3], b[5], atol=1e-6)
    assert default_conf["flip"] is False  # the base conf: without it the mirror differs
    assert confs[DEFAULT_CONF]["flip"] is True  # the pipeline's default
    plain = dict(default_conf, scales=[1.0])
    assert not np.allclose(describe(ColumnMap(), image, plain)[0], describe(ColumnMap(), mirror, plain)[0], atol=1e-4)


def test_lite2_backbone_gives_a_head_map_of_its_own_identity(weights_cache):
    from stages.global_embed.models import load_model, model_identity

    conf = dict(confs["lite2-gem"], weights_dir=None)
    model = load_model(conf, weights_cache)
    out = model(np.full((100, 70, 3), 128, np.uint8))
    assert out.shape == (4, 3, 1280) and out.dtype == np.float32  # ceil(100 / 32), ceil(70 / 32)
    assert model.identity == model_identity(conf) and model.identity.startswith("lite2-imagenet-")
    assert model.identity != model_identity({"model": "lite0"})
    with pytest.raises(ValueError, match="Lite0"):
        load_model(dict(conf, weights_dir="models/any"), weights_cache)


def test_keras_resnet50_loading_code_without_download():
    model = KerasResNet50(weights=None)  # the "imagenet" path is the same call with a download
    out = model(np.zeros((64, 96, 3), np.uint8))
    assert out.shape == (2, 3, 2048)


def test_tfhub_feature_vector_from_a_local_module(tmp_path):
    class Stub(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            return tf.concat([tf.reduce_mean(images, axis=[1, 2]), tf.reduce_max(images, axis=[1, 2])], axis=1)

    tf.saved_model.save(Stub(), str(tmp_path / "module"))
    model = HubFeatureVector(str(tmp_path / "module"), input_size=32)
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 1] = 255
    np.testing.assert_allclose(model(rgb), [0, 1, 0, 0, 1, 0], atol=1e-6)
    assert model.returns_map is False
    with pytest.raises(ValueError, match="hub-handle"):
        HubFeatureVector("")


def test_shards_split_the_work(tmp_path):
    from stages.common.cache import FeatureStore
    from stages.common.conf import parse_shard, resolve
    from stages.global_embed.extract import main
    from tests.conftest import write_image

    images = {f"img{i}": write_image(tmp_path / "img" / f"img{i}.png", np.full((40, 50, 3), 20 * i, np.uint8))
              for i in range(5)}
    conf = resolve(default_conf, confs, "lite0-gem")
    store = FeatureStore.open(main(conf, images, tmp_path / "cache", shard=parse_shard("0/2"), model=ConstantMap()))
    assert store.names() == {"img0", "img2", "img4"}
    main(conf, images, tmp_path / "cache", shard=parse_shard("1/2"), model=ConstantMap())
    assert store.names() == set(images)
    with pytest.raises(ValueError):
        parse_shard("2/2")
    with pytest.raises(ValueError):
        parse_shard("half")


def test_pair_whitening_with_fewer_training_images_than_dimensions_is_stable():
    """Axes the training images do not span are not left to float rounding: descriptors
    changed by 1e-7 give the same whitened descriptors (before, cosine 0.1-0.2 with 250
    training images at D = 1280)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 300))
    labels = np.repeat(np.arange(12), 5)
    refs = rng.normal(size=(80, 300))
    test = rng.normal(size=(5, 300))
    learned = learn_pair_whitening(x, labels, dim=100)
    n = len(learned["projection"])
    assert 50 <= n <= 60 and learned["projection"].shape[1] == 300  # the training data's rank, not 100
    completed = learn_pair_whitening(x, labels, dim=100, complete_with=refs)
    assert completed["projection"].shape == (100, 300)
    np.testing.assert_allclose(completed["projection"][:n], learned["projection"], atol=1e-5)
    noise = 1e-7 * rng.normal(size=x.shape)
    for w, again in ((learned, learn_pair_whitening(x + noise, labels, dim=100)),
                     (completed, learn_pair_whitening(x + noise, labels, dim=100, complete_with=refs))):
        cos = (apply_whitening(test, w) * apply_whitening(test, again)).sum(axis=1)
        assert cos.min() > 0.9999
    # the completing axes are the references' principal axes outside the learned ones:
    # uncorrelated, by decreasing variance
    y = (refs - completed["mean"]) @ completed["projection"][n:].T
    gram = y.T @ y
    off = gram - np.diag(np.diag(gram))
    assert np.abs(off).max() < 1e-3 * np.diag(gram).max()
    assert np.all(np.diff(np.diag(gram)) <= 1e-6 * np.diag(gram).max())


def test_learned_whitening_is_cached_by_its_inputs(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    labels = [i // 4 for i in range(40)]
    calls = []

    def learn_pair_whitening_counted(*args, **kwargs):
        calls.append(args)
        return learn_pair_whitening(*args, **kwargs)

    first = learn_cached(tmp_path, learn_pair_whitening_counted, x, labels, 4)
    again = learn_cached(tmp_path, learn_pair_whitening_counted, x, labels, 4)
    assert len(calls) == 1, "the second call reads the cached file"
    for key, value in learn_pair_whitening(x, labels, 4).items():
        np.testing.assert_array_equal(first[key], value)
        np.testing.assert_array_equal(again[key], value)
    learn_cached(tmp_path, learn_pair_whitening_counted, x, labels, 5)  # another dim
    learn_cached(tmp_path, learn_pair_whitening_counted, x * 2, labels, 4)  # other descriptors
    learn_cached(tmp_path, learn_pair_whitening_counted, x, labels[::-1], 4)  # other labels
    assert len(calls) == 4
    for path in tmp_path.iterdir():
        path.write_bytes(b"corrupt")
    relearned = learn_cached(tmp_path, learn_pair_whitening_counted, x, labels, 4)
    assert len(calls) == 5
    np.testing.assert_array_equal(relearned["projection"], first["projection"])
    assert learn_cached(None, learn_pca_whitening, x, 3)["projection"].shape == (3, 6)
