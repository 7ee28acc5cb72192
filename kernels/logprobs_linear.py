"""token_logprobs_linear: token_logprobs of hidden @ weight.T, never materializing the [N, V]
logits (docs/kernels.md).

Returns (logp [N], entropy [N]) in float32, as token_logprobs (kernels/logprobs.py) does on
the logits; d hidden and d weight come back in the input dtype. The Triton forward runs tl.dot
tiles with an online log-sum-exp (kernels._softmax.online_update); the backward recomputes
tiles one vocabulary chunk at a time into a bounded [N, chunk] scratch of d logits and reduces
it with two fixed-order kernels (d hidden over row blocks, d weight over vocab blocks, fp32
accumulation, no atomics), so results are bitwise reproducible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._softmax import online_update, online_update_torch
from ._utils import (
    IGNORE_INDEX,
    INTERPRET,
    check_float,
    check_labels,
    check_same,
    check_temperature,
    resolve_impl,
)
from .logprobs import CHUNK_ELEMS, IGNORE, _cast, _dlogits_torch

# Bytes of the d-logits scratch of the Triton linear backward ([N, chunk] in the input dtype).
SCRATCH_BYTES = 1 << 28
# token_logprobs_linear tiles (rows, vocab, hidden), the row and hidden ones shrunk to small
# inputs (16 at least, for tl.dot): tensor-core sized on a GPU; wide vocab tiles under the
# interpreter, whose cost is per operation (and its dot does not use BLAS).
LIN_BLOCKS_GPU = (64, 128, 64)
# fp32 (a testing dtype) multiplies with IEEE dots, i.e. FMA loops that hold their operand tiles
# in registers: (64, 128, 64) spills up to 1.4 KB on sm_80; these fit sm_80 and sm_90a (<= 150 regs).
LIN_BLOCKS_GPU_FP32 = (64, 64, 32)
LIN_BLOCKS_INTERPRET = (64, 2048, 64)
LIN_WARPS, LIN_STAGES = 8, 3


# ----------------------------------------------------------------------------- Triton kernels


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
        m, s, t = online_update(m, s, t, b_z, T)
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
            m[r0:r1], s[r0:r1], tt[r0:r1] = online_update_torch(m[r0:r1], s[r0:r1], tt[r0:r1], z, t)
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
