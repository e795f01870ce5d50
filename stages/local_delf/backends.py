"""Local feature backends. Each maps an RGB image to keypoints in its own pixels.

Every backend first brings the image's longer side into `resize_to` = (smallest, largest)
pixels, enlarging small files and shrinking large ones, so the features of a photo depend
little on the resolution its file was stored at (a 348 px shelf photo is described at 512 px,
a 4000 px one at 1024 px).

- "delf-lite0" (default, offline): the DELF recipe on the shipped ImageNet
  EfficientNet-Lite0: dense stride-16 features (block 10, 112-d) over an image pyramid,
  scored by a trained attention head when a model directory provides one, else by the
  feature L2 norm; cells whose neighbourhood is mostly textureless (`min_textured`) or
  partly blank background (`max_blank`) are no keypoints.
- "delf-hub" (needs internet unless given a local directory): the official DELF TF-Hub
  module (``https://tfhub.dev/google/delf/1``), signature "default".
- "sift": OpenCV SIFT with RootSIFT normalisation (Arandjelović & Zisserman, CVPR 2012).
"""

import os
import threading
from pathlib import Path

import cv2
import numpy as np

from stages.common.backbone import efficientnet_lite as lite
from stages.common.backbone.model_dir import backbone_identity
from stages.common.backbone.runtime import compile_model
from stages.common.images import long_side_scale, resize_by, resize_long_side

from .keypoints import cell_centers, dense_candidates, select_top, texture_fractions

DELF_HUB_URL = "https://tfhub.dev/google/delf/1"
# Side in pixels of the square whose texture decides whether a stride-16 cell is a
# keypoint: two cells, about the part of the image a cell's descriptor mostly sees.
CONTRAST_WINDOW = 33
# Blank background is looked for over the same square: a wider one (65 px) also removed
# the keypoints around the white frames of smvs_dvd cover scans, which its hardest queries
# match (14-15 true inliers instead of 29).
BLANK_WINDOW = CONTRAST_WINDOW


def _empty(dim: int) -> dict:
    return {"keypoints_xy": np.zeros((0, 2), np.float32), "descriptors": np.zeros((0, dim), np.float32),
            "scores": np.zeros(0, np.float32), "scales": np.zeros(0, np.float32)}


class DenseLite0:
    """DELF-style dense features from EfficientNet-Lite0's stride-16 map.

    Output of `__call__`: raw (not yet PCA-reduced) L2-normalised 112-d descriptors.
    """

    dim = lite.STRIDE16_CHANNELS
    needs_pca = True
    image_workers = 1  # TensorFlow already spreads one image over every core

    def __init__(self, conf: dict, cache_dir: Path):
        self.conf = conf
        self.model = lite.build_lite0(outputs=("stride16",))
        self.attention = None
        self.identity = backend_identity(conf)
        if conf.get("weights_dir"):
            from stages.common.backbone.model_dir import load_attention, load_backbone_weights

            load_backbone_weights(self.model, conf["weights_dir"])
            self.attention = load_attention(conf["weights_dir"])
        else:
            lite.set_weights(self.model, lite.imagenet_weights(cache_dir))
        self.layers = lite.strided_layers(lite.STRIDE16_BLOCK)
        self._run = compile_model(self.model, cache_dir)  # TFLite on CPU, TensorFlow on a GPU

    def score(self, feature_map: np.ndarray) -> np.ndarray:
        """[h, w, C] -> [h, w] keypoint scores: attention if trained, else feature L2 norm."""
        if self.attention is not None:
            return self.attention(feature_map)
        return np.linalg.norm(feature_map, axis=-1)

    def __call__(self, rgb: np.ndarray, scales=None) -> dict:
        """Keypoints of one image.

        Args:
            rgb: uint8 [H, W, 3].
            scales: pyramid levels, as fractions of the image scaled into `resize_to`
                (default: the conf's `image_scales`).

        Returns:
            {"keypoints_xy": float32 [N, 2] (x, y) in `rgb` pixels, "descriptors": float32
            [N, 112] unit rows, "scores", "scales": float32 [N]}, N <= max_feature_num.
        """
        h0, w0 = rgb.shape[:2]
        base_scale = long_side_scale(rgb.shape, self.conf["resize_to"])
        # Shrinking: once to the base size, then each level from it; enlarging: each level
        # straight from the file's pixels, not from an enlarged copy.
        base = resize_by(rgb, base_scale) if base_scale < 1 else rgb
        levels = []
        for s in self.conf["image_scales"] if scales is None else scales:
            image = resize_by(base, s if base_scale < 1 else base_scale * s)
            ih, iw = image.shape[:2]
            if min(ih, iw) < self.conf["min_side"]:
                continue
            fmap = self._run(lite.preprocess(image)[None])["stride16"][0]
            xy, desc, scores = dense_candidates(fmap, self.score(fmap), self.layers, (ih, iw), (iw / w0, ih / h0))
            textured, blank = texture_fractions(image, cell_centers(fmap.shape[:2], self.layers, (ih, iw)),
                                                CONTRAST_WINDOW, self.conf["min_contrast"], enlarged=base_scale * s,
                                                blank_window=BLANK_WINDOW)
            textured = (textured >= self.conf["min_textured"]) & (blank <= self.conf["max_blank"])
            levels.append({"keypoints_xy": xy[textured], "descriptors": desc[textured], "scores": scores[textured],
                           "scales": np.full(int(textured.sum()), base_scale * s, np.float32)})
        out = select_top(levels, self.conf["max_feature_num"]) if levels else _empty(self.dim)
        out["descriptors"] = _l2n(out["descriptors"]).reshape(-1, self.dim)
        return out


class DelfHub:
    """The DELF TF-Hub module; its 40-d descriptors are already PCA-reduced.

    `handle` is a URL (downloaded into ``TFHUB_CACHE_DIR`` on first use) or a local
    directory holding the module.
    """

    dim = 40
    needs_pca = False
    image_workers = 1

    def __init__(self, conf: dict, cache_dir: Path):
        import tensorflow_hub as hub

        self.conf = conf
        handle = conf.get("hub_handle") or DELF_HUB_URL
        self.module = hub.load(handle).signatures["default"]
        self.identity = backend_identity(conf)

    def __call__(self, rgb: np.ndarray, scales=None) -> dict:
        """Keypoints of one image (see `DenseLite0.__call__`; `scales` replaces DELF's pyramid)."""
        import tensorflow as tf

        base, _ = resize_long_side(rgb, self.conf["resize_to"])
        h0, w0 = rgb.shape[:2]
        bh, bw = base.shape[:2]
        out = self.module(
            image=tf.constant(base.astype(np.float32) / 255.0),
            score_threshold=tf.constant(float(self.conf["score_threshold"])),
            image_scales=tf.constant(self.conf["image_scales"] if scales is None else scales, tf.float32),
            max_feature_num=tf.constant(int(self.conf["max_feature_num"])))
        yx = np.asarray(out["locations"], np.float32).reshape(-1, 2)
        desc = np.asarray(out["descriptors"], np.float32).reshape(len(yx), -1)
        n = len(yx)
        scores = np.asarray(out["attention"], np.float32).reshape(-1) if "attention" in out else np.ones(n, np.float32)
        scales = np.asarray(out["scales"], np.float32).reshape(-1) if "scales" in out else np.ones(n, np.float32)
        # DELF returns (y, x) in the pixels of the image it was given; convert once, here.
        xy = (yx[:, ::-1] + 0.5) * np.array([w0 / bw, h0 / bh], np.float32) - 0.5
        return {"keypoints_xy": xy.astype(np.float32), "descriptors": _l2n(desc).reshape(n, -1),
                "scores": scores, "scales": scales}


class Sift:
    """OpenCV SIFT on the grayscale image, descriptors as RootSIFT (L1, square root)."""

    dim = 128
    needs_pca = False
    image_workers = os.cpu_count() or 1  # OpenCV releases the GIL; one detector per thread

    def __init__(self, conf: dict, cache_dir: Path):
        self.conf = conf
        self._local = threading.local()
        self.identity = backend_identity(conf)

    @property
    def sift(self):
        if not hasattr(self._local, "sift"):
            self._local.sift = cv2.SIFT_create(nfeatures=int(self.conf["max_feature_num"]))
        return self._local.sift

    def __call__(self, rgb: np.ndarray, scales=None) -> dict:
        """Keypoints of one image (see `DenseLite0.__call__`); SIFT's own scale space
        replaces `scales`."""
        base, _ = resize_long_side(rgb, self.conf["resize_to"])
        h0, w0 = rgb.shape[:2]
        bh, bw = base.shape[:2]
        if min(bh, bw) < self.conf["min_side"]:
            return _empty(self.dim)
        kps, desc = self.sift.detectAndCompute(cv2.cvtColor(base, cv2.COLOR_RGB2GRAY), None)
        if not kps:
            return _empty(self.dim)
        kps, desc = kps[: self.conf["max_feature_num"]], desc[: self.conf["max_feature_num"]]
        xy = np.array([k.pt for k in kps], np.float32)
        root = np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-12))
        return {"keypoints_xy": ((xy + 0.5) * np.array([w0 / bw, h0 / bh], np.float32) - 0.5).astype(np.float32),
                "descriptors": _l2n(root),
                "scores": np.array([k.response for k in kps], np.float32),
                "scales": np.array([k.size for k in kps], np.float32)}


def _l2n(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12) if x.size else x


BACKENDS = {"delf-lite0": DenseLite0, "delf-hub": DelfHub, "sift": Sift}


def backend_identity(conf: dict) -> str:
    """What the backend's weights are, without loading them (part of the cache key).

    Raises:
        ValueError: unknown backend name.
    """
    name = conf["backend"]
    if name == "delf-lite0":
        return backbone_identity(conf.get("weights_dir"))
    if name == "delf-hub":
        return f"delf-hub-{conf.get('hub_handle') or DELF_HUB_URL}"
    if name == "sift":
        return f"opencv-sift-{cv2.__version__}"
    raise ValueError(f"unknown local backend {name!r}; choose one of {sorted(BACKENDS)}")


def load_backend(conf: dict, cache_dir: Path):
    """Instantiates the backend named by ``conf["backend"]``.

    Raises:
        ValueError: unknown backend name.
    """
    if conf["backend"] not in BACKENDS:
        raise ValueError(f"unknown local backend {conf['backend']!r}; choose one of {sorted(BACKENDS)}")
    return BACKENDS[conf["backend"]](conf, cache_dir)
