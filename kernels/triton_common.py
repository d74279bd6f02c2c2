"""What the Triton kernel modules share: whether Triton's interpreter runs them (TRITON_INTERPRET=1,
read at import, as Triton does) and a ``tl.dot`` that stays exact there.

Import only after deciding on the Triton backend (it imports triton).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def dot(a, b, FP32: tl.constexpr):
    # Under the interpreter a bf16 tl.dot is wrong, and fp32 inputs should not drop to tf32: upcast.
    if FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b)
