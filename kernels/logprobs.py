"""token_logprobs: differentiable per-token log-prob and entropy of logits (docs/kernels.md).

Returns (logp [N], entropy [N]) in float32 from logits divided by the temperature, with
  d logp_y / d z_v = (1[v=y] - p_v) / T,    d H / d z_v = -p_v (log p_v + H) / T.
The forward pass keeps only fp32 per-row statistics (running max m, log of the rescaled
sum-exp, entropy) and the backward pass rebuilds the softmax from them blockwise. Entropy is
accumulated as t = sum e^(a-m) (a-m) (kernels._softmax.online_update) so that H = log s - t / s
never subtracts two huge numbers (|z| > 1e4 stays exact). Rows whose label is -100 output 0
and get zero gradient. token_logprobs_linear (kernels/logprobs_linear.py) is the same op on
hidden @ weight.T and shares _cast and _dlogits_torch from here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._softmax import online_update
from ._utils import (
    IGNORE_INDEX,
    INTERPRET,
    check_float,
    check_labels,
    check_temperature,
    resolve_impl,
)

# Rows x vocab elements of one fp32 temporary in the torch impls (32 MB); the few alive at once
# (updated in place where possible) stay well under 256 MB whatever N and V are.
CHUNK_ELEMS = 1 << 23
BLOCK_V = 4096  # token_logprobs: vocab block of one row program
IGNORE = tl.constexpr(IGNORE_INDEX)  # jit code reads only constexpr globals


# ----------------------------------------------------------------------------- Triton kernels


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
    # one row as a [1, BLOCK] tile so that it shares online_update with the linear kernel
    m = tl.full([1], float("-inf"), tl.float32)
    s = tl.zeros([1], tl.float32)
    t = tl.zeros([1], tl.float32)
    for v0 in range(0, tl.where(ignore, 0, V), BLOCK):  # an ignored row reads no logits
        o_v = v0 + tl.arange(0, BLOCK)
        b_z = tl.load(p_z + o_v, mask=o_v < V, other=float("-inf")).to(tl.float32)
        m, s, t = online_update(m, s, t, b_z[None, :], T)
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
