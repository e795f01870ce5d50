"""Image reading that survives real folders: EXIF rotation, alpha, 16-bit, CMYK, bad files."""

import os
from pathlib import Path

import cv2
import numpy as np

from .image_header import apply_orientation, read_header

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# Decoded images above this many pixels are refused before they exhaust memory.
MAX_PIXELS = 178_956_970  # Pillow's decompression-bomb limit (2 x Image.MAX_IMAGE_PIXELS)
_BLEND_ROWS = 512


class ImageReadError(ValueError):
    """An image file that cannot be used; the message names the file and the reason.

    Attributes:
        path: the file.
        reason: why it cannot be used, without the path.
        transient: the file could not be read at all (missing, permission denied, I/O
            error), as opposed to read but not decoded; a later run should try again.
    """

    def __init__(self, path, reason: str, transient: bool = False):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason
        self.transient = transient


def is_image_file(path: Path) -> bool:
    """True for a visible file with an image extension in any letter case.

    Symbolic links count by their own name: one to a file is read wherever the file is,
    a broken one is kept so that the run reports it as unreadable instead of losing it.
    """
    if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
        return False
    return path.is_file() or (path.is_symlink() and not path.exists())


def _to_uint8_rgb(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        # Transparent product shots are composited onto white, as a catalogue shows them;
        # in blocks of rows, so the float temporaries stay small for huge images.
        out = np.empty(image.shape[:2] + (3,), np.uint8)
        for y in range(0, image.shape[0], _BLEND_ROWS):
            block = image[y:y + _BLEND_ROWS]
            alpha = block[..., 3:].astype(np.float32) / 255.0
            bgr = block[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
            out[y:y + _BLEND_ROWS] = np.round(bgr).astype(np.uint8)[..., ::-1]
        return out
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)  # in place: no second copy of a huge image


def read_image(path) -> np.ndarray:
    """Reads an image file as RGB.

    EXIF orientation is applied (JPEG, PNG, WebP); grayscale, 16-bit, CMYK and alpha
    (composited onto white) are converted. Paths with any characters are read (bytes go
    through NumPy). The size in the header is checked before decoding, so a huge file
    is refused without allocating its pixels.

    Args:
        path: image file path.

    Returns:
        uint8 array [H, W, 3], RGB, in the orientation a viewer shows.

    Raises:
        ImageReadError: missing, unreadable, empty, truncated, not decodable, or larger
            than MAX_PIXELS; the message names the file and the reason.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ImageReadError(path, f"broken symbolic link (target {os.readlink(path)} does not exist)",
                             transient=True)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(path, f"cannot read file ({e.strerror or e})", transient=True) from e
    if data.size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    header = read_header(data.tobytes())
    if header.pixels and header.pixels > MAX_PIXELS:
        raise ImageReadError(path, f"too large ({header.size_text}, limit {MAX_PIXELS})")
    if header.format == "jpeg" and b"\xff\xd9" not in data[-4096:].tobytes():
        raise ImageReadError(path, "truncated JPEG (no end-of-image marker)")
    keep_alpha = header.format in ("png", "webp")
    # IMREAD_COLOR applies EXIF orientation; UNCHANGED keeps alpha and 16 bits (PNG/WebP)
    # but ignores the orientation, which is then applied from the header.
    flags = cv2.IMREAD_UNCHANGED if keep_alpha else cv2.IMREAD_COLOR
    try:
        image = cv2.imdecode(data, flags)
    except cv2.error as e:
        raise ImageReadError(path, f"cannot decode image ({str(e).strip().splitlines()[-1]})") from e
    if image is None or image.size == 0:
        raise ImageReadError(path, "not a decodable image (unknown format or corrupt data)")
    if image.shape[0] * image.shape[1] > MAX_PIXELS:
        raise ImageReadError(path, f"too large ({image.shape[1]}x{image.shape[0]} pixels, limit {MAX_PIXELS})")
    if keep_alpha:
        image = apply_orientation(image, header.orientation)
    return _to_uint8_rgb(image)


def resize_max_side(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float]:
    """Downscales so that the longer side is at most `max_side` pixels (never upscales).

    Args:
        image: [H, W, C] array.
        max_side: longest side in pixels; None keeps the image as it is.

    Returns:
        (resized image, scale) with scale = new size / old size (<= 1).
    """
    h, w = image.shape[:2]
    if max_side is None or max(h, w) <= max_side:
        return image, 1.0
    scale = max_side / max(h, w)
    return resize_by(image, scale), scale


def long_side_scale(shape, side) -> float:
    """The scale that brings an image's longer side into `side`.

    Args:
        shape: the image's (height, width, ...).
        side: a length in pixels (the longer side becomes exactly this), or (smallest,
            largest): a shorter longer side is enlarged to `smallest`, a longer one shrunk
            to `largest`, one in between kept.

    Returns:
        new size / old size (> 0).
    """
    smallest, largest = (side, side) if np.isscalar(side) else side
    long = max(shape[:2])
    return smallest / long if long < smallest else largest / long if long > largest else 1.0


def resize_long_side(image: np.ndarray, side) -> tuple[np.ndarray, float]:
    """Scales, up or down, so that the longer side is `side` pixels, or within `side` =
    (smallest, largest) (`long_side_scale`): what is computed on the result then depends
    little on the resolution the file was stored at.

    Args:
        image: [H, W, C] array.
        side: the longer side in pixels, or (smallest, largest).

    Returns:
        (resized image, scale) with scale = new size / old size.
    """
    scale = long_side_scale(image.shape, side)
    return resize_by(image, scale), scale


def resize_by(image: np.ndarray, scale: float) -> np.ndarray:
    """Resizes by `scale` (area interpolation when shrinking, bilinear when enlarging);
    each side is rounded and kept at least 1 pixel."""
    h, w = image.shape[:2]
    size = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    if size == (w, h):
        return image
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, size, interpolation=interp)
