"""FlashAttention-2 style forward and backward kernels in Triton.

Layouts follow the flash-attn package:

* dense: ``q`` is ``(batch, seqlen_q, heads, head_dim)``, ``k``/``v`` are ``(batch, seqlen_k, kv_heads, head_dim)``;
* varlen: ``q`` is ``(total_q, heads, head_dim)`` with ``cu_seqlens_q`` (int32, ``batch + 1`` prefix sums), and
  likewise ``k``/``v`` with ``cu_seqlens_k``.

Grouped-query attention is handled inside the kernels: query head ``h`` reads KV head ``h // (heads // kv_heads)``.
Causal masking is aligned to the bottom-right corner when ``seqlen_q != seqlen_k`` (query ``i`` sees key ``j`` when
``j <= i + seqlen_k - seqlen_q``). The log-sum-exp is returned in natural-log units, shaped ``(batch, heads, seqlen_q)``
(dense) or ``(heads, total_q)`` (varlen); rows that see no key give output 0 and LSE ``-inf``.

The kernel launchers here are plain functions on tensors; the autograd/custom-op layer lives in `ops.py`.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

# Tile sizes used under TRITON_INTERPRET=1 (big tiles keep the interpreter fast; tests may override them).
INTERPRET_CONFIG = dict(fwd=(32, 32), bwd_dkdv=(32, 32), bwd_dq=(32, 32))


def interpreting() -> bool:
    "True when Triton runs kernels on the CPU interpreter."
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Opt-in: forward K/V loads through in-kernel TMA tensor descriptors (Hopper and newer). Off by default until it is
# measured against the pointer path on a GPU; `PHI4_KERNELS_TMA=1` (or setting this flag) turns it on.
USE_TMA = os.environ.get("PHI4_KERNELS_TMA", "0") == "1"


def _tma_ok(q, k, v) -> bool:
    "Descriptor requirements: 16-byte aligned bases and row strides, head dim a multiple of 16 bytes."
    if not USE_TMA or not hasattr(tl, "make_tensor_descriptor") or not hasattr(triton, "set_allocator"):
        return False
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 9:
        return False
    if q.device.type != "cuda" and not interpreting():
        return False
    es = k.element_size()
    aligned = all(t.data_ptr() % 16 == 0 and (t.stride(-3) * es) % 16 == 0 and (t.stride(-2) * es) % 16 == 0
                  for t in (q, k, v))
    return aligned and (k.shape[-1] * es) % 16 == 0 and k.shape[-1] == triton.next_power_of_2(k.shape[-1])


def _set_tma_allocator(device):
    "Scratch memory for in-kernel descriptors."
    triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device=device))


def _autotune_enabled() -> bool:
    return (not interpreting()) and torch.cuda.is_available() and os.environ.get("PHI4_KERNELS_AUTOTUNE", "1") != "0"


# --------------------------------------------------------------------------------------------------------------------
# Shared device helpers (Triton inlines them into the kernels)
# --------------------------------------------------------------------------------------------------------------------

@triton.jit
def _load_rows(ptrs, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; out-of-range rows and padded head-dim columns read as zero."""
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_rows(ptrs, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, x, mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _store_tile(base, stride_t, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store the (rows, BLOCK_D) tile x, cast to the element type of `base`, at rows `rows` of a head's slab."""
    _store_rows(base + rows[:, None] * stride_t + offs_d[None, :], x.to(base.dtype.element_ty), rows, n_rows,
                offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _load_tiles(a_src, b_src, start, rows, n_rows, offs_d, stride_a, stride_b,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr, UPCAST: tl.constexpr,
                TMA: tl.constexpr):
    """Load rows `rows` (= start + arange) of two same-shaped (rows, BLOCK_D) tiles, e.g. K and V.

    With TMA, a_src/b_src are tensor descriptors bounded by the sequence (out-of-range rows read as zero); otherwise
    they are the pointers of the head's first row, loaded with `_load_rows` (CHECK_ROWS guards rows past n_rows).
    UPCAST converts both tiles to fp32."""
    if TMA:
        a = a_src.load([start, 0])
        b = b_src.load([start, 0])
    else:
        a = _load_rows(a_src + rows[:, None] * stride_a + offs_d[None, :], rows, n_rows, offs_d,
                       HEAD_DIM, BLOCK_D, CHECK_ROWS)
        b = _load_rows(b_src + rows[:, None] * stride_b + offs_d[None, :], rows, n_rows, offs_d,
                       HEAD_DIM, BLOCK_D, CHECK_ROWS)
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return a, b


@triton.jit
def _head_ptr(X, b64, start, h, stride_b, stride_t, stride_h):
    "Pointer to the first row of head h of the sequence that starts at token `start` of batch row b64."
    return X + b64 * stride_b + start * stride_t + h * stride_h


@triton.jit
def _tile_sources(a_base, b_base, n_rows, stride_at, stride_bt,
                  HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """What `_load_tiles` reads two heads of n_rows rows from: their base pointers as given, or with TMA (Hopper bulk
    copies) tensor descriptors whose bounds make the ragged tail read as zeros."""
    if TMA:
        a_src = tl.make_tensor_descriptor(a_base, shape=[n_rows, HEAD_DIM], strides=[stride_at, 1],
                                          block_shape=[BLOCK_ROWS, BLOCK_D])
        b_src = tl.make_tensor_descriptor(b_base, shape=[n_rows, HEAD_DIM], strides=[stride_bt, 1],
                                          block_shape=[BLOCK_ROWS, BLOCK_D])
    else:
        a_src = a_base
        b_src = b_base
    return a_src, b_src


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN: tl.constexpr):
    """(start_q, len_q, start_k, len_k) of sequence b; dense tensors start at 0 inside their batch row."""
    if VARLEN:
        q_start = tl.load(CU_Q + b).to(tl.int64)
        q_len = (tl.load(CU_Q + b + 1) - tl.load(CU_Q + b)).to(tl.int32)
        k_start = tl.load(CU_K + b).to(tl.int64)
        k_len = (tl.load(CU_K + b + 1) - tl.load(CU_K + b)).to(tl.int32)
    else:
        q_start = (b * 0).to(tl.int64)
        k_start = (b * 0).to(tl.int64)
        q_len = seqlen_q
        k_len = seqlen_k
    return q_start, q_len, k_start, k_len


@triton.jit
def _program(CU_Q, CU_K, seqlen_q, seqlen_k, n_heads, GROUP, VARLEN: tl.constexpr):
    """Decode the program ids: (tile index, sequence b, head h, KV head h // GROUP, then `_seq_bounds` of b); grid
    axis 1 is b * n_heads + h."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    hk = h // GROUP
    q_start, len_q, k_start, len_k = _seq_bounds(CU_Q, CU_K, b, seqlen_q, seqlen_k, VARLEN)
    return pid, b, h, hk, q_start, len_q, k_start, len_k


@triton.jit
def _tile_offsets(start, b, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """(b as int64, the tile's rows start + [0, BLOCK_R), the inner loop's offsets [0, BLOCK_C), the head dims)."""
    b64 = b.to(tl.int64)
    offs_r = start + tl.arange(0, BLOCK_R)
    offs_c0 = tl.arange(0, BLOCK_C)
    offs_d = tl.arange(0, BLOCK_D)
    return b64, offs_r, offs_c0, offs_d


@triton.jit
def _q_tile(pid_m, n_mblocks, b, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
            CAUSAL: tl.constexpr):
    """First row of this program's query tile (tiles in reverse order under a causal mask, longest rows first),
    then `_tile_offsets` for it."""
    if CAUSAL:
        m_block = n_mblocks - 1 - pid_m
    else:
        m_block = pid_m
    start_m = m_block * BLOCK_M
    b64, offs_m, offs_n0, offs_d = _tile_offsets(start_m, b, BLOCK_M, BLOCK_N, BLOCK_D)
    return start_m, b64, offs_m, offs_n0, offs_d


@triton.jit
def _key_range(start_m, len_q, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """(diag, full, hi) for the query tile at start_m: key blocks [0, full) are visible to every row in full (no
    mask), [full, hi) need the mask; diag = len_k - len_q aligns the causal mask to the bottom-right corner."""
    diag = len_k - len_q
    if CAUSAL:
        hi = tl.minimum(tl.maximum(start_m + BLOCK_M + diag, 0), len_k)
        full = tl.maximum(start_m + diag + 1, 0) // BLOCK_N * BLOCK_N  # blocks every row sees entirely
        full = tl.minimum(full, len_k // BLOCK_N * BLOCK_N)
    else:
        hi = len_k
        full = len_k // BLOCK_N * BLOCK_N
    return diag, full, hi


@triton.jit
def _visible(q_idx, k_idx, len_q, len_k, diag, CHECK_Q: tl.constexpr, CAUSAL: tl.constexpr):
    """Which (query, key) pairs are attended, for broadcastable index blocks q_idx, k_idx: keys inside the sequence
    (and, with CHECK_Q, queries too; len_q is read only then) and, with CAUSAL, keys at or left of the
    bottom-right-aligned diagonal."""
    if CHECK_Q:
        keep = (q_idx < len_q) & (k_idx < len_k)
    else:
        keep = k_idx < len_k
    if CAUSAL:
        keep = keep & (k_idx <= q_idx + diag)
    return keep


@triton.jit
def _row_stats(l_ptrs, d_ptrs, rows, n_rows, ACC: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """The saved LSE in log2 units (+inf for rows that saw no key, so their probabilities are 0) and delta."""
    if CHECK_ROWS:
        lse2 = tl.load(l_ptrs, mask=rows < n_rows, other=float("inf")).to(ACC) * 1.4426950408889634
        delta = tl.load(d_ptrs, mask=rows < n_rows, other=0.0).to(ACC)
    else:
        lse2 = tl.load(l_ptrs).to(ACC) * 1.4426950408889634
        delta = tl.load(d_ptrs).to(ACC)
    lse2 = tl.where(lse2 == float("-inf"), float("inf"), lse2)  # rows that saw nothing: p = 0
    return lse2, delta


# --------------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------------

@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m, offs_n0, offs_d,
               lo, hi, len_k, diag, qk_scale,
               MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
               TMA: tl.constexpr):
    """Online-softmax sweep over key blocks [lo, hi). MASK=False is the fast path for fully visible blocks.
    With TMA, k_base/v_base are tensor descriptors bounded by the sequence (out-of-range rows read as zero)."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k, v = _load_tiles(k_base, v_base, start_n, offs_n, len_k, offs_d, stride_kt, stride_vt,
                           HEAD_DIM, BLOCK_D, MASK, UPCAST, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale  # log2 units
        if MASK:
            s = tl.where(_visible(offs_m[:, None], offs_n[None, :], 0, len_k, diag, False, CAUSAL), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PREC, out_dtype=ACC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K,
                stride_qb, stride_qt, stride_qh,
                stride_kb, stride_kt, stride_kh,
                stride_vb, stride_vt, stride_vh,
                stride_ob, stride_ot, stride_oh,
                stride_lb, stride_lh,
                seqlen_q, seqlen_k, n_heads, qk_scale, SEQ_BUCKET,
                GROUP, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, VARLEN: tl.constexpr,
                UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr = False):
    pid_m, b, h, hk, q_start, len_q, k_start, len_k = _program(CU_Q, CU_K, seqlen_q, seqlen_k, n_heads, GROUP, VARLEN)
    n_mblocks = tl.cdiv(len_q, BLOCK_M)
    if pid_m >= n_mblocks:
        return
    start_m, b64, offs_m, offs_n0, offs_d = _q_tile(pid_m, n_mblocks, b, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL)
    q_base = _head_ptr(Q, b64, q_start, h, stride_qb, stride_qt, stride_qh)
    k_base = _head_ptr(K, b64, k_start, hk, stride_kb, stride_kt, stride_kh)
    v_base = _head_ptr(V, b64, k_start, hk, stride_vb, stride_vt, stride_vh)
    o_base = _head_ptr(O, b64, q_start, h, stride_ob, stride_ot, stride_oh)
    l_base = LSE + b64 * stride_lb + h * stride_lh + q_start
    q = _load_rows(q_base + offs_m[:, None] * stride_qt + offs_d[None, :], offs_m, len_q, offs_d,
                   HEAD_DIM, BLOCK_D, True)
    if UPCAST:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)

    diag, full, hi = _key_range(start_m, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL)
    k_src, v_src = _tile_sources(k_base, v_base, len_k, stride_kt, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, offs_m, offs_n0, offs_d,
                               0, full, len_k, diag, qk_scale,
                               False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, ACC, PREC, TMA)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, offs_m, offs_n0, offs_d,
                               full, hi, len_k, diag, qk_scale,
                               True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, ACC, PREC, TMA)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(l_base + offs_m, lse, mask=offs_m < len_q)
    _store_tile(o_base, stride_ot, acc, offs_m, len_q, offs_d, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------------------------------------------------
# Backward: delta = rowsum(dO * O), then dK/dV (one program per KV block and KV head) and dQ (one per Q block).
# --------------------------------------------------------------------------------------------------------------------

@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, CU_Q,
                      stride_ob, stride_ot, stride_oh,
                      stride_db, stride_dt, stride_dh,
                      stride_lb, stride_lh,
                      seqlen_q, n_heads,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                      VARLEN: tl.constexpr, ACC: tl.constexpr):
    pid_m, b, h, _unused, q_start, len_q, _ks, _kl = _program(CU_Q, CU_Q, seqlen_q, seqlen_q, n_heads, 1, VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    b64, offs_m, _offs, offs_d = _tile_offsets(start_m, b, BLOCK_M, BLOCK_M, BLOCK_D)
    o, do = _load_tiles(_head_ptr(O, b64, q_start, h, stride_ob, stride_ot, stride_oh),
                        _head_ptr(DO, b64, q_start, h, stride_db, stride_dt, stride_dh), start_m, offs_m, len_q,
                        offs_d, stride_ot, stride_dt, HEAD_DIM, BLOCK_D, True, False, False)
    delta = tl.sum(o.to(ACC) * do.to(ACC), 1)
    tl.store(DELTA + b64 * stride_lb + h * stride_lh + q_start + offs_m, delta, mask=offs_m < len_q)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, l_base, d_base, stride_qt, stride_dot,
                    offs_n, offs_m0, offs_d, lo, hi, len_q, len_k, diag, qk_scale,
                    MASK: tl.constexpr, CHECK_ROWS: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                    PREC: tl.constexpr, TMA: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi) of one query head (transposed scores).
    MASK applies the causal/key-range mask; CHECK_ROWS guards loads of query rows past the sequence end.
    With TMA, q_base/do_base are tensor descriptors bounded by the sequence."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        q, do = _load_tiles(q_base, do_base, start_m, offs_m, len_q, offs_d, stride_qt, stride_dot,
                            HEAD_DIM, BLOCK_D, CHECK_ROWS, UPCAST, TMA)
        lse2, delta = _row_stats(l_base + offs_m, d_base + offs_m, offs_m, len_q, ACC, CHECK_ROWS)
        st = tl.dot(k, tl.trans(q), input_precision=PREC, out_dtype=ACC) * qk_scale  # (BLOCK_N, BLOCK_M)
        pt = tl.math.exp2(st - lse2[None, :])
        if MASK:
            pt = tl.where(_visible(offs_m[None, :], offs_n[:, None], len_q, len_k, diag, True, CAUSAL), pt, 0.0)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=PREC, out_dtype=ACC)
        dpt = tl.dot(v, tl.trans(do), input_precision=PREC, out_dtype=ACC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PREC, out_dtype=ACC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
                     stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                     stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                     stride_dkb, stride_dkt, stride_dkh, stride_dvb, stride_dvt, stride_dvh, stride_lb, stride_lh,
                     seqlen_q, seqlen_k, n_kv_heads, qk_scale, sm_scale, SEQ_BUCKET, GROUP,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                     PREC: tl.constexpr, TMA: tl.constexpr = False):
    pid_n, b, hk, _unused, q_start, len_q, k_start, len_k = _program(CU_Q, CU_K, seqlen_q, seqlen_k, n_kv_heads, 1,
                                                                      VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= len_k:
        return
    b64, offs_n, offs_m0, offs_d = _tile_offsets(start_n, b, BLOCK_N, BLOCK_M, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    k, v = _load_tiles(_head_ptr(K, b64, k_start, hk, stride_kb, stride_kt, stride_kh),
                       _head_ptr(V, b64, k_start, hk, stride_vb, stride_vt, stride_vh), start_n, offs_n, len_k,
                       offs_d, stride_kt, stride_vt, HEAD_DIM, BLOCK_D, True, UPCAST, False)

    diag = len_k - len_q
    m_end = tl.cdiv(len_q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # first query row that sees any key of this block, and first row that sees all of them
        lo = tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M
        full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        lo = tl.minimum(lo, m_end)
        full = tl.minimum(tl.maximum(full, lo), m_end)
    else:
        lo = 0
        full = 0
    for g in range(GROUP):  # the query heads sharing this KV head, summed here: no atomics
        h = hk * GROUP + g
        q_base = _head_ptr(Q, b64, q_start, h, stride_qb, stride_qt, stride_qh)
        do_base = _head_ptr(DO, b64, q_start, h, stride_dob, stride_dot, stride_doh)
        l_base = LSE + b64 * stride_lb + h * stride_lh + q_start
        d_base = DELTA + b64 * stride_lb + h * stride_lh + q_start
        q_src, do_src = _tile_sources(q_base, do_base, len_q, stride_qt, stride_dot, HEAD_DIM, BLOCK_M, BLOCK_D, TMA)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, l_base, d_base, stride_qt, stride_dot,
                                 offs_n, offs_m0, offs_d, lo, full, len_q, len_k, diag, qk_scale,
                                 True, True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, ACC, PREC, TMA)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_src, do_src, l_base, d_base, stride_qt, stride_dot,
                                 offs_n, offs_m0, offs_d, full, m_end, len_q, len_k, diag, qk_scale,
                                 False, True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_M, UPCAST, ACC, PREC, TMA)
    dk = dk * sm_scale
    _store_tile(_head_ptr(DK, b64, k_start, hk, stride_dkb, stride_dkt, stride_dkh), stride_dkt, dk, offs_n, len_k,
                offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(_head_ptr(DV, b64, k_start, hk, stride_dvb, stride_dvt, stride_dvh), stride_dvt, dv, offs_n, len_k,
                offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kt, stride_vt,
                  offs_m, offs_n0, offs_d, lo, hi, len_k, diag, qk_scale,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                  TMA: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        k, v = _load_tiles(k_base, v_base, start_n, offs_n, len_k, offs_d, stride_kt, stride_vt,
                           HEAD_DIM, BLOCK_D, MASK, UPCAST, TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PREC, out_dtype=ACC) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        if MASK:
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], 0, len_k, diag, False, CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC, out_dtype=ACC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC, out_dtype=ACC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
                   stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                   stride_vb, stride_vt, stride_vh, stride_dob, stride_dot, stride_doh,
                   stride_dqb, stride_dqt, stride_dqh, stride_lb, stride_lh,
                   seqlen_q, seqlen_k, n_heads, qk_scale, sm_scale, SEQ_BUCKET, GROUP,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   CAUSAL: tl.constexpr, VARLEN: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr,
                   PREC: tl.constexpr, TMA: tl.constexpr = False):
    pid_m, b, h, hk, q_start, len_q, k_start, len_k = _program(CU_Q, CU_K, seqlen_q, seqlen_k, n_heads, GROUP, VARLEN)
    n_mblocks = tl.cdiv(len_q, BLOCK_M)
    if pid_m >= n_mblocks:
        return
    start_m, b64, offs_m, offs_n0, offs_d = _q_tile(pid_m, n_mblocks, b, BLOCK_M, BLOCK_N, BLOCK_D, CAUSAL)
    q, do = _load_tiles(_head_ptr(Q, b64, q_start, h, stride_qb, stride_qt, stride_qh),
                        _head_ptr(DO, b64, q_start, h, stride_dob, stride_dot, stride_doh), start_m, offs_m, len_q,
                        offs_d, stride_qt, stride_dot, HEAD_DIM, BLOCK_D, True, UPCAST, False)
    l_ptrs = b64 * stride_lb + h * stride_lh + q_start + offs_m
    lse2, delta = _row_stats(LSE + l_ptrs, DELTA + l_ptrs, offs_m, len_q, ACC, True)
    k_base = _head_ptr(K, b64, k_start, hk, stride_kb, stride_kt, stride_kh)
    v_base = _head_ptr(V, b64, k_start, hk, stride_vb, stride_vt, stride_vh)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)

    diag, full, hi = _key_range(start_m, len_q, len_k, BLOCK_M, BLOCK_N, CAUSAL)
    k_src, v_src = _tile_sources(k_base, v_base, len_k, stride_kt, stride_vt, HEAD_DIM, BLOCK_N, BLOCK_D, TMA)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt,
                       offs_m, offs_n0, offs_d, 0, full, len_k, diag, qk_scale,
                       False, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, ACC, PREC, TMA)
    dq = _bwd_dq_inner(dq, q, do, lse2, delta, k_src, v_src, stride_kt, stride_vt,
                       offs_m, offs_n0, offs_d, full, hi, len_k, diag, qk_scale,
                       True, CAUSAL, HEAD_DIM, BLOCK_D, BLOCK_N, UPCAST, ACC, PREC, TMA)
    dq = dq * sm_scale
    _store_tile(_head_ptr(DQ, b64, q_start, h, stride_dqb, stride_dqt, stride_dqh), stride_dqt, dq, offs_m, len_q,
                offs_d, HEAD_DIM, BLOCK_D)


# --------------------------------------------------------------------------------------------------------------------
# Configurations: one fixed tile per head dim by default (and always under the interpreter); a short autotune list
# per head dim on CUDA devices. The lists were chosen by compiling every candidate for sm_90 (Hopper) and keeping
# those that pipeline their loads (cp.async) and fit in 255 registers without spilling, or spill least:
# (BLOCK_M, BLOCK_N, num_warps, num_stages).
# --------------------------------------------------------------------------------------------------------------------

_SPACE = {
    "fwd": {64: [(128, 64, 4, 3), (128, 64, 4, 2), (128, 64, 4, 4), (128, 64, 8, 3), (128, 128, 8, 2),
                 (128, 128, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
            128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 3),
                  (64, 64, 4, 2), (128, 32, 4, 3)],
            256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)]},
    "bwd_dkdv": {64: [(64, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 4, 3), (32, 64, 4, 2)],
                 128: [(32, 128, 8, 2), (32, 128, 8, 3), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2)],
                 256: [(32, 64, 4, 2), (32, 64, 8, 2)]},
    "bwd_dq": {64: [(128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3), (128, 128, 8, 2)],
               128: [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 8, 2),
                     (64, 32, 4, 2)],
               256: [(64, 32, 4, 2), (64, 64, 8, 2)]},
}


def _dim_class(block_d: int) -> int:
    return 64 if block_d <= 64 else (128 if block_d <= 128 else 256)


def _default_config(kind: str, block_d: int):
    "(BLOCK_M, BLOCK_N, num_warps, num_stages) used when not autotuning: the first entry of the head dim's list."
    if kind not in _SPACE:
        raise ValueError(f"unknown kernel kind {kind!r}")
    return _SPACE[kind][_dim_class(block_d)][0]


def _tune_space(kind: str):
    "Union of the per-head-dim lists (the autotuner prunes to the current head dim's list)."
    out = []
    for lst in _SPACE[kind].values():
        out += [c for c in lst if c not in out]
    return out


def _prune(kind):
    def prune(configs, named_args, **kwargs):
        bd = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
        allowed = set(_SPACE[kind][_dim_class(bd)])
        out = [c for c in configs
               if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        return out or configs[:1]
    return prune


_KEYS = ["HEAD_DIM", "CAUSAL", "GROUP", "VARLEN", "SEQ_BUCKET", "TMA"]  # (+ dtypes; keys a kernel lacks are skipped)
_TUNED = {}


def _kernel(kind: str):
    "The raw jit kernel, or (on a CUDA device with autotuning on) its autotuned wrapper."
    raw = dict(fwd=_fwd_kernel, bwd_dkdv=_bwd_dkdv_kernel, bwd_dq=_bwd_dq_kernel)[kind]
    if not _autotune_enabled():
        return raw, False
    if kind not in _TUNED:
        configs = [triton.Config(dict(BLOCK_M=m, BLOCK_N=n), num_warps=w, num_stages=s)
                   for m, n, w, s in _tune_space(kind)]
        _TUNED[kind] = triton.autotune(configs, key=_KEYS, prune_configs_by=dict(early_config_prune=_prune(kind)),
                                       cache_results=True)(raw) if _supports_cache_results() else \
            triton.autotune(configs, key=_KEYS, prune_configs_by=dict(early_config_prune=_prune(kind)))(raw)
    return _TUNED[kind], True


def _supports_cache_results() -> bool:
    import inspect
    return "cache_results" in inspect.signature(triton.autotune).parameters


def _launch(kind, grid_rows, grid_cols, args, meta, block_d):
    kern, tuned = _kernel(kind)
    if tuned:
        grid = lambda META: (triton.cdiv(grid_rows, META["BLOCK_M" if kind != "bwd_dkdv" else "BLOCK_N"]), grid_cols)
        kern[grid](*args, **meta)
        return
    if interpreting():
        bm, bn = INTERPRET_CONFIG[kind]
        warps, stages = 4, 1
    else:
        bm, bn, warps, stages = _default_config(kind, block_d)
    rows_block = bn if kind == "bwd_dkdv" else bm
    grid = (triton.cdiv(grid_rows, rows_block), grid_cols)
    kern[grid](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, **meta)


# --------------------------------------------------------------------------------------------------------------------
# Host-side launchers
# --------------------------------------------------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check(q, k, v, varlen: bool):
    nd = 3 if varlen else 4
    what = "(total_tokens, heads, head_dim)" if varlen else "(batch, seqlen, heads, head_dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != nd:
            raise ValueError(f"{name} must have layout {what}, got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; use float16, bfloat16, float32 or float64")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k head dims differ: {q.shape[-1]} vs {k.shape[-1]}")
    if not varlen and q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k batch sizes differ: {q.shape[0]} vs {k.shape[0]}")
    h, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or h % hk:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({hk})")
    d = q.shape[-1]
    if d < 1 or d > 256:
        raise ValueError(f"head_dim must be in 1..256, got {d}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on the same device")
    if q.device.type != "cuda" and not interpreting():
        raise ValueError("phi4_kernels needs CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
                         "for CPU testing)")


def _last_contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _common_meta(q, k, causal, varlen):
    d = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(d))
    interp = interpreting()
    acc = tl.float64 if q.dtype == torch.float64 else tl.float32
    upcast = interp and q.dtype == torch.bfloat16  # the interpreter's bf16 arithmetic is wrong: compute in fp32
    prec = "ieee" if (upcast or q.dtype in (torch.float32, torch.float64)) else "tf32"
    return dict(GROUP=q.shape[-2] // k.shape[-2], HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=bool(causal),
                VARLEN=bool(varlen), UPCAST=bool(upcast), ACC=acc, PREC=prec)


def _strides3(t, varlen):
    "(batch, token, head) strides; batch stride is 0 for packed tensors."
    if varlen:
        return (0, t.stride(0), t.stride(1))
    return (t.stride(0), t.stride(1), t.stride(2))


def _bucket(n: int) -> int:
    return min(triton.next_power_of_2(max(int(n), 1)), 1 << 16)


class _DeviceGuard:
    def __init__(self, t):
        self.ctx = torch.cuda.device(t.device) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None: self.ctx.__enter__()

    def __exit__(self, *a):
        if self.ctx is not None: self.ctx.__exit__(*a)


def attn_fwd(q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    """Run the forward kernel. Returns (out, lse): lse in natural-log units, float32 (float64 for float64 inputs)."""
    varlen = cu_q is not None
    _check(q, k, v, varlen)
    q, k, v = _last_contig(q), _last_contig(k), _last_contig(v)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if varlen:
        batch = cu_q.numel() - 1
        h = q.shape[1]
        lse = torch.empty((h, q.shape[0]), device=q.device, dtype=lse_dtype)
        lstr = (0, lse.stride(0))
        seqlen_q, seqlen_k = max_q, max_k
    else:
        batch, seqlen_q, h, _ = q.shape
        seqlen_k = k.shape[1]
        lse = torch.empty((batch, h, seqlen_q), device=q.device, dtype=lse_dtype)
        lstr = (lse.stride(0), lse.stride(1))
    if q.numel() == 0 or batch == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    meta = _common_meta(q, k, causal, varlen)
    if _tma_ok(q, k, v):
        meta["TMA"] = True
        _set_tma_allocator(q.device)
    dummy = cu_q if varlen else q
    args = (q, k, v, out, lse, cu_q if varlen else dummy, cu_k if varlen else dummy,
            *_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(out, varlen), *lstr,
            seqlen_q, seqlen_k, h, scale * LOG2E, _bucket(seqlen_q))
    with _DeviceGuard(q):
        _launch("fwd", seqlen_q, batch * h, args, meta, meta["BLOCK_D"])
    return out, lse


def attn_bwd(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool, scale: float):
    "Run the backward kernels; returns (dq, dk, dv). Deterministic (no atomics)."
    varlen = cu_q is not None
    q, k, v, out, dout = (_last_contig(t) for t in (q, k, v, out, dout))
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    h, hk = q.shape[-2], k.shape[-2]
    if varlen:
        batch = cu_q.numel() - 1
        seqlen_q, seqlen_k = max_q, max_k
        lstr = (0, lse.stride(0))
    else:
        batch, seqlen_q = q.shape[0], q.shape[1]
        seqlen_k = k.shape[1]
        lstr = (lse.stride(0), lse.stride(1))
    if q.numel() == 0 or k.numel() == 0 or batch == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    meta = _common_meta(q, k, causal, varlen)
    bwd_meta = dict(meta)
    if _tma_ok(q, k, v) and _tma_ok(dout, dout, dout):
        bwd_meta["TMA"] = True
        _set_tma_allocator(q.device)
    delta = torch.empty_like(lse)
    dummy = cu_q if varlen else q
    cq, ck = (cu_q, cu_k) if varlen else (dummy, dummy)
    with _DeviceGuard(q):
        bm = 32 if interpreting() else 64
        _bwd_delta_kernel[(triton.cdiv(seqlen_q, bm), batch * h)](
            out, dout, delta, cq, *_strides3(out, varlen), *_strides3(dout, varlen), *lstr, seqlen_q, h,
            HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], BLOCK_M=bm, VARLEN=meta["VARLEN"], ACC=meta["ACC"])
        common = (*_strides3(q, varlen), *_strides3(k, varlen), *_strides3(v, varlen), *_strides3(dout, varlen))
        _launch("bwd_dkdv", seqlen_k, batch * hk,
                (q, k, v, dout, lse, delta, dk, dv, cq, ck, *common, *_strides3(dk, varlen), *_strides3(dv, varlen),
                 *lstr, seqlen_q, seqlen_k, hk, scale * LOG2E, scale, _bucket(seqlen_k)), bwd_meta, meta["BLOCK_D"])
        _launch("bwd_dq", seqlen_q, batch * h,
                (q, k, v, dout, lse, delta, dq, cq, ck, *common, *_strides3(dq, varlen), *lstr,
                 seqlen_q, seqlen_k, h, scale * LOG2E, scale, _bucket(seqlen_q)), bwd_meta, meta["BLOCK_D"])
    return dq, dk, dv
