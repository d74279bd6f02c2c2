"""Sparse decode-attention kernels against dense attention over the full cache.

Shapes default to Llama-3.1-8B heads (32 query heads, 8 KV heads, head_dim 128) at a 128K context
with a 2,048-token selection plus 4 sinks and a 64-token window. Prints, per operation: median
time, the bytes it must read (counted below), achieved bandwidth, the fraction of the measured
device-to-device copy bandwidth (the roofline) and the speed-up over dense attention.

GPU: Triton kernels timed with triton.testing.do_bench (CUDA events, median), dense attention is
torch SDPA (FlashAttention backend where available). CPU: the torch references, timed with a
wall clock (median of --repeats), against dense attention with the same explicit-matmul path and
against SDPA.

    python -m offload.profiles.bench_kernels --out kernels.json            # GPU if present, else CPU
    python -m offload.profiles.bench_kernels --device cpu --dtype bfloat16
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from offload.fileio import write_json_atomic


def _cpu_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _gpu_time(fn) -> float:
    import triton

    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") / 1e3


def copy_bandwidth(device: torch.device, repeats: int) -> float:
    """Bytes per second of a large copy (read + write counted), the memory roofline."""
    n = (1 << 30) if device.type == "cuda" else (1 << 28)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    t = _gpu_time(fn) if device.type == "cuda" else _cpu_time(fn, repeats)
    return 2 * n / t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--budget", type=int, default=2048)
    p.add_argument("--sink", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rank", type=int, default=160, help="ShadowKV rank of the pre-RoPE keys (all KV heads)")
    p.add_argument("--repeats", type=int, default=5, help="CPU timing repeats")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from offload.config import preset
    from offload.kernels import api, reference
    from offload.rope import rope_frequencies

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    dtype = getattr(torch, args.dtype)
    gpu = device.type == "cuda"
    B, H, Hkv, D, N, S = args.batch, args.heads, args.kv_heads, args.head_dim, args.context, args.budget
    esize = torch.empty((), dtype=dtype).element_size()
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(B, H, D, device=device, dtype=dtype, generator=gen)
    k = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, Hkv, N, D, device=device, dtype=dtype, generator=gen)
    seq_lens = torch.full((B,), N, device=device, dtype=torch.int32)
    # Selection: S distinct ids per KV head outside the dense part, sorted (as indexes return them).
    pool = N - args.sink - args.window
    selected = (torch.rand(B, Hkv, pool, device=device, generator=gen).argsort(-1)[..., :S] + args.sink)
    selected = selected.sort(-1).values.to(torch.int32).contiguous()
    counts = torch.full((B, Hkv), S, device=device, dtype=torch.int32)
    scale = 1 / math.sqrt(D)
    backend = "triton" if gpu else "torch"
    time_fn = _gpu_time if gpu else (lambda f: _cpu_time(f, args.repeats))

    results = {"device": torch.cuda.get_device_name(device) if gpu else "cpu", "dtype": args.dtype,
               "shape": vars(args), "torch": torch.__version__}
    roof = copy_bandwidth(device, args.repeats)
    results["copy_bandwidth_GBps"] = roof / 1e9
    listed = args.sink + args.window + S
    rows = []

    gather = lambda: api.gather_attention(q, k, v, selected, counts, seq_lens, scale=scale, sink=args.sink,  # noqa
                                          window=args.window, backend=backend)
    gather_bytes = B * Hkv * listed * D * 2 * esize + B * Hkv * S * 4 + 2 * B * H * D * esize
    rows.append(("gather attention", time_fn(gather), gather_bytes))

    # ShadowKV: factors of all KV heads' pre-RoPE keys, values of the selection already gathered.
    R = args.rank
    u = (torch.randn(B, N, R, device=device, dtype=dtype, generator=gen) / math.sqrt(R)).to(dtype)
    sv = torch.randn(B, R, Hkv * D, device=device, dtype=dtype, generator=gen)
    v_sel = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=gen)
    inv_freq, scaling = rope_frequencies(preset("llama-3.1-8b").replace(head_dim=D))
    inv_freq = inv_freq.to(device)
    shadow = lambda: api.shadowkv_attention(q, u, sv, v_sel, selected, counts, inv_freq, scale=scale,  # noqa
                                            attention_scaling=scaling, backend=backend)
    # Each KV head reads its selected rows of U (R values each), its values, and SV once.
    shadow_bytes = B * Hkv * S * (R + D) * esize + B * Hkv * S * 4 + B * R * Hkv * D * esize + 2 * B * H * D * esize
    rows.append(("shadowkv reconstruct+attend", time_fn(shadow), shadow_bytes))

    outs = torch.randn(2, B, H, D, device=device, dtype=dtype, generator=gen)
    lses = torch.randn(2, B, H, device=device, generator=gen)
    merge = lambda: api.merge_attention(outs, lses, backend=backend)  # noqa: E731
    rows.append(("merge (2 parts)", time_fn(merge), outs.numel() * esize + lses.numel() * 4 + B * H * (D * esize + 4)))

    dense_bytes = B * Hkv * N * D * 2 * esize
    sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], k, v, scale=scale, enable_gqa=True)  # noqa
    dense_sdpa = time_fn(sdpa)
    rows.append(("dense SDPA (full cache)", dense_sdpa, dense_bytes))
    dense_ref = None
    if not gpu:
        ref = lambda: reference.dense_attention_ref(q, k, v, seq_lens, scale)  # noqa: E731
        dense_ref = time_fn(ref)
        rows.append(("dense explicit matmul (full cache)", dense_ref, dense_bytes))
    baseline = min(dense_sdpa, dense_ref) if dense_ref else dense_sdpa

    # Correctness at full scale: kernel vs torch reference on the same inputs.
    if gpu:
        o1, l1 = gather()
        o2, l2 = reference.gather_attention_ref(q, k, v, selected, counts, seq_lens, scale, args.sink, args.window)
        results["gather_max_abs_err_vs_ref"] = (o1.float() - o2.float()).abs().max().item()
        o1, _ = shadow()
        o2, _ = reference.shadowkv_attention_ref(q, u, sv, v_sel, selected, counts, inv_freq, scale, scaling)
        results["shadowkv_max_abs_err_vs_ref"] = (o1.float() - o2.float()).abs().max().item()

    results["ops"] = []
    print(f"device {results['device']}, {args.dtype}, B={B} H={H} Hkv={Hkv} D={D} context={N} budget={S} "
          f"(+{args.sink} sinks, {args.window} window); copy roofline {roof / 1e9:.0f} GB/s")
    print("| operation | median | bytes read | GB/s | % of roofline | speed-up vs dense |")
    print("|---|---|---|---|---|---|")
    for name, t, nbytes in rows:
        bw = nbytes / t
        entry = {"op": name, "seconds": t, "bytes": nbytes, "GBps": bw / 1e9, "roofline_frac": bw / roof,
                 "speedup_vs_dense": baseline / t}
        results["ops"].append(entry)
        print(f"| {name} | {t * 1e6:.1f} us | {nbytes / 2**20:.2f} MiB | {bw / 1e9:.0f} | {100 * bw / roof:.0f}% | "
              f"{baseline / t:.1f}x |")
    for key in ("gather_max_abs_err_vs_ref", "shadowkv_max_abs_err_vs_ref"):
        if key in results:
            print(f"{key}: {results[key]:.3g}")
    if args.out:
        write_json_atomic(args.out, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
