"""GGUF blocks read straight into the run-time quantized forms, without a float copy in between.

int4 groups of 32 (``offload.quant.Int4Weight``, tinygemm's convention w = (q - 8) * scale + zero):
  Q4_0  (d, 16 bytes)            w = d (q - 8)            -> scale d, zero 0
  Q4_1  (d, m, 16 bytes)         w = d q + m              -> scale d, zero m + 8 d
  Q4_K  (d, dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes; 256 weights)
                                 w = d sc_j q - dmin m_j  -> per 32: scale d sc_j, zero 8 d sc_j - dmin m_j
int8 groups of 32 (``offload.quant.Int8Weight``, w = code * scale):
  Q8_0  (d, 32 int8)             -> codes as stored, scale d

The codes are the file's, bit for bit; the scales and zeros are exact in fp32 (the kernel then
holds int4 scales and zeros in bf16). Dequantizing and searching a grid again, the path before
this, took most of a GGUF load (1.1 s of the default model's 2.5) and could land a code off by one.

Rows of blocks arrive as the file holds them: uint8 [N, K / block * block bytes].
"""

from __future__ import annotations

import numpy as np

from ..kernels.reference import INT4_MID  # tinygemm's zero code

# block type -> (weights per block, bytes per block)
_BLOCKS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q8_0": (32, 34)}
INT4_BLOCK_TYPES = ("Q4_0", "Q4_1", "Q4_K")
INT8_BLOCK_TYPES = ("Q8_0",)


def _blocks(data: np.ndarray, kind: str) -> tuple[np.ndarray, int]:
    """Rows of bytes [N, row bytes] -> blocks [N, B, block bytes] and K (weights per row)."""
    per, size = _BLOCKS[kind]
    N, row_bytes = data.shape
    if row_bytes % size:
        raise ValueError(f"{kind} rows of {row_bytes} bytes are not whole blocks of {size}")
    return np.ascontiguousarray(data).reshape(N, row_bytes // size, size), row_bytes // size * per


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte ``at`` of every block, as fp32 [N, B]."""
    return blocks[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes per group [..., 16] -> its 32 codes [..., 32]: low nibbles first, then high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def int4_groups(data: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4_0 / Q4_1 / Q4_K tensor's rows [N, row bytes] -> codes uint8 [N, K] in 0..15, scale and
    zero fp32 [N, K / 32]: w = (codes - 8) * scale + zero, group by group."""
    blocks, K = _blocks(data, kind)
    N, B, _ = blocks.shape
    if kind in ("Q4_0", "Q4_1"):
        d = _f16(blocks, 0)  # [N, B]
        qs = blocks[..., 4 if kind == "Q4_1" else 2:]  # [N, B, 16]
        codes = _nibbles(qs).reshape(N, K)
        zero = (_f16(blocks, 2) + INT4_MID * d) if kind == "Q4_1" else np.zeros_like(d)
        return codes, d, zero.astype(np.float32)
    if kind == "Q4_K":
        d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]  # [N, B, 1]
        sc, m = _k4_scales_mins(blocks[..., 4:16])  # [N, B, 8] each
        qs = blocks[..., 16:].reshape(N, B, 4, 32)  # 4 chunks of 64 weights: low nibbles, then high
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(N, K)
        scale = d * sc  # [N, B, 8]
        zero = INT4_MID * scale - dmin * m
        return codes, scale.reshape(N, -1).astype(np.float32), zero.reshape(N, -1).astype(np.float32)
    raise ValueError(f"no int4 form for {kind} blocks (it has {', '.join(INT4_BLOCK_TYPES)})")


def _k4_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes [..., 12] -> the 8 sub-blocks' 6-bit scales and mins [..., 8] (fp32): the
    first four in the low 6 bits of bytes 0-3 and 4-7, the last four split between bytes 8-11's
    nibbles and the top 2 bits of bytes 0-7 (ggml's get_scale_min_k4)."""
    p = packed.astype(np.uint16)
    sc = np.empty(packed.shape[:-1] + (8,), np.float32)
    m = np.empty_like(sc)
    sc[..., :4] = p[..., 0:4] & 63
    m[..., :4] = p[..., 4:8] & 63
    sc[..., 4:] = (p[..., 8:12] & 0x0F) | ((p[..., 0:4] >> 6) << 4)
    m[..., 4:] = (p[..., 8:12] >> 4) | ((p[..., 4:8] >> 6) << 4)
    return sc, m


def int8_groups(data: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """A Q8_0 tensor's rows [N, row bytes] -> codes int8 [N, K], scales fp32 [N, K / 32]."""
    if kind not in INT8_BLOCK_TYPES:
        raise ValueError(f"no int8 form for {kind} blocks (it has {', '.join(INT8_BLOCK_TYPES)})")
    blocks, K = _blocks(data, kind)
    N = blocks.shape[0]
    return blocks[..., 2:].view(np.int8).reshape(N, K), _f16(blocks, 0)
