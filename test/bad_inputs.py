"""Crafted files that once broke readers: images whose headers claim far more than they hold."""
from __future__ import annotations

import struct
import zlib


def png_file(width: int, height: int, bit_depth: int = 8, colour_type: int = 2, rows: bytes = b"") -> bytes:
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def png_bomb(side: int = 30000) -> bytes:
    """A complete, valid 1-bit greyscale PNG of side x side black pixels: ~110 KB on the wire."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    stream = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    return png_file(side, side, bit_depth=1, colour_type=0, rows=stream)


def jpeg_claiming(width: int, height: int, good_jpeg: bytes) -> bytes:
    """A real JPEG with the size fields of its frame header rewritten."""
    data = bytearray(good_jpeg)
    position = 2
    while data[position + 1] not in (0xC0, 0xC1, 0xC2):
        position += 2 + struct.unpack(">H", data[position + 2:position + 4])[0]
    data[position + 5:position + 9] = struct.pack(">HH", height, width)
    return bytes(data)
