"""A small demo dataset in the hackathon layout, built from photos bundled with scikit-image.

References: the bundled colour photos, plus grayscale ones as distractors. Queries: two
synthetic views of each colour photo (perspective warp, crop, rotation, brightness and
contrast change, JPEG re-encoding) and ``motorcycle_right``, a real second view of
``motorcycle_left``. Built deterministically (seeded) and written once.
"""

import csv
from pathlib import Path

import cv2
import numpy as np

from stages.common import logger
from stages.common.cache import atomic_write_bytes

DEMO_VERSION = "1"
COLOUR_PHOTOS = ["astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
                 "motorcycle_left", "retina", "rocket"]
GRAY_DISTRACTORS = ["camera", "moon", "coins", "brick", "gravel", "page"]


def _photo(name: str) -> np.ndarray:
    from skimage import data

    if name.startswith("motorcycle_"):
        left, right, _ = data.stereo_motorcycle()
        image = left if name == "motorcycle_left" else right
    else:
        image = getattr(data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


def _perspective_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A camera-like view: corners moved by up to 12% of the size, brightness changed."""
    h, w = image.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    jitter = rng.uniform(-0.12, 0.12, size=(4, 2)) * [w, h]
    dst = (src + jitter).astype(np.float32)
    dst -= dst.min(axis=0)
    size = tuple(int(v) for v in np.ceil(dst.max(axis=0)))
    warped = cv2.warpPerspective(image, cv2.getPerspectiveTransform(src, dst), size,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=(200, 200, 200))
    return cv2.convertScaleAbs(warped, alpha=rng.uniform(0.75, 1.25), beta=rng.uniform(-30, 30))


def _cropped_rotated_view(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A crop of 60-85% of each side, rotated by 90 degrees or a small angle, rescaled."""
    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 0.85)), int(w * rng.uniform(0.6, 0.85))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    crop = image[y:y + ch, x:x + cw]
    if rng.random() < 0.5:
        crop = np.ascontiguousarray(np.rot90(crop, k=1 if rng.random() < 0.5 else 3))
    else:
        angle = rng.uniform(-20, 20)
        m = cv2.getRotationMatrix2D((crop.shape[1] / 2, crop.shape[0] / 2), angle, 1.0)
        crop = cv2.warpAffine(crop, m, (crop.shape[1], crop.shape[0]), borderMode=cv2.BORDER_REFLECT)
    scale = rng.uniform(0.7, 1.3)
    crop = cv2.resize(crop, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return cv2.convertScaleAbs(crop, alpha=rng.uniform(0.8, 1.2), beta=rng.uniform(-20, 20))


def _write_jpeg(path: Path, rgb: np.ndarray, quality: int = 90) -> None:
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"cannot encode {path}")
    atomic_write_bytes(path, buf.tobytes())


def build_demo(root: Path) -> Path:
    """Writes the demo dataset under `root` (once; kept while DEMO_VERSION is unchanged).

    Returns:
        `root`, a data folder with test/test_data/{query,reference} and test/ground_truth.csv.
    """
    root = Path(root)
    marker = root / "DEMO_VERSION"
    if marker.exists() and marker.read_text().strip() == DEMO_VERSION:
        return root
    logger.info("building the demo dataset from scikit-image photos in %s", root)
    query_dir = root / "test" / "test_data" / "query"
    ref_dir = root / "test" / "test_data" / "reference"
    rows = []
    rng = np.random.default_rng(2018)
    for name in COLOUR_PHOTOS + GRAY_DISTRACTORS:
        _write_jpeg(ref_dir / f"{name}.jpg", _photo(name), quality=95)
    for name in COLOUR_PHOTOS:
        image = _photo(name)
        for i, view in enumerate((_perspective_view, _cropped_rotated_view)):
            query = f"{name}_view{i + 1}"
            _write_jpeg(query_dir / f"{query}.jpg", view(image, rng), quality=85)
            rows.append((query, name))
    _write_jpeg(query_dir / "motorcycle_right.jpg", _photo("motorcycle_right"), quality=85)
    rows.append(("motorcycle_right", "motorcycle_left"))
    lines = ["query,reference"] + [f"{q},{r}" for q, r in rows]
    atomic_write_bytes(root / "test" / "ground_truth.csv", ("\n".join(lines) + "\n").encode())
    atomic_write_bytes(marker, DEMO_VERSION.encode())
    return root


def read_rows(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        return [(r["query"], r["reference"]) for r in csv.DictReader(f)]
