"""The backbone runtimes: TensorFlow Lite (XNNPACK) gives TensorFlow's outputs, its
conversion is cached and redone when damaged, and the runtime choice is validated."""

import numpy as np
import pytest
from skimage import data

from stages.common.backbone import efficientnet_lite as lite
from stages.common.backbone import runtime


def _tiny_model(seed: int = 0):
    """A two-layer conv net of any input size with a dict output, as the backbones have."""
    import keras

    x = keras.Input((None, None, 3), name="image")
    h = keras.layers.Conv2D(8, 3, 2, padding="same", activation="relu", name="a")(x)
    out = keras.layers.DepthwiseConv2D(3, 1, padding="same", name="b")(h)
    model = keras.Model(x, {"map": out}, name="tiny")
    rng = np.random.default_rng(seed)
    model.set_weights([rng.normal(0, 0.3, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


def test_tflite_gives_tensorflow_outputs_of_the_shipped_backbone(weights_cache):
    model = lite.build_lite0(outputs=("stride16", "head"))
    lite.set_weights(model, lite.imagenet_weights(weights_cache))
    tf_run = runtime.compile_model(model, weights_cache, "tf")
    tfl_run = runtime.compile_model(model, weights_cache, "tflite")
    assert (tf_run.runtime, tfl_run.runtime) == ("tf", "tflite")
    photo = data.astronaut()  # 512 x 512
    for image in (photo[:320, :448], photo[:448, :320], photo[:320, :448]):  # shapes change and recur
        x = lite.preprocess(image)[None]
        a, b = tf_run(x), tfl_run(x)
        assert set(a) == set(b) == {"stride16", "head"}
        assert a["stride16"].shape == (1, image.shape[0] // 16, image.shape[1] // 16, 112)
        for key in a:
            assert a[key].shape == b[key].shape
            # ReLU6 head maps reach 6, the stride-16 map about 10: both agree to float32 noise
            assert np.abs(a[key] - b[key]).max() < 1e-3
            assert np.abs(a[key]).max() > 1.0


def test_tflite_conversion_is_cached_and_redone_when_damaged(tmp_path, log_lines):
    model = _tiny_model()
    x = np.random.default_rng(1).normal(size=(1, 40, 56, 3)).astype(np.float32)
    expected = runtime.compile_model(model, tmp_path, "tf")(x)["map"]
    assert expected.shape == (1, 20, 28, 8)

    first = runtime.compile_model(model, tmp_path, "tflite")
    assert first.path.parent == tmp_path / "weights" and first.path.exists()
    np.testing.assert_allclose(first(x)["map"], expected, atol=1e-5)
    assert sum("converting tiny" in line for line in log_lines) == 1

    again = runtime.compile_model(model, tmp_path, "tflite")  # read from the cache, not converted
    assert again.path == first.path
    assert sum("converting tiny" in line for line in log_lines) == 1
    np.testing.assert_allclose(again(x)["map"], expected, atol=1e-5)

    first.path.write_bytes(b"not a flatbuffer")
    repaired = runtime.compile_model(model, tmp_path, "tflite")
    assert any("cannot be loaded" in line for line in log_lines)
    assert sum("converting tiny" in line for line in log_lines) == 2
    np.testing.assert_allclose(repaired(x)["map"], expected, atol=1e-5)
    assert [p.name for p in (tmp_path / "weights").iterdir()] == [first.path.name]  # no temporary left


def test_changed_weights_get_another_tflite_file(tmp_path):
    a, b = _tiny_model(0), _tiny_model(1)
    assert runtime.tflite_path(a, tmp_path) != runtime.tflite_path(b, tmp_path)
    assert runtime.tflite_path(a, tmp_path) == runtime.tflite_path(_tiny_model(0), tmp_path)


def test_more_shapes_than_kept_interpreters_still_give_right_outputs(tmp_path):
    model = _tiny_model()
    tf_run, tfl_run = (runtime.compile_model(model, tmp_path, r) for r in ("tf", "tflite"))
    rng = np.random.default_rng(2)
    shapes = [(1, 16 + 8 * i, 24, 3) for i in range(runtime.MAX_SHAPES + 3)]
    for shape in shapes + shapes[::-1]:  # every interpreter is re-allocated for new shapes
        x = rng.normal(size=shape).astype(np.float32)
        np.testing.assert_allclose(tfl_run(x)["map"], tf_run(x)["map"], atol=1e-5)
    assert len(tfl_run._interpreters) == runtime.MAX_SHAPES


def test_runtime_choice(monkeypatch):
    monkeypatch.setattr(runtime, "_settings", {"runtime": None, "threads": None})
    monkeypatch.delenv(runtime.ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="unknown runtime 'onnx'"):
        runtime.configure("onnx")
    monkeypatch.setenv(runtime.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="RETRIEVAL_RUNTIME='bogus'"):
        runtime.selected_runtime()
    monkeypatch.setenv(runtime.ENV_VAR, "tf")
    assert runtime.selected_runtime() == "tf"
    runtime.configure("tflite")  # an explicit choice wins, and worker processes inherit it
    assert runtime.selected_runtime() == "tflite"
    assert runtime.os.environ[runtime.ENV_VAR] == "tflite"

    import tensorflow as tf

    runtime.configure("auto")
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    assert runtime.selected_runtime() == "tflite"
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    assert runtime.selected_runtime() == "tf"  # a GPU keeps TensorFlow


def test_a_tensorflow_without_tflite_falls_back_to_tensorflow(tmp_path, monkeypatch, log_lines):
    import tensorflow as tf

    monkeypatch.delattr(tf, "lite")
    run = runtime.compile_model(_tiny_model(), tmp_path, "tflite")
    assert run.runtime == "tf"
    assert any("TensorFlow Lite is not available" in line for line in log_lines)
