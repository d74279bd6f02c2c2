"""CRC-32 (zlib's: reflected polynomial 0xEDB88320) of many small extents in one call.

A flash bundle store checksums every bundle (a few KiB) so that a read of any subset can be
verified; a layer read then covers a thousand extents, and ``zlib.crc32`` called once per extent
costs more in call overhead than in hashing (and keeps the GIL for pieces under 5 KiB). This
computes all of them in one compiled loop (slicing-by-8), extents split across threads, with the
exact values ``zlib.crc32`` gives (tests).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


def _tables() -> np.ndarray:
    """Slicing-by-8 lookup tables: [8, 256] uint32."""
    t = np.zeros((8, 256), np.uint32)
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
        t[0, n] = c
    for k in range(1, 8):
        for n in range(256):
            t[k, n] = (t[k - 1, n] >> 8) ^ t[0, t[k - 1, n] & 0xFF]
    return t


TABLES = _tables()


@njit(cache=True, nogil=True)
def _crc32(data, start, length, t):
    c = np.uint32(0xFFFFFFFF)
    i = start
    end = start + length
    while i + 8 <= end:  # eight bytes per step
        lo = c ^ (np.uint32(data[i]) | (np.uint32(data[i + 1]) << 8) | (np.uint32(data[i + 2]) << 16)
                  | (np.uint32(data[i + 3]) << 24))
        c = (t[7, lo & 0xFF] ^ t[6, (lo >> 8) & 0xFF] ^ t[5, (lo >> 16) & 0xFF] ^ t[4, lo >> 24]
             ^ t[3, data[i + 4]] ^ t[2, data[i + 5]] ^ t[1, data[i + 6]] ^ t[0, data[i + 7]])
        i += 8
    while i < end:
        c = (c >> 8) ^ t[0, (c ^ data[i]) & 0xFF]
        i += 1
    return c ^ np.uint32(0xFFFFFFFF)


@njit(cache=True, nogil=True, parallel=True)
def _crc32_many(data, starts, lengths, t, out):
    for k in prange(len(starts)):
        out[k] = _crc32(data, starts[k], lengths[k], t)


def crc32_many(data: np.ndarray, starts, lengths) -> np.ndarray:
    """CRC-32 of ``data[starts[k]:starts[k] + lengths[k]]`` for every k (uint8 data): [K] uint32."""
    starts = np.asarray(starts, np.int64)
    lengths = np.asarray(lengths, np.int64)
    out = np.empty(len(starts), np.uint32)
    if len(starts):
        _crc32_many(data, starts, lengths, TABLES, out)
    return out
