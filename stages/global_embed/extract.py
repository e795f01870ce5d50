"""Stage 1a: one global descriptor per image (multi-scale GeM of a CNN map, L2-normalised).

Output: a feature store (see `stages.common.cache`) whose entry per image name holds
``descriptor`` float32 [D] (unit L2 norm, whole image), ``region_descriptors`` float32
[G, D] (one per conf region, row 0 the whole image) and ``image_size`` int32 [2] =
(width, height) in pixels.
"""

from pathlib import Path

import numpy as np

from stages.common import logger, setup_logging
from stages.common.cache import FeatureStore
from stages.common.conf import conf_hash, resolve, stage_parser
from stages.common.extraction import extract_to_store
from stages.common.images import resize_by, resize_max_side

from .models import FeatureModel, load_model, model_identity
from .pooling import combine_scales, gem, l2_normalize

default_conf = {
    "model": "lite0",  # lite0 | lite2 | resnet50 | tfhub
    "weights_dir": None,  # a trained model directory (lite0 only)
    "keras_weights": "imagenet",  # resnet50: "imagenet" downloads, None is untrained
    "hub_handle": None,  # tfhub: module URL or local directory
    "hub_input_size": 224,
    "resize_max": 512,  # longest image side in pixels before scaling
    "scales": [1.0, 0.7071, 0.5],
    "gem_p": 3.0,
    # Sub-windows (y0, x0, y1, x1 as fractions of the map) pooled from the same feature
    # maps, at no extra CNN cost; a query scores max over them, which helps when the
    # product fills only part of the photo. The first is the whole image.
    "regions": [[0, 0, 1, 1], [0.1, 0.1, 0.9, 0.9], [0.2, 0.2, 0.8, 0.8], [0, 0, 0.75, 0.75],
                [0.25, 0.25, 1, 1], [0, 0.25, 0.75, 1], [0.25, 0, 1, 0.75]],
    # Flip test-time augmentation: the mirror image pooled as one more view of each scale.
    "flip": False,
}
# The pipeline's default: flip test-time augmentation measured -0.003 global mAP on
# smvs_dvd (2026-12-03) and +0.010 on grocery_store for twice the network time, kept for
# grocery_store; EfficientNet-Lite2 (lite2-gem) lowered smvs_dvd to 0.418 (README,
# "Global backbone").
DEFAULT_CONF = "lite0-gem-flip"

confs = {
    "lite0-gem": {},
    "lite0-gem-flip": {"flip": True},
    "lite2-gem": {"model": "lite2"},
    "lite2-gem-flip": {"model": "lite2", "flip": True},
    "resnet50-gem": {"model": "resnet50"},
    "tfhub": {"model": "tfhub", "scales": [1.0], "regions": [[0, 0, 1, 1]]},
}


def region_slices(shape: tuple[int, int], regions) -> list[tuple[slice, slice]]:
    """Map windows for fractional regions (y0, x0, y1, x1); each keeps at least one cell."""
    h, w = shape
    out = []
    for y0, x0, y1, x1 in regions:
        ya, xa = min(int(round(y0 * h)), h - 1), min(int(round(x0 * w)), w - 1)
        out.append((slice(ya, max(int(round(y1 * h)), ya + 1)), slice(xa, max(int(round(x1 * w)), xa + 1))))
    return out


def describe(model: FeatureModel, rgb: np.ndarray, conf: dict) -> np.ndarray:
    """Global descriptors of one image: the whole image and each conf region.

    The image is resized so its longer side is `resize_max`, then at each of `scales` the
    backbone map is GeM-pooled (over the whole map and over each region's window) and
    L2-normalised; the scales are merged by a generalized mean with the same p (cirtorch
    ``extract_ms``) and L2-normalised. With conf "flip" the mirror image is described too
    (regions mirrored) and merged with the scales as more views (flip test-time
    augmentation, which hackathon teams used). A model that returns vectors (TF-Hub) gives one
    descriptor per scale, averaged. A trained model's projection head (``model.head``)
    maps each pooled vector before normalisation.

    Args:
        model: the backbone.
        rgb: uint8 [H, W, 3].
        conf: the stage conf.

    Returns:
        float32 [G, D], unit L2 norm rows, G = len(regions) (1 for vector models).
    """
    base, _ = resize_max_side(rgb, conf["resize_max"])
    regions = conf["regions"] if model.returns_map else [[0, 0, 1, 1]]
    views = [(base, regions)]
    if conf["flip"]:  # the mirror image, its regions mirrored so that row g is the same window
        views.append((np.ascontiguousarray(base[:, ::-1]), [[y0, 1 - x1, y1, 1 - x0] for y0, x0, y1, x1 in regions]))
    per_scale = []
    for s in conf["scales"]:
        for image, windows in views:
            out = model(resize_by(image, s))
            if model.returns_map:
                pooled = [gem(out[ys, xs], conf["gem_p"]) for ys, xs in region_slices(out.shape[:2], windows)]
            else:
                pooled = [out]
            per_scale.append([model.head(v) for v in pooled] if model.head is not None else pooled)
    per_scale = l2_normalize(np.asarray(per_scale, np.float32))  # [S x views, G, D]
    p = conf["gem_p"] if model.returns_map else 1.0
    return np.stack([combine_scales(per_scale[:, g], p) for g in range(len(regions))])


def store_for(conf: dict, cache_root: Path, identity: str) -> FeatureStore:
    return FeatureStore(cache_root, "global", conf, conf_hash(conf, identity))


def main(conf: dict, images: dict[str, Path], cache_root: Path, overwrite: bool = False,
         shard: tuple[int, int] = (0, 1), model: FeatureModel | None = None) -> Path:
    """Computes the global descriptor of every image not yet cached.

    Args:
        conf: the stage conf (see `default_conf`).
        images: {image name: path}.
        cache_root: cache folder; features go to ``<cache_root>/global/<name>-<hash>/``.
        overwrite: recompute images that are already cached.
        shard: (i, n) computes only every n-th image starting at i, so n processes can
            share the work; all write into the same store.
        model: a loaded backbone to reuse (loaded from `conf` otherwise).

    Returns:
        The feature store folder.
    """
    logger.info("global descriptors, conf: %s", conf)
    store = store_for(conf, cache_root, model.identity if model else model_identity(conf))
    names = sorted(images)[shard[0]::shard[1]]
    todo = store.missing({n: images[n] for n in names}, overwrite)
    logger.info("global descriptors: %d of %d images to compute (%s)", len(todo), len(names), store.dir)
    if not todo:
        return store.dir
    loaded = [model]

    def compute(rgb):  # the model is built on the first readable image, not for unreadable ones
        if loaded[0] is None:
            loaded[0] = load_model(conf, cache_root)
        regions = describe(loaded[0], rgb, conf)
        return {"descriptor": regions[0], "region_descriptors": regions,
                "image_size": np.array([rgb.shape[1], rgb.shape[0]], np.int32)}

    extract_to_store(store, {n: images[n] for n in todo}, compute, desc="global descriptors")
    return store.dir


def cli(argv=None):
    parser = stage_parser(__doc__, confs, DEFAULT_CONF)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path,
                        help="data folder (hackathon layout): its queries, references and training images "
                             "(the training images are what the learned whitening of the ranking step needs)")
    source.add_argument("--images", type=Path, help="a folder of images to describe")
    parser.add_argument("--no-train", action="store_true", help="with --data: leave the training images out")
    args = parser.parse_args(argv)
    setup_logging()
    from stages.common.dataset import list_images, load_dataset

    if args.data:
        dataset = load_dataset(args.data)
        images = {**dataset.images, **({} if args.no_train else dataset.training_images()[0])}
    else:
        images = list_images(args.images)
    print(main(resolve(default_conf, confs, args.conf), images, args.cache, args.overwrite, args.shard))


if __name__ == "__main__":
    cli()
