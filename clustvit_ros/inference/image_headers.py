"""The size a PNG or JPEG claims, read from its header without decoding it.

What a malicious or broken file cannot hide is the size a decoder would
allocate for it: 100 bytes can claim 40000x40000 pixels. The node and the
data tools check this before any decoder runs.
"""
from __future__ import annotations

import struct

# The containers image_transport's compressed transports produce.
COMPRESSED_FORMATS = ("jpeg", "png")


class ImageHeaderError(ValueError):
    """Not a PNG or JPEG, or a header that cannot be read."""


def compressed_header(data: bytes) -> tuple[str, int, int]:
    """(container, width, height) read from a PNG or JPEG header, without decoding.

    What a malicious or broken peer cannot hide: the size a decoder would allocate.
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise ImageHeaderError("PNG without an IHDR header")
        width, height = struct.unpack(">II", data[16:24])
        return "png", width, height
    if data[:2] == b"\xff\xd8":
        return ("jpeg",) + _jpeg_size(data)
    raise ImageHeaderError(f"not a JPEG or PNG image (starts with {data[:8].hex()}); "
                     f"compressed input accepts {', '.join(COMPRESSED_FORMATS)}")


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic ...): they carry the size.
_JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes) -> tuple[int, int]:
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            raise ImageHeaderError(f"corrupt JPEG: no marker at byte {position}")
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        length = struct.unpack(">H", data[position + 2:position + 4])[0]
        if length < 2:
            raise ImageHeaderError("corrupt JPEG: segment length below 2")
        if marker in _JPEG_FRAME_MARKERS:
            if position + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[position + 5:position + 9])
            return width, height
        if marker in (0xDA, 0xD9):  # scan data or end of image before any frame header
            break
        position += 2 + length
    raise ImageHeaderError("corrupt JPEG: no frame header (SOF) before the image data")
