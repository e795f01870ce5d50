"""Where a Keras backbone runs: TensorFlow Lite with XNNPACK on CPU, TensorFlow on a GPU.

The Keras model stays the single definition of the network. For the "tflite" runtime it is
converted once (Keras SavedModel export, then ``tf.lite.TFLiteConverter``) into a
``.tflite`` file under ``<cache>/weights/``, named by a digest of the architecture, the
requested endpoints, every weight and the TensorFlow version, so changed weights are
converted again. TFLite's XNNPACK CPU delegate (in the tensorflow wheel) runs the
pipeline's global and local extraction about 2x faster than TensorFlow on 2 cores, with
the same outputs to float32 noise (`bench/bench_runtime.py`, BENCHMARKS.md "Backbone
runtimes"). A GPU keeps TensorFlow, which TFLite cannot use there.

The runtime is not part of any feature cache key: both run the same network on the same
weights, and `tests/test_runtime.py` checks that they agree.
"""

import hashlib
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .. import logger
from ..cache import atomic_write_bytes

RUNTIMES = ("auto", "tflite", "tf")
ENV_VAR = "RETRIEVAL_RUNTIME"
# Interpreters kept per runner, each allocated for one recent input shape. Creating one
# costs about 35 ms (XNNPACK packs the weights) and re-allocating one for a new shape 4-40 ms
# (512-1024 px); a query's local features need 8 shapes (4 scales, upright and sideways), and
# the same shapes recur from photo to photo. 8 interpreters of the stride-16 model hold
# about 500 MB at 1024 px; past 8, the least recently used one is re-allocated.
MAX_SHAPES = 8

_settings = {"runtime": None, "threads": None}


def configure(runtime: str | None = None, threads: int | None = None) -> None:
    """Sets the runtime (and CPU threads) of every backbone loaded afterwards in this process.

    Args:
        runtime: "auto" (TensorFlow when a GPU is visible, else TFLite), "tflite" or "tf";
            None keeps the current choice (default: ``$RETRIEVAL_RUNTIME`` or "auto").
        threads: TFLite CPU threads; None keeps the current choice (default: the cores this
            process may use).

    Raises:
        ValueError: unknown runtime.
    """
    if runtime is not None:
        _settings["runtime"] = _checked(runtime)
        os.environ[ENV_VAR] = runtime  # worker processes started from here inherit it
    if threads is not None:
        _settings["threads"] = int(threads)


def _checked(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    return runtime


def selected_runtime() -> str:
    """The runtime a backbone loaded now gets: "tflite" or "tf".

    Raises:
        ValueError: ``$RETRIEVAL_RUNTIME`` names an unknown runtime.
    """
    name = _settings["runtime"] or os.environ.get(ENV_VAR) or "auto"
    if name not in RUNTIMES:
        raise ValueError(f"{ENV_VAR}={name!r} is not a runtime; choose one of {', '.join(RUNTIMES)}")
    if name != "auto":
        return name
    import tensorflow as tf

    return "tf" if tf.config.list_physical_devices("GPU") else "tflite"


def _threads() -> int:
    if _settings["threads"]:
        return _settings["threads"]
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def compile_model(model, cache_dir: Path, runtime: str | None = None):
    """A callable running `model` on one batch: float32 [B, H, W, 3] -> {endpoint: float32 array}.

    Args:
        model: a Keras functional model with one image input of any height and width and
            a dict of outputs (`efficientnet_lite.build_lite0`).
        cache_dir: cache folder; the converted TFLite file goes to ``<cache_dir>/weights/``.
        runtime: "tflite", "tf" or "auto"; None: `selected_runtime()`.

    Raises:
        ValueError: unknown runtime.
    """
    runtime = selected_runtime() if runtime in (None, "auto") else _checked(runtime)
    if runtime == "tflite":
        try:
            return TFLiteRunner(model, Path(cache_dir))
        except (ImportError, AttributeError) as e:  # a TensorFlow without tf.lite
            logger.warning("TensorFlow Lite is not available (%s); running %s in TensorFlow", e, model.name)
    return TFRunner(model)


class TFRunner:
    """The Keras model as one traced ``tf.function`` (retraced per input shape as needed)."""

    runtime = "tf"

    def __init__(self, model):
        import tensorflow as tf

        self.model = model
        self._run = tf.function(lambda x: model(x, training=False), reduce_retracing=True)

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v.numpy() for k, v in self._run(x).items()}


def tflite_path(model, cache_dir: Path) -> Path:
    """Where the TFLite conversion of `model` is cached: named by its architecture (layer
    configs), endpoints, weights and the TensorFlow version."""
    import tensorflow as tf

    h = hashlib.sha1()
    h.update(repr([(layer.name, type(layer).__name__) for layer in model.layers]).encode())
    h.update(repr(sorted(model.output)).encode() if isinstance(model.output, dict) else b"")
    h.update(tf.__version__.encode())
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w, np.float32).tobytes())
    return Path(cache_dir) / "weights" / f"{model.name}-{h.hexdigest()[:12]}.tflite"


def convert_to_tflite(model, path: Path) -> bytes:
    """Converts `model` (any input height and width, batch 1) to a TFLite flatbuffer and
    writes it to `path` atomically.

    Returns:
        The flatbuffer bytes.
    """
    import keras
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        saved = Path(tmp) / "saved_model"
        model.export(str(saved), format="tf_saved_model", verbose=False,
                     input_signature=[keras.InputSpec(shape=(1, None, None, 3), dtype="float32")])
        blob = tf.lite.TFLiteConverter.from_saved_model(str(saved)).convert()
    atomic_write_bytes(path, blob)
    return blob


class TFLiteRunner:
    """The model in the TFLite interpreter with the XNNPACK delegate, one interpreter per
    recent input shape. Calls are serialised (an interpreter is not thread-safe)."""

    runtime = "tflite"

    def __init__(self, model, cache_dir: Path):
        import tensorflow as tf

        self._interpreter_class = tf.lite.Interpreter
        self.path = tflite_path(model, cache_dir)
        self.threads = _threads()
        self._interpreters: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.blob = self.path.read_bytes() if self.path.exists() else None
        if self.blob is not None:
            try:
                self._interpreter((1, 32, 32, 3))  # a damaged file fails here, at load time
                return
            except (ValueError, RuntimeError) as e:
                logger.warning("%s cannot be loaded (%s); converting again", self.path, e)
                self._interpreters.clear()
        logger.info("converting %s to TensorFlow Lite (once) -> %s", model.name, self.path)
        self.blob = convert_to_tflite(model, self.path)
        self._interpreter((1, 32, 32, 3))

    def _interpreter(self, shape: tuple):
        if shape in self._interpreters:
            self._interpreters.move_to_end(shape)
            return self._interpreters[shape]
        if len(self._interpreters) >= MAX_SHAPES:  # its runner re-allocates for the new shape
            _, entry = self._interpreters.popitem(last=False)
        else:
            with warnings.catch_warnings():  # tf.lite.Interpreter's deprecation notice
                warnings.simplefilter("ignore")
                it = self._interpreter_class(model_content=self.blob, num_threads=self.threads)
            runner = it.get_signature_runner()  # resizes its input and allocates when the shape changes
            (input_name,) = runner.get_input_details()
            entry = (it, runner, input_name)
        self._interpreters[shape] = entry
        return entry

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        x = np.ascontiguousarray(x, np.float32)
        with self._lock:
            out = {}
            for b in range(len(x)):  # the conversion is for batch 1
                _, runner, input_name = self._interpreter((1, *x.shape[1:]))
                for k, v in runner(**{input_name: x[b : b + 1]}).items():
                    out.setdefault(k, []).append(np.array(v))
        return {k: np.concatenate(v) for k, v in out.items()}
