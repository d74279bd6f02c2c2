"""Quantized weights as a GPU holds them: int4 in the nibbles layout and int8 groups, multiplied by
the Triton kernels of offload.kernels.triton_quant. On this CPU they run under TRITON_INTERPRET=1
(set in conftest) with fp32 products; on a GPU the same tests run the compiled kernels."""

from __future__ import annotations

import pytest
import torch

from offload import LLM
from offload.kernels import (
    int4_nibbles_dequantize,
    int4_nibbles_linear,
    int4_nibbles_linear_ref,
    int8_group_linear,
    int8_group_linear_ref,
    last_backend,
    pack_int4_nibbles,
)
from offload.kernels.reference import unpack_int4_nibbles
from offload.kernels.triton_quant import DECODE_ROWS
from offload.quant import (
    INT4_CPU_LAYOUT,
    INT4_NIBBLES_LAYOUT,
    KERNEL_DTYPE,
    Int4Weight,
    dequantize_int4,
    int4_layout,
    quantize_int4,
    stored_format,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# rows: one decode row, a few, both sides of the decode/prefill tiling switch, several prefill tiles
ROWS = [1, 5, DECODE_ROWS, DECODE_ROWS + 1, 70]
# (N, K): K below, at and past one 128-wide decode tile and not a multiple of it (masked tails)
SHAPES = [(16, 64), (48, 96), (80, 160), (64, 256)]


def _tolerance(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """fp32: accumulation order alone; bf16: the weight rounded to bf16 in the kernel and a bf16 output."""
    return (1e-4 if dtype == torch.float32 else 2e-2) * ref.abs().max().item() + 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k,group", [(n, k, 32) for n, k in SHAPES] + [(16, 64, 64), (80, 192, 64)])
@pytest.mark.parametrize("m", ROWS)
def test_int4_nibbles_kernel_matches_the_reference(m, n, k, group, dtype):
    g = torch.Generator().manual_seed(m * 1000 + n + k + group)
    codes = torch.randint(0, 16, (n, k), generator=g)
    scales_zeros = (torch.randn(k // group, n, 2, generator=g) * 0.05).to(KERNEL_DTYPE)  # [G, N, 2]
    packed = pack_int4_nibbles(codes)  # [N, K/2]
    assert torch.equal(unpack_int4_nibbles(packed).long(), codes)
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = int4_nibbles_linear_ref(x, packed, scales_zeros)  # [M, N] fp32
    dev = torch.device(DEVICE)
    out = int4_nibbles_linear(x.to(dev), packed.to(dev), scales_zeros.to(dev), group, backend="triton")
    assert last_backend() == "triton" and out.shape == (m, n) and out.dtype == dtype
    assert (out.cpu().float() - ref).abs().max().item() <= _tolerance(ref, dtype)
    # the reference's weight is the tinygemm convention's: (q - 8) * scale + zero per group
    scale, zero = scales_zeros.float().permute(1, 0, 2).unbind(-1)  # [N, G]
    assert torch.equal(int4_nibbles_dequantize(packed, scales_zeros), dequantize_int4(codes, scale, zero))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", ROWS)
def test_int8_triton_kernel_matches_the_reference(m, n, k, dtype):
    g = torch.Generator().manual_seed(m * 1000 + n + k)
    codes = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    scales = torch.rand(n, k // 32, generator=g) * 1e-2  # [N, G] fp32
    x = torch.randn(m, k, generator=g).to(dtype)
    ref = int8_group_linear_ref(x, codes, scales)  # [M, N] fp32
    dev = torch.device(DEVICE)
    out = int8_group_linear(x.to(dev), codes.to(dev), scales.to(dev), backend="triton")
    assert last_backend() == "triton" and out.dtype == torch.float32  # as the CPU kernels return
    assert (out.cpu() - ref).abs().max().item() <= _tolerance(ref, dtype)


def test_nibbles_weight_holds_the_cpu_layouts_weight():
    """The same float weight quantized into either layout holds the same codes, scales and zeros:
    both dequantize to one matrix, both products agree, and the bytes are the same count."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 160, generator=g) * 0.05
    cpu = Int4Weight.from_float(w, torch.bfloat16)
    gpu = Int4Weight.from_float(w, torch.bfloat16, layout=INT4_NIBBLES_LAYOUT)
    assert (cpu.layout, gpu.layout) == (INT4_CPU_LAYOUT, INT4_NIBBLES_LAYOUT)
    assert torch.equal(cpu.dequantize(), gpu.dequantize()) and cpu.nbytes == gpu.nbytes
    codes, scale, zero = quantize_int4(w, 32, KERNEL_DTYPE)
    assert torch.equal(unpack_int4_nibbles(gpu.packed).int(), codes)
    x = torch.randn(3, 160, generator=g).bfloat16()
    ref = x.float() @ dequantize_int4(codes, scale, zero).t()
    for weight in (cpu, gpu):
        assert (weight(x).float() - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
    assert int4_layout("cpu") == INT4_CPU_LAYOUT and int4_layout("cuda") == INT4_NIBBLES_LAYOUT
    with pytest.raises(ValueError, match="unknown int4 layout"):
        Int4Weight(16, 64, torch.bfloat16, layout="tiles")


def test_stores_name_the_int4_layout():
    """A weight store records the layout its int4 bytes are in: a CPU store (the packer's order, which
    depends on the CPU) and a GPU store (nibbles, the same everywhere) are never read as each other."""
    cpu, gpu = stored_format("int4"), stored_format("int4", INT4_NIBBLES_LAYOUT)
    assert cpu != gpu and "nibbles layout" in gpu and "packed by torch" in cpu
    assert stored_format("int8") == stored_format("int8", INT4_NIBBLES_LAYOUT)  # int8 has one layout


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_tiny_model_in_the_gpu_layout_equals_the_cpu_one(tiny_models, dtype):
    """A model whose projections are held as a GPU holds them (nibbles, the Triton kernel) gives the
    logits of the same model in the CPU's layout (same codes, another kernel), greedy tokens included."""
    folder, hf = tiny_models["qwen2"]  # QKV bias: a bias beside a Triton product
    ids = torch.randint(3, hf.config.vocab_size, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    cpu = LLM(folder, quantize="int4", dtype=dtype, device="cpu", verbose=False)
    gpu = LLM(folder, dtype=dtype, device="cpu", verbose=False)  # converted below into the GPU's layout
    model = gpu.model
    for layer in model.layers:
        layer.quantize("int4", layout=INT4_NIBBLES_LAYOUT)
    model.quantize_int8_table("embed")
    model.quantize_int8_table("lm_head")
    model.bind_decode_step()  # the weights changed: the bound step calls the nibbles weights' products
    assert all(layer.mlp.w_down.layout == INT4_NIBBLES_LAYOUT for layer in model.layers)
    got, ref = gpu.logits(ids), cpu.logits(ids)
    assert (got - ref).abs().max().item() <= 0.03 * ref.abs().max().item()
    from offload import SamplingParams

    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert gpu.generate([ids], params)[0].token_ids == cpu.generate([ids], params)[0].token_ids


COMPILE_SCRIPT = """
import os
os.environ.pop("TRITON_INTERPRET", None)  # the kernels as a GPU compiles them, not the interpreter's
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from offload.kernels import triton_attention as ta, triton_quant as tq

def compile_for_gpu(kernel, pointers, consts, floats=()):
    # every other argument a 32-bit int (strides, sizes), as the launcher types small Python ints
    sig = {name: "constexpr" if name in consts else pointers.get(name) or ("fp32" if name in floats else "i32")
           for name in kernel.arg_names}
    triton.compile(ASTSource(kernel, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))

for act in ("bf16", "fp32"):
    fp32 = act == "fp32"
    for block_m, block_n, block_k in (tq.DECODE_TILE, tq.PREFILL_TILE):
        tile = {"GROUP": 32, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "FP32": fp32}
        compile_for_gpu(tq.int4_nibbles_linear_kernel,
                        {"x_ptr": "*" + act, "w_ptr": "*u8", "sz_ptr": "*bf16", "out_ptr": "*" + act}, tile)
        compile_for_gpu(tq.int8_group_linear_kernel,
                        {"x_ptr": "*" + act, "w_ptr": "*i8", "s_ptr": "*fp32", "out_ptr": "*fp32"}, tile)
    ids = {"sel_ptr": "*i32", "nsel_ptr": "*i32", "out_ptr": "*fp32", "lse_ptr": "*fp32"}
    compile_for_gpu(ta.gather_attention_kernel,
                    {"q_ptr": "*" + act, "k_ptr": "*" + act, "v_ptr": "*" + act, "lens_ptr": "*i32", **ids},
                    {"SINK": 4, "WINDOW": 64, "G": 4, "BLOCK_G": 16, "D": 128, "BLOCK_N": 64, "FP32": fp32},
                    floats=("sm_scale_log2",))
    compile_for_gpu(ta.shadowkv_attention_kernel,
                    {"q_ptr": "*" + act, "u_ptr": "*" + act, "sv_ptr": "*" + act, "v_ptr": "*" + act,
                     "freq_ptr": "*fp32", **ids},
                    {"G": 4, "BLOCK_G": 16, "D": 128, "BLOCK_R": 256, "BLOCK_N": 64, "FP32": fp32},
                    floats=("sm_scale_log2", "rope_scaling"))
    compile_for_gpu(ta.merge_kernel, {"out_parts_ptr": "*fp32", "lse_parts_ptr": "*fp32", "out_ptr": "*" + act,
                                      "lse_ptr": "*fp32"}, {"D": 128, "BLOCK_P": 4})
print("compiled")
"""


def test_kernels_compile_for_a_gpu():
    """The interpreter runs what a GPU compile refuses (a plain global in a kernel, a dtype a loop
    changes): compile every Triton kernel (quantized products at both tilings, the attention
    kernels, the merge) for an H100 (sm_90), bf16 and fp32, on this CPU."""
    import subprocess
    import sys
    from pathlib import Path

    run = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT], capture_output=True, text=True, timeout=600,
                         cwd=Path(__file__).resolve().parents[1] / "tests")
    assert run.returncode == 0 and run.stdout.strip().endswith("compiled"), run.stderr[-2000:]
