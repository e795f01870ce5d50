"""What an image file's header says, read without decoding the pixels: the format, the
size in pixels (so a huge or malicious file is refused before it is decoded) and the EXIF
orientation (which OpenCV ignores when it keeps alpha or 16 bits).

Supports JPEG, PNG, WebP and BMP, the formats `pipeline.images` lists.
"""

import struct
from dataclasses import dataclass

import numpy as np

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_ORIENTATION_TAG = 0x0112


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


def read_header(data: bytes) -> Header:
    """Parses the header of an encoded image (the whole file or at least its start).

    Args:
        data: the file's bytes.

    Returns:
        The header; fields the bytes do not give (malformed or cut short) keep their
        defaults. Never raises on malformed input.
    """
    if data[:2] == b"\xff\xd8":
        header, parse = Header("jpeg"), _jpeg
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        header, parse = Header("png"), _png
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        header, parse = Header("webp"), _webp
    elif data[:2] == b"BM":
        header, parse = Header("bmp"), _bmp
    else:
        return Header("unknown")
    try:
        parse(data, header)
    except (struct.error, IndexError, ValueError):
        pass
    return header


def _bmp(data: bytes, header: Header) -> None:
    width, height = struct.unpack("<ii", data[18:26])
    header.width, header.height = abs(width), abs(height)  # negative height: rows top-down


def _jpeg(data: bytes, header: Header) -> None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no header beyond
            break
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        segment = data[pos + 4:pos + 2 + length]
        if marker in _JPEG_SOF and len(segment) >= 5:
            header.height, header.width = struct.unpack(">HH", segment[1:5])
        elif marker == 0xE1 and segment[:6] == b"Exif\x00\x00":
            header.orientation = tiff_orientation(segment[6:])
        pos += 2 + length


def _png(data: bytes, header: Header) -> None:
    header.width, header.height = struct.unpack(">II", data[16:24])
    pos = 8
    while pos + 8 <= len(data):  # chunk headers only: the jumps skip the pixel data
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"eXIf":
            header.orientation = tiff_orientation(data[pos + 8:pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length


def _webp(data: bytes, header: Header) -> None:
    pos = 12
    while pos + 8 <= len(data):
        kind, length = struct.unpack("<4sI", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"VP8X" and len(body) >= 10:
            header.width = 1 + int.from_bytes(body[4:7], "little")
            header.height = 1 + int.from_bytes(body[7:10], "little")
        elif kind == b"VP8 " and len(body) >= 10 and header.width is None:
            w, h = struct.unpack("<HH", body[6:10])
            header.width, header.height = w & 0x3FFF, h & 0x3FFF
        elif kind == b"VP8L" and len(body) >= 5 and header.width is None:
            bits = int.from_bytes(body[1:5], "little")
            header.width, header.height = 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
        elif kind == b"EXIF":
            header.orientation = tiff_orientation(body[6:] if body[:6] == b"Exif\x00\x00" else body)
        pos += 8 + length + (length & 1)


def tiff_orientation(tiff: bytes) -> int:
    """The Orientation tag (0x0112) of IFD0 of an EXIF block in TIFF layout; 1 when absent
    or malformed."""
    try:
        order = {b"II": "<", b"MM": ">"}[bytes(tiff[:2])]
        (offset,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[offset:offset + 2])
        for i in range(count):
            entry = tiff[offset + 2 + 12 * i:offset + 14 + 12 * i]
            tag, kind = struct.unpack(order + "HH", entry[:4])
            if tag == _ORIENTATION_TAG and kind == 3:  # SHORT
                (value,) = struct.unpack(order + "H", entry[8:10])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error):
        pass
    return 1


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
