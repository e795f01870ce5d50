"""The Keras port of EfficientNet-Lite0 and -Lite2 against PyTorch reference outputs (see
tests/fixtures/make_lite_reference.py, computed once with PyTorch; torch is not needed here)."""

from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from stages.common.backbone import efficientnet_lite as lite
from stages.common.backbone.legacy_pth import load_legacy_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
CROPS = {"chelsea224": lambda: data.chelsea()[38:262, 113:337],
         "astronaut201x173": lambda: data.astronaut()[0:201, 30:203]}


@pytest.fixture(scope="module", params=sorted(lite.VARIANTS))
def net(request, weights_cache):
    """(variant name, its Keras model with ImageNet weights and every endpoint)."""
    model = lite.build_lite0(outputs=("stride16", "head", "logits"), include_top=True, name=request.param)
    lite.set_weights(model, lite.imagenet_weights(weights_cache, request.param))
    return request.param, model


def test_legacy_reader_honours_strides():
    state = load_legacy_state_dict(lite.shipped_checkpoint())
    assert len(state) == 296
    stem = state["_conv_stem.weight"]
    assert stem.shape == (32, 3, 3, 3) and stem.dtype == np.float32 and stem.flags.c_contiguous
    assert state["_bn0.num_batches_tracked"].shape == ()
    assert state["_fc.weight"].shape == (1000, 1280)


def test_lite2_stage_table_matches_its_checkpoint():
    """21 blocks whose channel counts are those of the shipped Lite2 state dict."""
    state = load_legacy_state_dict(lite.shipped_checkpoint("lite2"))
    specs = lite.block_specs("lite2")
    assert len(specs) == 21 and lite.VARIANTS["lite2"].stride16_block == 14
    for i, (k, _, _, cin, cout) in enumerate(specs):
        assert state[f"_blocks.{i}._project_conv.weight"].shape[:2] == (cout, cin * (1 if i == 0 else 6))
        assert state[f"_blocks.{i}._depthwise_conv.weight"].shape[2:] == (k, k)
    assert f"_blocks.{len(specs)}._project_conv.weight" not in state


@pytest.mark.parametrize("crop", sorted(CROPS))
def test_port_matches_pytorch_within_1e4(net, crop):
    name, model = net
    ref = np.load(FIXTURES / f"{name}_torch_reference.npz")
    rgb = CROPS[crop]()
    out = {k: v[0].numpy() for k, v in model(lite.preprocess(rgb)[None], training=False).items()}
    assert out["stride16"].shape == tuple(ref[f"{crop}/stride16_shape"])
    assert out["head"].shape == tuple(ref[f"{crop}/head_shape"])
    np.testing.assert_allclose(out["logits"], ref[f"{crop}/logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["head"].mean(axis=(0, 1)), ref[f"{crop}/head_mean"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(out["stride16"].mean(axis=(0, 1)), ref[f"{crop}/stride16_mean"], atol=1e-4, rtol=0)
    probes = ref["probe_yx"]
    np.testing.assert_allclose(np.stack([out["stride16"][y, x] for y, x in probes]),
                               ref[f"{crop}/stride16_probe"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.stack([out["head"][y, x, :64] for y, x in probes]),
                               ref[f"{crop}/head_probe"], atol=1e-4, rtol=0)


def test_chelsea_is_a_cat(net):
    rgb = cv2.resize(data.chelsea(), (224, 224), interpolation=cv2.INTER_AREA)
    logits = net[1](lite.preprocess(rgb)[None], training=False)["logits"][0].numpy()
    assert 281 <= int(np.argmax(logits)) <= 285  # ImageNet's domestic cat classes


def test_conversion_is_cached(weights_cache):
    first = lite.imagenet_weights(weights_cache)
    files = list((weights_cache / "weights").glob("efficientnet_lite0_imagenet-*.npz"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns
    again = lite.imagenet_weights(weights_cache)
    assert files[0].stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(first["head_conv"][0], again["head_conv"][0])


@pytest.mark.parametrize("size", [1, 7, 16, 33, 224, 1023])
def test_feature_centers_match_a_delta_probe(size):
    """Receptive-field centres: a 1-pixel change moves the output cell whose centre is nearest."""
    layers = lite.strided_layers(lite.STRIDE16_BLOCK)
    centers = lite.feature_centers(size, layers)
    assert len(centers) == -(-size // 16)
    assert np.all(np.diff(centers) == 16)
    assert 0 <= centers[0] < 16
