"""CPU decode attention straight from the KV cache (numba), for int8, bf16 and fp32 caches.

The torch path costs far more than the bytes it reads: a bf16 cache goes through bf16 matmuls
that this CPU runs at about 0.6 GB/s of cache read (43 ms per layer at 32K tokens of the default
model), and an int8 cache is first dequantized into an fp32 copy (4 bytes written and read again
per code byte). Here each key and value is widened to fp32 one row at a time in a buffer that
stays in L1 (bf16: the 16 bits shifted into an fp32's high half, exact; int8: code times the
token's scale) and used at once: the cache is read once, never copied.

The same kernel gathers: given a list of token ids per (row, KV head) (a sparse policy's
selection with the sinks and the recent window), it widens those rows of the cache where they lie,
where the torch path first copies them out with index_select and widens the copy.

The visible tokens of a (row, KV head) are cut into splits that run in parallel (prange) and are
merged by their running max and sum (flash-decoding), so a single sequence with few KV heads
still uses every core. The G query heads of a KV head share each loaded key and value.

Shapes: B rows, Hkv KV heads, G query heads per KV head, N cached tokens, D head_dim.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .reference import KV_CODE_MAX, KV_SCALE_FLOOR

# Tokens per parallel task: long enough that a task's loop dwarfs its start-up, short enough
# that one row and a few KV heads spread over the cores.
MIN_SPLIT_TOKENS = 256
TASKS_PER_THREAD = 4
# Tokens scored at a time within a task before their softmax update: the block's scores stay in L1.
BLOCK_TOKENS = 256
# A cache line: the gather touches one element per line of each listed row.
LINE_BYTES = 64
# Below any score: the running max of a split before its first key (finite, as fastmath assumes).
NO_SCORE = np.float32(-3.0e38)
# Entries a loop over listed rows prefetches ahead (ids known in advance: a search's clusters and
# zone): a cold row is a DRAM round trip, and the loop's own work hides only one or two of them.
PREFETCH_AHEAD = 8


def _prefetch_codegen(context, builder, signature, args):
    """llvm.prefetch (read, keep in all cache levels) of the element of an array at the given indices."""
    arrty, *index_types = signature.args
    ary = context.make_array(arrty)(context, builder, args[0])
    inds = [context.cast(builder, value, ty, types.intp) for value, ty in zip(args[1:], index_types)]
    inds += [context.get_constant(types.intp, 0)] * (arrty.ndim - len(inds))
    ptr = cgutils.get_item_pointer2(context, builder, data=ary.data, shape=cgutils.unpack_tuple(builder, ary.shape),
                                    strides=cgutils.unpack_tuple(builder, ary.strides), layout=arrty.layout, inds=inds)
    i32, byte_ptr = ir.IntType(32), ir.IntType(8).as_pointer()
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32]),
                                        "llvm.prefetch.p0")
    builder.call(fn, [builder.bitcast(ptr, byte_ptr), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
    return context.get_dummy_value()


@intrinsic
def prefetch(typingctx, arr, i):
    """Start loading the cache line of arr[i] (of row i, for an array of more dimensions): a hint the
    loop may never follow up with a read; the index must lie inside the array (its address is
    computed unchecked)."""
    return types.void(arr, i), _prefetch_codegen


@intrinsic
def prefetch2(typingctx, arr, i, j):
    """:func:`prefetch` of arr[i, j] (a row's later cache line)."""
    return types.void(arr, i, j), _prefetch_codegen


# exp(x) = 2^k e^f: k = round(x log2 e), f = x - k ln 2 (ln 2 in two parts, Cody and Waite, so f
# is exact to fp32's rounding), |f| <= ln2 / 2; e^f by its Taylor series to degree 7 (error < 1e-8),
# 2^k built in the float's exponent bits. Plain arithmetic that the compiler vectorizes, where
# np.exp is a call per element (4x slower here: pip's llvmlite has no SVML).
LOG2E = np.float32(1.4426950408889634)
LN2_HIGH = np.float32(0.693359375)  # 9 significant bits: k x LN2_HIGH is exact
LN2_LOW = np.float32(math.log(2.0) - 0.693359375)
EXP_TAYLOR = tuple(np.float32(1.0 / math.factorial(i)) for i in range(8))
# Below this exp underflows fp32's normal range; inputs are clamped to it (exp(-87) ~ 1.6e-38).
EXP_FLOOR = np.float32(-87.0)


@njit(inline="always", fastmath=True)
def exp_inplace(x, bits, n):  # pragma: no cover - numba
    """x[:n] <- exp(x[:n]) for x <= 0 (scores minus their max); ``bits`` an int32 scratch of >= n."""
    c0, c1, c2, c3, c4, c5, c6, c7 = EXP_TAYLOR
    power = bits.view(np.float32)
    for i in range(n):
        y = max(x[i], EXP_FLOOR)
        k = np.floor(y * LOG2E + np.float32(0.5))
        f = (y - k * LN2_HIGH) - k * LN2_LOW
        x[i] = ((((((c7 * f + c6) * f + c5) * f + c4) * f + c3) * f + c2) * f + c1) * f + c0
        bits[i] = (np.int32(k) + 127) << 23  # 2^k
    for i in range(n):
        x[i] *= power[i]


@njit(inline="always", fastmath=True)
def score_row(q, b, h, row, scores, i, softmax_scale):  # pragma: no cover - numba
    """scores[g, i] <- the scaled dot of each query head g of (b, h), q [B, Hkv, G, D], with row [D]."""
    for g in range(q.shape[2]):
        dot = np.float32(0.0)
        for d in range(row.shape[0]):
            dot += q[b, h, g, d] * row[d]
        scores[g, i] = dot * softmax_scale


@njit(inline="always", fastmath=True)
def accumulate_row(acc, scores, i, row):  # pragma: no cover - numba
    """acc[g] += scores[g, i] x row [D], for every query head g: a value into the weighted sum."""
    for g in range(acc.shape[0]):
        w = scores[g, i]
        for d in range(row.shape[0]):
            acc[g, d] += w * row[d]


# Rows widened and used together by the decode kernel: each pass scores ROWS_PER_PASS keys against
# three query heads at a time, then adds as many values into each head's sum in one load and store of
# it (a row at a time, the sum's load-add-store chain and one reduction per dot bounded the loop).
# One KV head over 4,096 bf16 tokens, one thread, warm, against a row at a time: the default model's
# (3 query heads of 64) 32.3 -> 27.4 ns a token, Llama-3's (4 of 128) 62.7 -> 55.2, Qwen's (7 of 64)
# 60.8 -> 47.4; the default model's dense step 22.3 -> 20.7 ms at 4K, 98 -> 84 ms at 32K (4 rows
# a pass: within 3% of 8).
ROWS_PER_PASS = 8


@njit(inline="always", fastmath=True)
def score_rows(qg, rows, count, scores, i, softmax_scale, D):  # pragma: no cover - numba
    """scores[g, i + j] <- the scaled dot of query head g, qg [G, D], with rows[j] [>= D], for j <
    count: three query heads at a time, so that each widened key is loaded once for three dots."""
    G = qg.shape[0]
    g = 0
    while g + 3 <= G:
        q0, q1, q2 = qg[g], qg[g + 1], qg[g + 2]
        for j in range(count):
            row = rows[j]
            s0, s1, s2 = np.float32(0.0), np.float32(0.0), np.float32(0.0)
            for d in range(D):
                x = row[d]
                s0 += q0[d] * x
                s1 += q1[d] * x
                s2 += q2[d] * x
            scores[g, i + j] = s0 * softmax_scale
            scores[g + 1, i + j] = s1 * softmax_scale
            scores[g + 2, i + j] = s2 * softmax_scale
        g += 3
    while g < G:
        q0 = qg[g]
        for j in range(count):
            row = rows[j]
            s0 = np.float32(0.0)
            for d in range(D):
                s0 += q0[d] * row[d]
            scores[g, i + j] = s0 * softmax_scale
        g += 1


@njit(inline="always", fastmath=True)
def accumulate_rows(acc, scores, i, rows, count, D):  # pragma: no cover - numba
    """acc[g] += sum over j < count of scores[g, i + j] x rows[j] [>= D], for every query head g."""
    if count == ROWS_PER_PASS:
        for g in range(acc.shape[0]):
            a = acc[g]
            for d in range(D):
                total = np.float32(0.0)
                for j in range(ROWS_PER_PASS):
                    total += scores[g, i + j] * rows[j, d]
                a[d] += total
        return
    for j in range(count):
        for g in range(acc.shape[0]):
            w = scores[g, i + j]
            a = acc[g]
            for d in range(D):
                a[d] += w * rows[j, d]


@njit(inline="always", fastmath=True)
def score_pass(qg, rows, count, scores, i, softmax_scale):  # pragma: no cover - numba
    """:func:`score_rows` with the common head sizes' trip counts known to the compiler."""
    D = qg.shape[1]
    if D == 64:
        score_rows(qg, rows, count, scores, i, softmax_scale, 64)
    elif D == 128:
        score_rows(qg, rows, count, scores, i, softmax_scale, 128)
    else:
        score_rows(qg, rows, count, scores, i, softmax_scale, D)


@njit(inline="always", fastmath=True)
def accumulate_pass(acc, scores, i, rows, count):  # pragma: no cover - numba
    """:func:`accumulate_rows` with the common head sizes' trip counts known to the compiler."""
    D = acc.shape[1]
    if D == 64:
        accumulate_rows(acc, scores, i, rows, count, 64)
    elif D == 128:
        accumulate_rows(acc, scores, i, rows, count, 128)
    else:
        accumulate_rows(acc, scores, i, rows, count, D)


@njit(inline="always", fastmath=True)
def softmax_block(scores, n, acc, run_max, run_sum, exp_bits):  # pragma: no cover - numba
    """Flash attention's update for a block of n scores [G, >= n] of a task whose running max
    run_max [G], sum run_sum [G] and weighted values acc [G, D] cover the earlier blocks: the
    earlier terms are rescaled to the new max, and scores[g, :n] become the block's weights."""
    G, D = acc.shape
    for g in range(G):
        m = run_max[g]
        for i in range(n):
            m = max(m, scores[g, i])
        rescale = np.exp(run_max[g] - m)  # the earlier blocks' terms under the new max
        total = run_sum[g] * rescale
        for d in range(D):
            acc[g, d] *= rescale
        weights = scores[g]
        for i in range(n):
            weights[i] -= m
        exp_inplace(weights, exp_bits, n)
        for i in range(n):
            total += weights[i]
        run_max[g] = m
        run_sum[g] = total


@njit(cache=True)
def merge_splits(part_acc, part_max, part_sum, out, lse):  # pragma: no cover - numba
    """Splits [B, Hkv, S, ...] -> out [B, Hkv, G, D] and lse [B, Hkv, G]: exact, by their running max."""
    B, Hkv, S, G, D = part_acc.shape
    for b in range(B):
        for h in range(Hkv):
            for g in range(G):
                m = NO_SCORE
                for s in range(S):
                    m = max(m, part_max[b, h, s, g])
                total = np.float32(0.0)
                for d in range(D):
                    out[b, h, g, d] = 0.0
                for s in range(S):
                    if part_sum[b, h, s, g] == 0.0:
                        continue
                    c = np.exp(part_max[b, h, s, g] - m)
                    total += c * part_sum[b, h, s, g]
                    for d in range(D):
                        out[b, h, g, d] += c * part_acc[b, h, s, g, d]
                if total == 0.0:  # no token at all: nothing to attend
                    lse[b, h, g] = -np.inf
                    continue
                for d in range(D):
                    out[b, h, g, d] /= total
                lse[b, h, g] = m + np.log(total)


def _widen_row(cache, scale, b, h, t, row, row_bits):
    """row [D] f32 <- token t of cache[b, h]. This is the plain-numpy form; inside the kernel numba
    compiles the form for the cache's dtype (:func:`_widen_row_forms`)."""
    if cache.dtype == np.int8 and scale.dtype == np.uint16:
        row_bits[0] = np.uint32(scale[b, h, t]) << 16
        row[:] = row[0] * cache[b, h, t].astype(np.float32)
    elif cache.dtype == np.int8:
        row[:] = scale[b, h, t] * cache[b, h, t].astype(np.float32)
    elif cache.dtype == np.uint16:
        row_bits[:] = cache[b, h, t].astype(np.uint32) << 16
    else:
        row[:] = cache[b, h, t]


@overload(_widen_row, inline="always")
def _widen_row_forms(cache, scale, b, h, t, row, row_bits):  # pragma: no cover - numba
    """int8 codes: code x the token's scale; uint16 (a bf16's bits): the 16 bits become an fp32's
    high half (``row_bits`` is ``row`` viewed as uint32), exact; fp32: a copy."""
    if cache.dtype == types.int8 and scale.dtype == types.uint16:  # scales as bf16 bits
        def widen(cache, scale, b, h, t, row, row_bits):
            row_bits[0] = np.uint32(scale[b, h, t]) << 16
            s = row[0]
            for d in range(row.shape[0]):
                row[d] = s * np.float32(cache[b, h, t, d])
    elif cache.dtype == types.int8:
        def widen(cache, scale, b, h, t, row, row_bits):
            s = scale[b, h, t]
            for d in range(row.shape[0]):
                row[d] = s * np.float32(cache[b, h, t, d])
    elif cache.dtype == types.uint16:
        def widen(cache, scale, b, h, t, row, row_bits):
            for d in range(row.shape[0]):
                row_bits[d] = np.uint32(cache[b, h, t, d]) << 16
    else:
        def widen(cache, scale, b, h, t, row, row_bits):
            for d in range(row.shape[0]):
                row[d] = cache[b, h, t, d]
    return widen


def _part_row(part, b, h, row, row_bits):
    """row [D] f32 <- part[b, h] (bf16 bits as uint16, or fp32). Plain-numpy form; inside the kernels
    numba compiles the form for part's dtype (:func:`_part_row_forms`)."""
    if part.dtype == np.uint16:
        row_bits[:] = part[b, h].astype(np.uint32) << 16
    else:
        row[:] = part[b, h]


@overload(_part_row, inline="always")
def _part_row_forms(part, b, h, row, row_bits):  # pragma: no cover - numba
    """uint16 (a bf16's bits): the 16 bits become an fp32's high half, exact; fp32: a copy."""
    if part.dtype == types.uint16:
        def widen(part, b, h, row, row_bits):
            for d in range(row.shape[0]):
                row_bits[d] = np.uint32(part[b, h, d]) << 16
    else:
        def widen(part, b, h, row, row_bits):
            for d in range(row.shape[0]):
                row[d] = part[b, h, d]
    return widen


def narrow_row(out, b, h, row, row_bits):
    """out[b, h] <- row [D] f32 (``row_bits`` its bits), rounded to out's dtype: bf16 (as uint16 bits)
    to nearest even, or fp32 as it is (the merge here, KIVI's reads). Plain-numpy form; inside the
    kernels numba compiles the form for out's dtype (:func:`narrow_row_forms`)."""
    if out.dtype == np.uint16:
        out[b, h] = [bf16_round_bits(np.uint32(u)) for u in row_bits]
    else:
        out[b, h] = row


@overload(narrow_row, inline="always")
def narrow_row_forms(out, b, h, row, row_bits):  # pragma: no cover - numba
    """uint16 (a bf16's bits): each fp32 rounded to nearest even (:func:`bf16_round_bits`); fp32: a copy."""
    if out.dtype == types.uint16:
        def narrow(out, b, h, row, row_bits):
            for d in range(row.shape[0]):
                out[b, h, d] = np.uint16(bf16_round_bits(row_bits[d]))
    else:
        def narrow(out, b, h, row, row_bits):
            for d in range(row.shape[0]):
                out[b, h, d] = row[d]
    return narrow


@njit(cache=True, parallel=True)  # no fastmath: it would drop the tests for an lse of -inf
def merge_two(first, first_lse, second, second_lse, out, out_lse):  # pragma: no cover - numba
    """Two attention results over disjoint keys, first/second [B, H, D] (bf16 bits as uint16, or fp32;
    any strides: a prefill chunk's parts are laid out as the model's q is) with their log-sum-exps
    first_lse/second_lse [B, H] f32 (-inf: no key), merged exactly in fp32 in one pass -> out [B, H,
    D] (their dtype) and out_lse [B, H] f32 (nothing on either side: 0 and -inf). The tensor form is
    eight passes over the rows (a third of a 4K prefill's attention)."""
    B, H, D = first.shape
    for b in prange(B):
        first_bits = np.empty(D, np.uint32)
        second_bits = np.empty(D, np.uint32)
        first_row, second_row = first_bits.view(np.float32), second_bits.view(np.float32)
        for h in range(H):
            a, c = first_lse[b, h], second_lse[b, h]
            if a == -np.inf and c == -np.inf:
                first_row[:] = 0.0
                narrow_row(out, b, h, first_row, first_bits)
                out_lse[b, h] = -np.inf
                continue
            top = max(a, c)
            wa = np.exp(a - top) if a != -np.inf else np.float32(0.0)
            wc = np.exp(c - top) if c != -np.inf else np.float32(0.0)
            total = wa + wc
            wa, wc = wa / total, wc / total
            _part_row(first, b, h, first_row, first_bits)
            _part_row(second, b, h, second_row, second_bits)
            for d in range(D):
                first_row[d] = wa * first_row[d] + wc * second_row[d]
            narrow_row(out, b, h, first_row, first_bits)
            out_lse[b, h] = top + np.log(total)


@njit(cache=True, parallel=True, fastmath=True)
def decode_attention(q, k, k_scale, v, v_scale, ids, lo, hi, limit, split, softmax_scale, out,
                     lse):  # pragma: no cover - numba
    """q [B, Hkv, G, D] f32; k/v [B, Hkv, N, D] (contiguous): int8 codes with per-token scales
    k_scale/v_scale [B, Hkv, N] (f32, or bf16 bits as uint16), or bf16 bits as uint16, or f32
    (scales then unused, any [1, 1, 1] array). (row b, KV head h) attends positions lo[b, h]..hi[b, h]-1 ([B, Hkv] int64):
    token ids themselves when ``ids`` is empty ([0, 0, 0]), else entries of the id list ids [B, Hkv,
    M] int32 (negative ids skipped: a gather straight from the cache, no copy). ``split`` positions
    per task. Writes out [B, Hkv, G, D] f32 and the log-sum-exp of the scaled scores, lse [B, Hkv, G]
    f32 (partial results merge exactly by it; no token at all gives out 0, lse -inf). Returns the
    number of listed ids at or past ``limit`` (the tokens there are, <= N; skipped, never read: the
    caller raises)."""
    B, Hkv, G, D = q.shape
    listed = ids.shape[2] > 0
    line = max(1, LINE_BYTES // k.itemsize)  # elements per cache line
    longest = 0
    for b in range(B):
        for h in range(Hkv):
            longest = max(longest, hi[b, h] - lo[b, h])
    S = max(1, (longest + split - 1) // split)
    part_acc = np.zeros((B, Hkv, S, G, D), np.float32)
    part_max = np.full((B, Hkv, S, G), NO_SCORE, np.float32)
    part_sum = np.zeros((B, Hkv, S, G), np.float32)
    past_cache = np.zeros(B * Hkv * S, np.int64)
    touch_sink = np.zeros(B * Hkv * S, np.float64)  # what the touching loads sum to (kept: not optimised away)
    for task in prange(B * Hkv * S):
        b, h, s = task // (Hkv * S), (task // S) % Hkv, task % S
        p0 = lo[b, h] + s * split
        p1 = min(hi[b, h], p0 + split)
        rows_bits = np.empty((ROWS_PER_PASS, D), np.uint32)  # a pass's widened keys or values, in L1
        rows = rows_bits.view(np.float32)
        qg = q[b, h]  # [G, D]
        scores = np.empty((G, BLOCK_TOKENS), np.float32)
        tokens = np.empty(BLOCK_TOKENS, np.int64)
        exp_bits = np.empty(BLOCK_TOKENS, np.int32)
        acc, run_max, run_sum = part_acc[b, h, s], part_max[b, h, s], part_sum[b, h, s]
        for u0 in range(p0, p1, BLOCK_TOKENS):  # flash-attention's update, a block at a time
            n = 0
            for p in range(u0, min(p1, u0 + BLOCK_TOKENS)):
                t = ids[b, h, p] if listed else p
                if t >= limit:
                    past_cache[task] += 1
                elif t >= 0:
                    tokens[n] = t
                    n += 1
            if n == 0:
                continue
            if listed:  # scattered rows: touch every line of the block's rows first, independent
                # loads the core keeps many of in flight, so the passes below find them in cache
                touched = 0.0
                for i in range(n):
                    for d in range(0, D, line):
                        touched += k[b, h, tokens[i], d] + v[b, h, tokens[i], d]
                touch_sink[task] += touched
            for i in range(0, n, ROWS_PER_PASS):
                count = min(ROWS_PER_PASS, n - i)
                for j in range(count):
                    _widen_row(k, k_scale, b, h, tokens[i + j], rows[j], rows_bits[j])
                score_pass(qg, rows, count, scores, i, softmax_scale)
            softmax_block(scores, n, acc, run_max, run_sum, exp_bits)
            for i in range(0, n, ROWS_PER_PASS):
                count = min(ROWS_PER_PASS, n - i)
                for j in range(count):
                    _widen_row(v, v_scale, b, h, tokens[i + j], rows[j], rows_bits[j])
                accumulate_pass(acc, scores, i, rows, count)
    merge_splits(part_acc, part_max, part_sum, out, lse)
    return past_cache.sum()


def split_tokens(longest: int, tasks: int, threads: int) -> int:
    """Tokens per parallel task for ``tasks`` (row, KV head) pairs of up to ``longest`` tokens. The
    splits per pair are rounded up until every thread gets as many tasks: 3 KV heads on 2 threads
    made 9 tasks of 1,366 tokens at 4K, 444 us a layer read cold, where 12 of 1,024 take 403."""
    splits_wanted = max(1, -(-threads * TASKS_PER_THREAD // tasks))
    while (tasks * splits_wanted) % threads and splits_wanted < threads * TASKS_PER_THREAD:
        splits_wanted += 1
    return max(MIN_SPLIT_TOKENS, -(-longest // splits_wanted))


class _NumbaThreads(threading.local):
    """The count this thread last gave numba (numba's setting is per thread: a server's worker has
    its own), so that an unchanged count costs a compare: numba's getter takes ~6 us, and the int4
    products of a decode step alone ask ~150 times. 0 until asked (asking numba starts its pool)."""

    count = 0


_numba_threads = _NumbaThreads()


def set_threads(threads: int) -> None:
    """Run numba's parallel loops on as many threads as torch uses (at most numba's pool). Called
    before every parallel kernel; numba's setter costs 10 us, so only a change reaches it."""
    n = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))
    if n != _numba_threads.count:
        numba.set_num_threads(n)
        _numba_threads.count = n


def threads() -> int:
    """The threads numba's parallel loops run on now (as :func:`set_threads` set them)."""
    if not _numba_threads.count:
        _numba_threads.count = numba.get_num_threads()
    return _numba_threads.count


@njit(cache=True)
def store_tokens(k_new, v_new, k_cache, v_cache, rows, starts):  # pragma: no cover - numba
    """Copy the new keys and values k_new/v_new [B, Hkv, T, D] into a float cache k_cache/v_cache
    [R, Hkv, N, D] (both bf16 bits as uint16, or both fp32) at rows[b], positions
    starts[b]..starts[b]+T-1: the tensor form is two indexed assignments of ~8 us each per layer.
    Returns how many rows were skipped for lying outside the cache (the caller raises)."""
    B, Hkv, T, D = k_new.shape
    R, _, N, _ = k_cache.shape
    outside = 0
    for b in range(B):
        r = rows[b]
        if r < 0 or r >= R or starts[b] < 0 or starts[b] + T > N:
            outside += 1
            continue
        for h in range(Hkv):
            for t in range(T):
                p = starts[b] + t
                for d in range(D):
                    k_cache[r, h, p, d] = k_new[b, h, t, d]
                    v_cache[r, h, p, d] = v_new[b, h, t, d]
    return outside


KV_SCALE_FLOOR_F32 = np.float32(KV_SCALE_FLOOR)  # the floor as quantize_kv's fp32 clamp compares it
# fp32 -> bf16 rounds to nearest even: add this plus the kept half's lowest bit, keep the high half.
BF16_ROUND = np.uint32(0x7FFF)
F32_ABS_MASK = np.uint32(0x7FFFFFFF)
F32_INF_BITS = np.uint32(0x7F800000)
F32_QUIET_BIT = np.uint32(0x00400000)  # a NaN's bit that keeps it a NaN once the low half is dropped


@njit(inline="always")
def bf16_round_bits(u):  # pragma: no cover - numba (called from Python too: it compiles for a uint32)
    """An fp32's bits ``u`` (uint32) -> the bf16's 16 bits (in a uint32), to nearest even as torch
    narrows; a NaN stays a quiet NaN. A select in arithmetic, not a branch, so loops over it
    vectorize. The one rounding of every kernel that writes bf16 (row kernels, unpacked weights,
    KV scales)."""
    nan = np.uint32((u & F32_ABS_MASK) > F32_INF_BITS)
    rounded = u + BF16_ROUND + ((u >> np.uint32(16)) & np.uint32(1))
    quiet = u | F32_QUIET_BIT
    return (rounded + (quiet - rounded) * nan) >> np.uint32(16)  # wraps to ``quiet`` for a NaN


@njit(cache=True)
def store_int8_tokens(k_new, v_new, k_codes, v_codes, k_scales, v_scales, rows, starts):  # pragma: no cover
    """Quantize the new keys and values k_new/v_new [B, Hkv, T, D] (fp32, or bf16 bits as uint16)
    per token and KV head and store them at rows[b], positions starts[b]..starts[b]+T-1 of the
    cache: codes [R, Hkv, N, D] int8 and scales [R, Hkv, N] (fp32, or bf16 bits as uint16).
    scale = max|x| / 127 (at least 1e-8) rounded to the scales' dtype, code = x / scale rounded
    half to even within +-127: offload.tiers.kv_codec.quantize_kv's numbers, bit for bit, in one
    call instead of a dozen tensor ops and four slice copies. A token with a NaN gets a NaN scale
    (codes 0): attention then yields NaN and the engine's NaN check reports it, never garbage.
    Returns how many rows were skipped for lying outside the cache (the caller raises)."""
    B, Hkv, T, D = k_new.shape
    R, _, N, _ = k_codes.shape
    x = np.empty(D, np.float32)
    word = np.empty(1, np.uint32)
    as_float = word.view(np.float32)
    outside = 0
    for kind in range(2):
        new = k_new if kind == 0 else v_new
        codes = k_codes if kind == 0 else v_codes
        scales = k_scales if kind == 0 else v_scales
        for b in range(B):
            r = rows[b]
            if r < 0 or r >= R or starts[b] < 0 or starts[b] + T > N:
                outside += kind == 0
                continue
            for h in range(Hkv):
                for t in range(T):
                    p = starts[b] + t
                    biggest = np.float32(0.0)
                    bad = False
                    for d in range(D):
                        x[d] = _as_f32(new[b, h, t, d], word, as_float)
                        if x[d] != x[d]:
                            bad = True
                        biggest = max(biggest, abs(x[d]))
                    s = max(biggest / np.float32(KV_CODE_MAX), KV_SCALE_FLOOR_F32)
                    s = np.float32(np.nan) if bad else s
                    s = _store_scale(scales, r, h, p, s, word, as_float)  # the scale as held
                    for d in range(D):
                        c = np.float32(0.0) if bad else np.rint(x[d] / s)
                        codes[r, h, p, d] = np.int8(min(max(c, -KV_CODE_MAX), KV_CODE_MAX))
    return outside


def _as_f32(value, word, as_float):
    """One element of a new key or value as fp32 (plain-numpy form of :func:`_as_f32_forms`)."""
    if isinstance(value, np.uint16):
        word[0] = np.uint32(value) << 16
        return as_float[0]
    return np.float32(value)


@overload(_as_f32, inline="always")
def _as_f32_forms(value, word, as_float):  # pragma: no cover - numba
    """A bf16's bits (uint16) become an fp32's high half, exact; fp32 stays."""
    if value == types.uint16:
        def widen(value, word, as_float):
            word[0] = np.uint32(value) << 16
            return as_float[0]
    else:
        def widen(value, word, as_float):
            return np.float32(value)
    return widen


def _store_scale(scales, r, h, p, s, word, as_float):
    """Write scale s at scales[r, h, p] in the scales' dtype; return the value held, as fp32
    (plain-numpy form of :func:`_store_scale_forms`)."""
    if scales.dtype == np.uint16:
        bits = int(bf16_round_bits(np.asarray(s, np.float32).view(np.uint32)[()]))
        scales[r, h, p] = bits
        return np.asarray(bits << 16, np.uint32).view(np.float32)[()]
    scales[r, h, p] = s
    return np.float32(s)


@overload(_store_scale, inline="always")
def _store_scale_forms(scales, r, h, p, s, word, as_float):  # pragma: no cover - numba
    """uint16 scales hold bf16 bits: fp32 -> bf16 rounded to nearest even (a NaN stays a NaN:
    its high half keeps a set mantissa bit); fp32 scales hold s as it is."""
    if scales.dtype == types.uint16:
        def put(scales, r, h, p, s, word, as_float):
            as_float[0] = s
            bits = np.uint16(bf16_round_bits(word[0]))
            scales[r, h, p] = bits
            word[0] = np.uint32(bits) << 16
            return as_float[0]
    else:
        def put(scales, r, h, p, s, word, as_float):
            scales[r, h, p] = s
            return np.float32(s)
    return put
