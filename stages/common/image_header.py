"""What an image file's header says, read without decoding the pixels (by Pillow): the
format, the size in pixels (so a huge or malicious file is refused before it is decoded)
and the EXIF orientation (which OpenCV ignores when it keeps alpha or 16 bits).
"""

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

_ORIENTATION_TAG = 0x0112
_FORMATS = {"JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "DIB": "bmp"}


@dataclass
class Header:
    """Header fields of an image file.

    Attributes:
        format: "jpeg", "png", "webp", "bmp" or "unknown".
        width, height: size in pixels as stored (before any EXIF rotation); None when
            the header does not say (unknown format, header cut short).
        orientation: EXIF orientation 1-8 (1: as stored, also when absent).
    """

    format: str
    width: int | None = None
    height: int | None = None
    orientation: int = 1
    bomb_pixels: int | None = None  # set when Pillow refused the size outright

    @property
    def size_text(self) -> str:
        """"WxH pixels" (or "N pixels" when only the count is known)."""
        if self.width and self.height:
            return f"{self.width}x{self.height} pixels"
        return f"{self.bomb_pixels} pixels"

    @property
    def pixels(self) -> int | None:
        return self.width * self.height if self.width and self.height else self.bomb_pixels


def read_header(data: bytes) -> Header:
    """Parses the header of an encoded image (the whole file or at least its start).

    Pillow's `Image.open` reads the header only; no pixel is decoded here.

    Args:
        data: the file's bytes.

    Returns:
        The header; format "unknown" (and no size) when Pillow does not recognise it.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                header = Header(_FORMATS.get(image.format or "", "unknown"), *image.size)
                try:
                    orientation = int(image.getexif().get(_ORIENTATION_TAG, 1))
                except (OSError, ValueError, SyntaxError, TypeError):  # malformed EXIF
                    orientation = 1
    except Image.DecompressionBombError as e:
        # Pillow refuses images past twice its own limit before their size can be asked;
        # its message holds the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(e))
        return Header("unknown", bomb_pixels=int(found.group(1)) if found else 2 * Image.MAX_IMAGE_PIXELS + 1)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError):
        return Header("unknown")
    header.orientation = orientation if 1 <= orientation <= 8 else 1
    return header


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turns an image as stored into the orientation a viewer shows (EXIF 1-8).

    Args:
        image: [H, W] or [H, W, C] array as decoded.
        orientation: EXIF orientation; 1 (or anything outside 2-8) leaves it as it is.

    Returns:
        C-contiguous array, [W, H, ...] for orientations 5-8.
    """
    ops = {
        2: lambda x: x[:, ::-1],
        3: lambda x: x[::-1, ::-1],
        4: lambda x: x[::-1],
        5: lambda x: np.swapaxes(x, 0, 1),
        6: lambda x: np.rot90(x, -1),
        7: lambda x: np.swapaxes(x[::-1, ::-1], 0, 1),
        8: lambda x: np.rot90(x, 1),
    }
    return np.ascontiguousarray(ops[orientation](image)) if orientation in ops else image
