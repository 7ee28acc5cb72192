"""Differentiable per-token log-prob and entropy: token_logprobs, token_logprobs_linear (kernels.md).

Both return (logp [N], entropy [N]) in float32 from logits divided by the temperature, with
  d logp_y / d z_v = (1[v=y] - p_v) / T,    d H / d z_v = -p_v (log p_v + H) / T.
The forward passes keep only fp32 per-row statistics (running max m, log of the rescaled
sum-exp, entropy) and the backward passes rebuild the softmax from them blockwise. Entropy is
accumulated as t = sum e^(a-m) (a-m) so that H = log s - t / s never subtracts two huge
numbers (|z| > 1e4 stays exact). Rows whose label is -100 output 0 and get zero gradient.

token_logprobs_linear takes hidden states and the lm_head weight and never materializes the
[N, V] logits: the Triton forward runs tl.dot tiles with an online log-sum-exp; the backward
recomputes tiles one vocabulary chunk at a time into a bounded [N, chunk] scratch of d logits
and reduces it with two fixed-order kernels (d hidden over row blocks, d weight over vocab
blocks, fp32 accumulation, no atomics), so results are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    IGNORE_INDEX,
    INTERPRET,
    check_float,
    check_labels,
    check_same,
    check_temperature,
    resolve_impl,
)

# Rows x vocab elements of one fp32 temporary in the torch impls (32 MB); the few alive at once
# (updated in place where possible) stay well under 256 MB whatever N and V are.
CHUNK_ELEMS = 1 << 23
# Bytes of the d-logits scratch of the Triton linear backward ([N, chunk] in the input dtype).
SCRATCH_BYTES = 1 << 28
BLOCK_V = 4096  # token_logprobs: vocab block of one row program
# token_logprobs_linear tiles (rows, vocab, hidden), the row and hidden ones shrunk to small
# inputs (16 at least, for tl.dot): tensor-core sized on a GPU; wide vocab tiles under the
# interpreter, whose cost is per operation (and its dot does not use BLAS).
LIN_BLOCKS_GPU = (64, 128, 64)
# fp32 (a testing dtype) multiplies with IEEE dots, i.e. FMA loops that hold their operand tiles
# in registers: (64, 128, 64) spills up to 1.4 KB on sm_80; these fit sm_80 and sm_90a (<= 150 regs).
LIN_BLOCKS_GPU_FP32 = (64, 64, 32)
LIN_BLOCKS_INTERPRET = (64, 2048, 64)
LIN_WARPS, LIN_STAGES = 8, 3
IGNORE = tl.constexpr(IGNORE_INDEX)  # jit code reads only constexpr globals


# ----------------------------------------------------------------------------- Triton kernels


@triton.jit
def _online_update(m, s, t, b_z, T):
    """Fold a block of raw fp32 logits b_z [BN, BV] into the per-row running statistics, each [BN]:
    m = max z, s = sum e^a, t = sum e^a a with a = (z - m) / T. Differences are taken before
    dividing by T, so |z| > 1e4 loses nothing to rounding z / T. -inf entries (padded vocab)
    contribute nothing."""
    m_new = tl.maximum(m, tl.max(b_z, axis=-1))
    # guarded so that no -inf - -inf or 0 * -inf is ever formed (s = t = 0 while m = -inf)
    shift = tl.where(m == float("-inf"), 0.0, (m - tl.where(m_new == float("-inf"), 0.0, m_new)) / T)
    scale = tl.exp(shift)
    live = b_z != float("-inf")
    b_d = tl.where(live, (b_z - m_new[:, None]) / T, 0.0)
    b_e = tl.where(live, tl.exp(b_d), 0.0)
    b_ed = b_e * b_d
    t = scale * (t + shift * s) + tl.sum(b_ed, axis=-1)
    s = scale * s + tl.sum(b_e, axis=-1)
    return m_new, s, t


@triton.jit
def _cast(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The interpreter's fp32 -> bf16 cast truncates, so
    there (FIX_BF16 = INTERPRET) the rounding is done on the bits."""
    y = x.to(dtype)
    if FIX_BF16:
        if dtype == tl.bfloat16:
            b = x.to(tl.uint32, bitcast=True)
            b = b + 0x7FFF + ((b >> 16) & 1)
            y = (b >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y


@triton.jit
def _logprobs_fwd_kernel(
    z_ptr, y_ptr, logp_ptr, ent_ptr, m_ptr, logs_ptr, stride_z, V, T, BLOCK: tl.constexpr
):
    i_n = tl.program_id(0).to(tl.int64)  # rows on grid axis 0: no 65,535 limit
    p_z = z_ptr + i_n * stride_z  # int64: N * V may pass 2^31
    y = tl.load(y_ptr + i_n).to(tl.int64)
    ignore = y == IGNORE
    # one row as a [1, BLOCK] tile so that it shares _online_update with the linear kernel
    m = tl.full([1], float("-inf"), tl.float32)
    s = tl.zeros([1], tl.float32)
    t = tl.zeros([1], tl.float32)
    for v0 in range(0, tl.where(ignore, 0, V), BLOCK):  # an ignored row reads no logits
        o_v = v0 + tl.arange(0, BLOCK)
        b_z = tl.load(p_z + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32)
        m, s, t = _online_update(m, s, t, b_z[None, :], T)
    s = tl.where(ignore, 1.0, s)  # an ignored row: s = 0 (no logits); logs = 0, no 0 / 0
    logs = tl.log(s)
    z_y = tl.load(p_z + tl.where(ignore, 0, y), mask=~ignore, other=0.0).to(tl.float32)
    logp = (z_y - m) / T - logs  # z_y <= m and s >= 1: never positive
    ent = logs - t / s  # = -sum p log p, t <= 0
    o_1 = i_n + tl.arange(0, 1)
    tl.store(logp_ptr + o_1, tl.where(ignore, 0.0, logp))
    tl.store(ent_ptr + o_1, tl.where(ignore, 0.0, ent))
    tl.store(m_ptr + o_1, tl.where(ignore, 0.0, m))  # -inf on an ignored row
    tl.store(logs_ptr + o_1, logs)


@triton.jit
def _logprobs_bwd_kernel(
    z_ptr,
    dz_ptr,
    y_ptr,
    dlogp_ptr,
    dent_ptr,
    ent_ptr,
    m_ptr,
    logs_ptr,
    stride_z,
    stride_dz,
    V,
    T,
    BLOCK: tl.constexpr,
    FIX_BF16: tl.constexpr,
):
    i_n = tl.program_id(0).to(tl.int64)
    p_z = z_ptr + i_n * stride_z
    p_dz = dz_ptr + i_n * stride_dz  # may equal p_z (in place): each block is read before written
    y = tl.load(y_ptr + i_n).to(tl.int64)
    keep = y != IGNORE
    g_lp = tl.where(keep, tl.load(dlogp_ptr + i_n), 0.0)
    g_h = tl.where(keep, tl.load(dent_ptr + i_n), 0.0)
    ent = tl.load(ent_ptr + i_n)
    m = tl.load(m_ptr + i_n)
    logs = tl.load(logs_ptr + i_n)
    for v0 in range(0, V, BLOCK):
        o_v = v0 + tl.arange(0, BLOCK)
        m_v = o_v < V
        # an ignored row reads no logits (all -inf: p = 0) and gets zeros
        b_z = tl.load(p_z + o_v, mask=m_v & keep, other=float("-inf")).to(tl.float32)
        live = b_z != float("-inf")  # padded vocab: p = 0, no gradient, no 0 * -inf
        b_lp = tl.where(live, (b_z - m) / T - logs, 0.0)
        b_p = tl.where(live, tl.exp(b_lp), 0.0)
        b_g = -b_p * (g_lp + g_h * (b_lp + ent))
        b_g = tl.where(o_v == y, b_g + g_lp, b_g)  # target class in fp32, rounded once below
        tl.store(p_dz + o_v, _cast(b_g / T, dz_ptr.dtype.element_ty, FIX_BF16), mask=m_v)


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (= INTERPRET): the interpreter multiplies raw
    bf16 bits, so operands go to fp32 there. IEEE for fp32 inputs: no silent TF32 on a GPU."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    o_n,
    m_n,
    o_v,
    m_v,
    H,
    stride_h,
    stride_w,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """fp32 logits tile hidden[o_n] @ weight[o_v].T, [BN, BV], summed over H in a fixed order
    (the backward recomputes bitwise the forward's tile)."""
    acc = tl.zeros([BN, BV], dtype=tl.float32)
    for k0 in range(0, H, BH):
        o_k = k0 + tl.arange(0, BH)
        m_k = o_k < H
        b_h = tl.load(
            h_ptr + o_n[:, None] * stride_h + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0
        )
        b_w = tl.load(
            w_ptr + o_v[:, None] * stride_w + o_k[None, :], mask=m_v[:, None] & m_k[None, :], other=0.0
        )
        acc = _dot(b_h, tl.trans(b_w), acc, UPCAST, IEEE)
    return acc


@triton.jit
def _linear_fwd_kernel(
    h_ptr,
    w_ptr,
    y_ptr,
    logp_ptr,
    ent_ptr,
    m_ptr,
    logs_ptr,
    N,
    V,
    H,
    stride_h,
    stride_w,
    T,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    i_n = tl.program_id(0)  # row blocks on grid axis 0
    o_n = i_n.to(tl.int64) * BN + tl.arange(0, BN)
    m_n = o_n < N
    y = tl.load(y_ptr + o_n, mask=m_n, other=IGNORE).to(tl.int64)
    m = tl.full([BN], float("-inf"), tl.float32)
    s = tl.zeros([BN], tl.float32)
    t = tl.zeros([BN], tl.float32)
    z_y = tl.zeros([BN], tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV).to(tl.int64)
        m_v = o_v < V
        b_z = _logits_tile(h_ptr, w_ptr, o_n, m_n, o_v, m_v, H, stride_h, stride_w, BN, BV, BH, UPCAST, IEEE)
        b_z = tl.where(m_v[None, :], b_z, float("-inf"))
        m, s, t = _online_update(m, s, t, b_z, T)
        z_y += tl.sum(tl.where(o_v[None, :] == y[:, None], b_z, 0.0), axis=1)  # exactly one tile hits
    logs = tl.log(s)
    keep = y != IGNORE
    tl.store(logp_ptr + o_n, tl.where(keep, (z_y - m) / T - logs, 0.0), mask=m_n)
    tl.store(ent_ptr + o_n, tl.where(keep, logs - t / s, 0.0), mask=m_n)
    tl.store(m_ptr + o_n, m, mask=m_n)
    tl.store(logs_ptr + o_n, logs, mask=m_n)


@triton.jit
def _linear_dz_kernel(
    h_ptr,
    w_ptr,
    dz_ptr,
    y_ptr,
    dlogp_ptr,
    dent_ptr,
    ent_ptr,
    m_ptr,
    logs_ptr,
    N,
    V,
    H,
    c0,
    c1,
    stride_h,
    stride_w,
    stride_dz,
    T,
    BN: tl.constexpr,
    BV: tl.constexpr,
    BH: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    FIX_BF16: tl.constexpr,
):
    """d logits of vocabulary columns [c0, c1) into the scratch dz [N, c1 - c0] (input dtype)."""
    o_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    o_v = c0 + tl.program_id(1).to(tl.int64) * BV + tl.arange(0, BV)
    m_n = o_n < N
    m_v = o_v < c1
    b_z = _logits_tile(h_ptr, w_ptr, o_n, m_n, o_v, m_v, H, stride_h, stride_w, BN, BV, BH, UPCAST, IEEE)
    y = tl.load(y_ptr + o_n, mask=m_n, other=IGNORE).to(tl.int64)
    keep = y != IGNORE
    g_lp = tl.where(keep, tl.load(dlogp_ptr + o_n, mask=m_n, other=0.0), 0.0)[:, None]
    g_h = tl.where(keep, tl.load(dent_ptr + o_n, mask=m_n, other=0.0), 0.0)[:, None]
    ent = tl.load(ent_ptr + o_n, mask=m_n, other=0.0)[:, None]
    m = tl.load(m_ptr + o_n, mask=m_n, other=0.0)[:, None]
    logs = tl.load(logs_ptr + o_n, mask=m_n, other=0.0)[:, None]
    # log p <= 0 on real lanes (the tile is bitwise the forward's, so z <= m); the clamp only
    # keeps the padding lanes (past c1 or N, not stored) from overflowing exp
    b_lp = tl.minimum((b_z - m) / T - logs, 0.0)
    b_p = tl.exp(b_lp)
    b_g = -b_p * (g_lp + g_h * (b_lp + ent))
    b_g = tl.where(o_v[None, :] == y[:, None], b_g + g_lp, b_g)  # target class in fp32
    p_dz = dz_ptr + o_n[:, None] * stride_dz + (o_v - c0)[None, :]
    tl.store(p_dz, _cast(b_g / T, dz_ptr.dtype.element_ty, FIX_BF16), mask=m_n[:, None] & m_v[None, :])


@triton.jit
def _linear_dh_kernel(
    dz_ptr,
    w_ptr,
    dh_ptr,
    N,
    H,
    c0,
    C,
    stride_dz,
    stride_w,
    BN: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    ACCUM: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    """dh[rows, h-block] (+)= dz[rows, :C] @ weight[c0 : c0 + C, h-block], fp32, fixed order."""
    o_n = tl.program_id(0).to(tl.int64) * BN + tl.arange(0, BN)
    o_h = tl.program_id(1).to(tl.int64) * BH + tl.arange(0, BH)
    m_n = o_n < N
    m_h = o_h < H
    acc = tl.zeros([BN, BH], dtype=tl.float32)
    for k0 in range(0, C, BK):
        o_k = k0 + tl.arange(0, BK).to(tl.int64)
        m_k = o_k < C
        b_dz = tl.load(
            dz_ptr + o_n[:, None] * stride_dz + o_k[None, :], mask=m_n[:, None] & m_k[None, :], other=0.0
        )
        b_w = tl.load(
            w_ptr + (c0 + o_k)[:, None] * stride_w + o_h[None, :], mask=m_k[:, None] & m_h[None, :], other=0.0
        )
        acc = _dot(b_dz, b_w, acc, UPCAST, IEEE)
    p_dh = dh_ptr + o_n[:, None] * H + o_h[None, :]
    m_o = m_n[:, None] & m_h[None, :]
    if ACCUM:  # earlier vocabulary chunks
        acc += tl.load(p_dh, mask=m_o, other=0.0)
    tl.store(p_dh, acc, mask=m_o)


@triton.jit
def _linear_dw_kernel(
    dz_ptr,
    h_ptr,
    dw_ptr,
    N,
    H,
    c0,
    C,
    stride_dz,
    stride_h,
    stride_dw,
    BV: tl.constexpr,
    BH: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
    FIX_BF16: tl.constexpr,
):
    """dweight[c0 + v-block, h-block] = dz[:, v-block].T @ hidden[:, h-block], fp32 over all rows
    in a fixed order: each program owns its output tile, so no atomics."""
    o_v = tl.program_id(0).to(tl.int64) * BV + tl.arange(0, BV)
    o_h = tl.program_id(1).to(tl.int64) * BH + tl.arange(0, BH)
    m_v = o_v < C
    m_h = o_h < H
    acc = tl.zeros([BV, BH], dtype=tl.float32)
    for k0 in range(0, N, BK):
        o_k = k0 + tl.arange(0, BK).to(tl.int64)
        m_k = o_k < N
        b_dz = tl.load(
            dz_ptr + o_k[:, None] * stride_dz + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0
        )
        b_h = tl.load(
            h_ptr + o_k[:, None] * stride_h + o_h[None, :], mask=m_k[:, None] & m_h[None, :], other=0.0
        )
        acc = _dot(tl.trans(b_dz), b_h, acc, UPCAST, IEEE)
    p_dw = dw_ptr + (c0 + o_v)[:, None] * stride_dw + o_h[None, :]
    tl.store(p_dw, _cast(acc, dw_ptr.dtype.element_ty, FIX_BF16), mask=m_v[:, None] & m_h[None, :])


# ----------------------------------------------------------------------------- launchers


def _fwd_triton(logits, labels, t):
    n, v = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    logp, ent, m, logs = (torch.empty(n, **f32) for _ in range(4))
    if n:
        _logprobs_fwd_kernel[(n,)](
            logits, labels, logp, ent, m, logs, logits.stride(0), v, t, BLOCK=BLOCK_V, num_warps=8
        )
    return logp, ent, m, logs


def _bwd_triton(logits, labels, t, dlogp, dent, ent, m, logs, inplace):
    n, v = logits.shape
    dz = logits if inplace else torch.empty((n, v), device=logits.device, dtype=logits.dtype)
    if n:
        _logprobs_bwd_kernel[(n,)](
            logits,
            dz,
            labels,
            dlogp,
            dent,
            ent,
            m,
            logs,
            logits.stride(0),
            dz.stride(0),
            v,
            t,
            BLOCK=BLOCK_V,
            FIX_BF16=INTERPRET,
            num_warps=8,
        )
    return dz


def _row_chunks(n: int, v: int):
    step = max(1, CHUNK_ELEMS // max(v, 1))
    return [(r, min(r + step, n)) for r in range(0, n, step)]


def _fwd_torch(logits, labels, t):
    """Chunked over rows; each chunk holds a few fp32 [rows, V] temporaries (<= CHUNK_ELEMS)."""
    n, v = logits.shape
    f32 = dict(device=logits.device, dtype=torch.float32)
    logp, ent, m, logs = (torch.empty(n, **f32) for _ in range(4))
    y = labels.clamp_min(0)[:, None]
    for r0, r1 in _row_chunks(n, v):
        z = logits[r0:r1].float()  # (R, V)
        mx = z.amax(-1)
        lp = (z - mx[:, None]) / t  # difference before division: exact for |z| > 1e4
        ls = lp.exp().sum(-1).log()
        lp -= ls[:, None]  # log p, (R, V)
        p = lp.exp()
        ent[r0:r1] = -(p * torch.where(p > 0, lp, 0.0)).sum(-1)
        logp[r0:r1] = lp.gather(-1, y[r0:r1]).squeeze(-1)
        m[r0:r1], logs[r0:r1] = mx, ls
    keep = labels != IGNORE_INDEX
    return torch.where(keep, logp, 0.0), torch.where(keep, ent, 0.0), m, logs


def _dlogits_torch(z, y, keep, hit, dlogp, dent, ent, m, logs, t):
    """fp32 d logits (R, C) from raw fp32 logits z (R, C), which it overwrites (one temporary
    fewer), and the saved row statistics. Rows where keep is False get zero gradient; y (R,) is
    the label column, used where hit is True (the label lies in these C columns)."""
    g_lp = torch.where(keep, dlogp, 0.0)[:, None]
    g_h = torch.where(keep, dent, 0.0)[:, None]
    lp = z.sub_(m[:, None]).div_(t).sub_(logs[:, None])  # log p
    p = lp.exp()
    g = lp.add_(ent[:, None]).mul_(g_h).add_(g_lp).mul_(p).neg_()  # -p (g_lp + g_h (log p + H))
    g.masked_fill_(p == 0, 0.0)  # padded vocab: 0 * -inf
    # target-class term added in fp32 before any rounding; other rows add 0 at column 0
    g.scatter_add_(1, torch.where(hit, y, 0)[:, None], torch.where(hit[:, None], g_lp, 0.0))
    return g.div_(t)


def _bwd_torch(logits, labels, t, dlogp, dent, ent, m, logs, inplace):
    n, v = logits.shape
    dz = logits if inplace else torch.empty((n, v), device=logits.device, dtype=logits.dtype)
    keep = labels != IGNORE_INDEX
    for r0, r1 in _row_chunks(n, v):
        g = _dlogits_torch(
            logits[r0:r1].to(torch.float32, copy=True),
            labels[r0:r1],
            keep[r0:r1],
            keep[r0:r1],
            dlogp[r0:r1],
            dent[r0:r1],
            ent[r0:r1],
            m[r0:r1],
            logs[r0:r1],
            t,
        )
        dz[r0:r1] = g  # in place: this chunk of logits is no longer needed
    return dz


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, t, impl, inplace):
        fwd = _fwd_triton if impl == "triton" else _fwd_torch
        logp, ent, m, logs = fwd(logits, labels, t)
        ctx.save_for_backward(logits, labels, ent, m, logs)
        ctx.t, ctx.impl, ctx.inplace = t, impl, inplace
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogp, dent):
        logits, labels, ent, m, logs = ctx.saved_tensors
        bwd = _bwd_triton if ctx.impl == "triton" else _bwd_torch
        dlogp, dent = dlogp.float().contiguous(), dent.float().contiguous()
        dz = bwd(logits, labels, ctx.t, dlogp, dent, ent, m, logs, ctx.inplace)
        return dz.detach(), None, None, None, None  # in place: the logits buffer, now holding d logits


def token_logprobs(logits, labels, *, temperature: float = 1.0, impl: str = "auto", inplace_backward=False):
    """Log-prob of the label and entropy of softmax(logits / temperature), per row.

    logits [N, V] float32 | bfloat16 | float16 (any row stride, unit column stride; -inf columns
    are padded vocabulary), labels [N] int64/int32 in [0, V) or -100 (ignored: outputs 0, zero
    gradient). Returns (logp [N] float32 <= 0, entropy [N] float32 >= 0), differentiable w.r.t.
    logits; the backward writes d logits in the logits dtype.

    inplace_backward=True CONSUMES the input: the backward writes d logits into the logits
    buffer itself, so the step needs no second [N, V] buffer. Use it only when nothing else
    reads these logits afterwards (no other op saved them, no second backward).
    """
    check_float("logits", logits, 2)
    n, v = logits.shape
    check_labels(labels, n, v, logits.device)
    t = check_temperature(temperature)
    if not isinstance(inplace_backward, bool):
        raise ValueError(f"inplace_backward must be a bool, got {inplace_backward!r}")
    impl = resolve_impl(impl, logits)
    return _TokenLogprobs.apply(logits, labels.long().contiguous(), t, impl, inplace_backward)


def _lin_flags(hidden):
    return dict(UPCAST=INTERPRET, IEEE=hidden.dtype == torch.float32)


def _lin_blocks(hidden):
    if INTERPRET:
        bn, bv, bh = LIN_BLOCKS_INTERPRET
    else:
        bn, bv, bh = LIN_BLOCKS_GPU_FP32 if hidden.dtype == torch.float32 else LIN_BLOCKS_GPU
    n, h = hidden.shape
    return min(bn, max(16, triton.next_power_of_2(n))), bv, min(bh, max(16, triton.next_power_of_2(h)))


def _lin_fwd_triton(hidden, weight, labels, t):
    n, h = hidden.shape
    v = weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    logp, ent, m, logs = (torch.empty(n, **f32) for _ in range(4))
    bn, bv, bh = _lin_blocks(hidden)
    if n:
        _linear_fwd_kernel[(triton.cdiv(n, bn),)](
            hidden,
            weight,
            labels,
            logp,
            ent,
            m,
            logs,
            n,
            v,
            h,
            hidden.stride(0),
            weight.stride(0),
            t,
            BN=bn,
            BV=bv,
            BH=bh,
            **_lin_flags(hidden),
            num_warps=LIN_WARPS,
            num_stages=LIN_STAGES,
        )
    return logp, ent, m, logs


def _vocab_chunk(n: int, v: int, elem_bytes: int, bv: int) -> int:
    """Columns of the d-logits scratch: a multiple of bv within SCRATCH_BYTES (at least one block)."""
    c = SCRATCH_BYTES // max(1, n * elem_bytes) // bv * bv
    return max(bv, min(c, triton.cdiv(v, bv) * bv))


def _lin_bwd_triton(hidden, weight, labels, t, dlogp, dent, ent, m, logs, need_h, need_w):
    """(d hidden or None, d weight or None), one vocabulary chunk at a time."""
    n, h = hidden.shape
    v = weight.shape[0]
    dh = torch.empty((n, h), device=hidden.device, dtype=torch.float32) if need_h else None
    dw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else None
    if n == 0:
        return (dh.to(hidden.dtype) if need_h else None), (dw.zero_() if need_w else None)
    bn, bv, bh = _lin_blocks(hidden)
    width = _vocab_chunk(n, v, hidden.element_size(), bv)
    dz = torch.empty((n, min(width, v)), device=hidden.device, dtype=hidden.dtype)  # (N, C) scratch
    flags = _lin_flags(hidden)
    for c0 in range(0, v, width):
        c1 = min(c0 + width, v)
        _linear_dz_kernel[(triton.cdiv(n, bn), triton.cdiv(c1 - c0, bv))](
            hidden,
            weight,
            dz,
            labels,
            dlogp,
            dent,
            ent,
            m,
            logs,
            n,
            v,
            h,
            c0,
            c1,
            hidden.stride(0),
            weight.stride(0),
            dz.stride(0),
            t,
            BN=bn,
            BV=bv,
            BH=bh,
            FIX_BF16=INTERPRET,
            **flags,
            num_warps=LIN_WARPS,
            num_stages=LIN_STAGES,
        )
        if need_h:
            _linear_dh_kernel[(triton.cdiv(n, bn), triton.cdiv(h, bh))](
                dz,
                weight,
                dh,
                n,
                h,
                c0,
                c1 - c0,
                dz.stride(0),
                weight.stride(0),
                BN=bn,
                BH=bh,
                BK=bv,
                ACCUM=c0 > 0,
                **flags,
                num_warps=LIN_WARPS,
                num_stages=LIN_STAGES,
            )
        if need_w:
            _linear_dw_kernel[(triton.cdiv(c1 - c0, bv), triton.cdiv(h, bh))](
                dz,
                hidden,
                dw,
                n,
                h,
                c0,
                c1 - c0,
                dz.stride(0),
                hidden.stride(0),
                dw.stride(0),
                BV=bv,
                BH=bh,
                BK=bn,
                FIX_BF16=INTERPRET,
                **flags,
                num_warps=LIN_WARPS,
                num_stages=LIN_STAGES,
            )
    return (dh.to(hidden.dtype) if need_h else None), dw


def _lin_chunks(n: int, v: int):
    """(vocab chunks, row chunks) whose [rows, cols] blocks hold at most CHUNK_ELEMS elements."""
    cols = max(1, min(v, max(1024, CHUNK_ELEMS // max(n, 1))))
    rows = max(1, min(n, CHUNK_ELEMS // cols))
    vocab = [(c, min(c + cols, v)) for c in range(0, v, cols)]
    return vocab, [(r, min(r + rows, n)) for r in range(0, n, rows)]


def _online_update_torch(m, s, t, z, temp):
    """torch twin of _online_update on raw finite fp32 logits z (R, C), which it overwrites;
    returns the new (m, s, t), each (R,)."""
    m_new = torch.maximum(m, z.amax(-1))
    shift = torch.where(m == float("-inf"), 0.0, (m - m_new) / temp)
    scale = shift.exp()
    d = z.sub_(m_new[:, None]).div_(temp)  # (z - m) / T
    e = d.exp()
    s_new = scale * s + e.sum(-1)
    t = scale * (t + shift * s) + e.mul_(d).sum(-1)
    return m_new, s_new, t


def _lin_fwd_torch(hidden, weight, labels, t):
    n, v = hidden.shape[0], weight.shape[0]
    f32 = dict(device=hidden.device, dtype=torch.float32)
    m = torch.full((n,), float("-inf"), **f32)
    s, tt, z_y = (torch.zeros(n, **f32) for _ in range(3))
    cols, rows = _lin_chunks(n, v)
    for c0, c1 in cols:
        for r0, r1 in rows:
            z = (hidden[r0:r1] @ weight[c0:c1].T).float()  # (R, C), in the input dtype as the reference
            y = labels[r0:r1]
            hit = (y >= c0) & (y < c1)
            z_c = z.gather(1, (y - c0).clamp(0, c1 - c0 - 1)[:, None]).squeeze(1)
            z_y[r0:r1] = torch.where(hit, z_c, z_y[r0:r1])
            m[r0:r1], s[r0:r1], tt[r0:r1] = _online_update_torch(m[r0:r1], s[r0:r1], tt[r0:r1], z, t)
    logs = s.log()
    keep = labels != IGNORE_INDEX
    logp = torch.where(keep, (z_y - m) / t - logs, 0.0)
    return logp, torch.where(keep, logs - tt / s, 0.0), m, logs


def _lin_bwd_torch(hidden, weight, labels, t, dlogp, dent, ent, m, logs, need_h, need_w):
    """Vocabulary chunks outer, row chunks inner: each d weight chunk is finished before the next
    (fp32 sum over row chunks), d hidden accumulates in fp32 across vocabulary chunks."""
    n, v = hidden.shape[0], weight.shape[0]
    dh = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_h else None
    dw = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_w else None
    keep = labels != IGNORE_INDEX
    cols, rows = _lin_chunks(n, v)
    for c0, c1 in cols:
        w_c = weight[c0:c1]  # (C, H)
        dw_c = None  # fp32 (C, H), only when there are several row chunks
        for r0, r1 in rows:
            h_r, y = hidden[r0:r1], labels[r0:r1]  # (R, H), (R,)
            hit = keep[r0:r1] & (y >= c0) & (y < c1)
            z = (h_r @ w_c.T).float()  # (R, C)
            stats = (dlogp[r0:r1], dent[r0:r1], ent[r0:r1], m[r0:r1], logs[r0:r1])
            g = _dlogits_torch(z, y - c0, keep[r0:r1], hit, *stats, t).to(hidden.dtype)  # rounded once
            del z
            if need_h:
                dh[r0:r1] += g @ w_c
            if need_w and len(rows) == 1:
                torch.matmul(g.T, h_r, out=dw[c0:c1])
            elif need_w:
                part = (g.T @ h_r).float()
                dw_c = part if dw_c is None else dw_c.add_(part)
        if dw_c is not None:
            dw[c0:c1] = dw_c
    return (dh.to(hidden.dtype) if need_h else None), dw


class _TokenLogprobsLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, t, impl):
        fwd = _lin_fwd_triton if impl == "triton" else _lin_fwd_torch
        logp, ent, m, logs = fwd(hidden, weight, labels, t)
        ctx.save_for_backward(hidden, weight, labels, ent, m, logs)
        ctx.t, ctx.impl = t, impl
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dlogp, dent):
        hidden, weight, labels, ent, m, logs = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        if not (need_h or need_w):
            return None, None, None, None, None
        bwd = _lin_bwd_triton if ctx.impl == "triton" else _lin_bwd_torch
        dlogp, dent = dlogp.float().contiguous(), dent.float().contiguous()
        dh, dw = bwd(hidden, weight, labels, ctx.t, dlogp, dent, ent, m, logs, need_h, need_w)
        return dh, dw, None, None, None


def token_logprobs_linear(hidden, weight, labels, *, temperature: float = 1.0, impl: str = "auto"):
    """token_logprobs of the logits hidden @ weight.T without ever materializing them.

    hidden [N, H] and weight [V, H] (the lm_head), same float dtype and device, unit column
    stride; labels [N] int64/int32 in [0, V) or -100 (ignored). Returns (logp [N] float32,
    entropy [N] float32), differentiable w.r.t. hidden and weight (gradients only to those with
    requires_grad). Triton: fp32-accumulated tiles, bitwise reproducible run after run; its
    backward's only large buffer is the [N, chunk] d-logits scratch (<= SCRATCH_BYTES, 256 MB).
    torch: vocabulary x row chunks of at most CHUNK_ELEMS logits, never an [N, V] tensor, forward
    or backward. d hidden / d weight come back in the input dtype.
    """
    check_float("hidden", hidden, 2)
    check_float("weight", weight, 2)
    check_same("weight", weight, "hidden", hidden, shape=False)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden.shape[1]}")
    n, v = hidden.shape[0], weight.shape[0]
    check_labels(labels, n, v, hidden.device)
    t = check_temperature(temperature)
    impl = resolve_impl(impl, hidden)
    return _TokenLogprobsLinear.apply(hidden, weight, labels.long().contiguous(), t, impl)
