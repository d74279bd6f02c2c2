"""offload.kernels: sparse decode-attention kernels (Triton on GPU, numba on CPU) and the CPU kernels of
quantized weights (int8 groups; int4 products of many rows) and their Triton kernels for a GPU, with
plain-torch references.

Importing this package imports neither Triton nor CUDA; the kernel module loads on first use.
"""

from .api import (
    CacheArrays,
    DecodeRanges,
    Int8Arrays,
    KiviArrays,
    cpu_has_fast_bf16,
    gather_attention,
    int4_nibbles_linear,
    int8_group_linear,
    kv_decode_attention,
    last_backend,
    merge_attention,
    resolve_backend,
    shadowkv_attention,
    store_kv,
    store_kv_int8,
)
from .int4_pack import (
    INT4_GEMM_ROWS,
    PACK_TILE_ROWS,
    ROW_MULTIPLE,
    Int4PackLayout,
    int4_dequantize,
    int4_dequantize_rows,
    int4_group_linear,
    int4_pack_layout,
)
from .reference import (
                        INT4_MID,
                        dense_attention_ref,
                        dequantize_int8_groups,
                        gather_attention_ref,
                        int4_nibbles_dequantize,
                        int4_nibbles_linear_ref,
                        int8_group_linear_ref,
                        kv_decode_attention_ref,
                        merge_attention_ref,
                        pack_int4_nibbles,
                        rope_rotate,
                        shadowkv_attention_ref,
)

__all__ = ["gather_attention", "kv_decode_attention", "kv_decode_attention_ref",
           "shadowkv_attention", "merge_attention", "last_backend", "resolve_backend",
           "gather_attention_ref", "shadowkv_attention_ref", "merge_attention_ref", "dense_attention_ref",
           "rope_rotate", "store_kv", "store_kv_int8", "CacheArrays", "KiviArrays", "DecodeRanges", "cpu_has_fast_bf16",
           "int8_group_linear", "int8_group_linear_ref", "Int8Arrays", "dequantize_int8_groups",
           "INT4_MID", "INT4_GEMM_ROWS", "PACK_TILE_ROWS", "ROW_MULTIPLE", "Int4PackLayout", "int4_dequantize",
           "int4_dequantize_rows", "int4_group_linear",
           "int4_pack_layout", "int4_nibbles_linear", "int4_nibbles_linear_ref", "int4_nibbles_dequantize",
           "pack_int4_nibbles"]
