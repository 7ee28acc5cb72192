"""token_dependency and token_dependency_linear: per-token KL(clean || masked), k3, log-probs and
clean entropy from two logits tensors (or two hidden states and the lm_head weight), no grad.

Both kernels keep, per row, an online state over the vocabulary, relative to running maxima
m_a (clean) and m_b (masked) of the temperature-scaled logits a = clean / T, b = masked / T:
    s_a = sum e^(a - m_a)       s_b = sum e^(b - m_b)
    u   = sum e^(a - m_a) (a - m_a)
    w   = sum e^(a - m_a) ((a - m_a) - (b - m_b))
so that entropy = log s_a - u / s_a and kl = w / s_a - log s_a + log s_b. Keeping the terms
relative to the maxima (rather than E_p[a] - lse) avoids catastrophic cancellation on rows
with |z| > 1e4. Padded vocabulary columns (-inf) add e^(-inf) = 0 and are masked out of u, w.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import (
    IGNORE_INDEX,
    INTERPRET,
    TokenStats,
    check_float,
    check_labels,
    check_same,
    check_temperature,
    resolve_impl,
)

# Running maxima start at this finite sentinel instead of -inf so that blocks made only of
# padded (-inf) columns rescale by e^0 rather than producing -inf - -inf = NaN. Logits below
# it count as -inf, which they are for every practical purpose.
NEG_BIG = tl.constexpr(-1.0e30)
# The torch impls never hold more than this many bytes of [rows, V] temporaries.
CHUNK_BYTES = 256 * 1024 * 1024
# Vocabulary columns per program of the linear kernel: a constant (not derived from N or the
# GPU), so a row's statistics are bitwise the same whatever the batch or the machine.
LINEAR_SPLIT_V = 8192


@triton.jit
def _rescale(m_a, m_b, s_a, s_b, u, w, m_a_new, m_b_new):
    """Re-express a state's sums relative to larger maxima m_a_new >= m_a, m_b_new >= m_b."""
    da = m_a_new - m_a
    db = m_b_new - m_b
    alpha = tl.exp(-da)
    # e^(a - m') ((a - m') - (b - m_b')) = e^(-da) e^(a - m) ((a - m) - (b - m_b) - da + db)
    w = alpha * (w - (da - db) * s_a)
    u = alpha * (u - da * s_a)
    return alpha * s_a, tl.exp(-db) * s_b, u, w


@triton.jit
def _online_update(m_a, m_b, s_a, s_b, u, w, a, b):
    """Fold a [..., BLOCK] tile of scaled logits into the per-row state (vectors over [...])."""
    m_a_new = tl.maximum(m_a, tl.max(a, axis=-1))
    m_b_new = tl.maximum(m_b, tl.max(b, axis=-1))
    s_a, s_b, u, w = _rescale(m_a, m_b, s_a, s_b, u, w, m_a_new, m_b_new)
    xa = a - tl.expand_dims(m_a_new, -1)
    xb = b - tl.expand_dims(m_b_new, -1)
    ea = tl.exp(xa)
    eb = tl.exp(xb)
    live = ea > 0  # excludes padded -inf columns, whose 0 * -inf would be NaN
    s_a += tl.sum(ea, axis=-1)
    s_b += tl.sum(eb, axis=-1)
    u += tl.sum(tl.where(live, ea * xa, 0.0), axis=-1)
    w += tl.sum(tl.where(live, ea * (xa - xb), 0.0), axis=-1)
    return m_a_new, m_b_new, s_a, s_b, u, w


@triton.jit
def _finalize(m_a, m_b, s_a, s_b, u, w, a_y, b_y, keep):
    """Per-row statistics from the final state; rows with keep == False give zeros."""
    log_sa = tl.log(tl.where(keep, s_a, 1.0))  # ignored rows have s = 0: keep them finite
    log_sb = tl.log(tl.where(keep, s_b, 1.0))
    logp_y = (a_y - m_a) - log_sa
    logq_y = (b_y - m_b) - log_sb
    kl = w / s_a - log_sa + log_sb
    ent = log_sa - u / s_a
    d = tl.minimum(tl.maximum(logq_y - logp_y, -20.0), 20.0)
    k3 = tl.minimum(tl.maximum(tl.exp(d) - d - 1.0, 0.0), 10.0)
    logp_y = tl.where(keep, logp_y, 0.0)
    logq_y = tl.where(keep, logq_y, 0.0)
    kl = tl.where(keep, kl, 0.0)
    k3 = tl.where(keep, k3, 0.0)
    ent = tl.where(keep, ent, 0.0)
    return logp_y, logq_y, kl, k3, ent


@triton.jit
def _dependency_kernel(
    p_clean,
    p_masked,
    p_labels,
    p_out,  # [5, N] float32: logp_clean, logp_masked, kl, k3, entropy
    N,
    V,
    stride_c,
    stride_m,
    temperature,
    IGNORE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # Rows on grid axis 0 (axes 1 and 2 stop at 65,535). BLOCK_N = 1 (one program per row)
    # unless the vocabulary is smaller than one block, when a program takes a few short rows.
    i_n = tl.program_id(0).to(tl.int64)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,) int64 offsets
    m_n = o_n < N
    y = tl.load(p_labels + o_n, mask=m_n, other=IGNORE).to(tl.int32)
    keep = (y != IGNORE) & m_n
    p_c = p_clean + o_n[:, None] * stride_c  # (BLOCK_N, 1)
    p_m = p_masked + o_n[:, None] * stride_m
    m_a = tl.full([BLOCK_N], NEG_BIG, tl.float32)
    m_b = tl.full([BLOCK_N], NEG_BIG, tl.float32)
    s_a = tl.zeros([BLOCK_N], tl.float32)
    s_b = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    w = tl.zeros([BLOCK_N], tl.float32)
    a_y = tl.zeros([BLOCK_N], tl.float32)
    b_y = tl.zeros([BLOCK_N], tl.float32)
    v_end = tl.where(tl.max(keep.to(tl.int32), axis=0) > 0, V, 0)  # ignored rows read nothing
    for v0 in range(0, v_end, BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)  # int32 columns: the row offset above is the int64 part
        m_v = keep[:, None] & (o_v < V)[None, :]
        a = tl.load(p_c + o_v[None, :], mask=m_v, other=float("-inf")).to(tl.float32) / temperature
        b = tl.load(p_m + o_v[None, :], mask=m_v, other=float("-inf")).to(tl.float32) / temperature
        # The label gather happens on the tile already loaded: each logit is read once.
        hit = o_v[None, :] == y[:, None]
        a_y += tl.sum(tl.where(hit, a, 0.0), axis=1)
        b_y += tl.sum(tl.where(hit, b, 0.0), axis=1)
        m_a, m_b, s_a, s_b, u, w = _online_update(m_a, m_b, s_a, s_b, u, w, a, b)
    logp_y, logq_y, kl, k3, ent = _finalize(m_a, m_b, s_a, s_b, u, w, a_y, b_y, keep)
    tl.store(p_out + o_n, logp_y, mask=m_n)
    tl.store(p_out + N + o_n, logq_y, mask=m_n)
    tl.store(p_out + 2 * N + o_n, kl, mask=m_n)
    tl.store(p_out + 3 * N + o_n, k3, mask=m_n)
    tl.store(p_out + 4 * N + o_n, ent, mask=m_n)


@triton.jit
def _dependency_linear_kernel(
    p_hc,
    p_hm,
    p_w,
    p_labels,
    p_part,  # [S, 8, N] float32 partial states of the S vocabulary splits
    N,
    V,
    H,
    stride_hc,
    stride_hm,
    stride_w,
    temperature,
    IGNORE: tl.constexpr,
    SPLIT_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    UPCAST: tl.constexpr,
):
    # Program (i_n, i_s): BLOCK_N rows against the vocabulary columns [i_s * SPLIT_V, + SPLIT_V).
    i_n = tl.program_id(0).to(tl.int64)
    i_s = tl.program_id(1)
    o_n = i_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)  # (BLOCK_N,)
    m_n = o_n < N
    y = tl.load(p_labels + o_n, mask=m_n, other=IGNORE).to(tl.int32)
    m_a = tl.full([BLOCK_N], NEG_BIG, tl.float32)
    m_b = tl.full([BLOCK_N], NEG_BIG, tl.float32)
    s_a = tl.zeros([BLOCK_N], tl.float32)
    s_b = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    w = tl.zeros([BLOCK_N], tl.float32)
    a_y = tl.zeros([BLOCK_N], tl.float32)
    b_y = tl.zeros([BLOCK_N], tl.float32)
    o_k = tl.arange(0, BLOCK_H)
    v_lo = i_s * SPLIT_V
    for v0 in range(v_lo, tl.minimum(v_lo + SPLIT_V, V), BLOCK_V):
        o_v = v0 + tl.arange(0, BLOCK_V)  # int32 column ids; int64 below where they meet strides
        m_v = o_v < V
        acc_c = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        acc_m = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            o_h = h0 + o_k
            m_h = o_h < H
            b_w = tl.load(
                p_w + o_v.to(tl.int64)[:, None] * stride_w + o_h[None, :],
                mask=m_v[:, None] & m_h[None, :],
                other=0.0,
            )
            b_hc = tl.load(
                p_hc + o_n[:, None] * stride_hc + o_h[None, :], mask=m_n[:, None] & m_h[None, :], other=0.0
            )
            b_hm = tl.load(
                p_hm + o_n[:, None] * stride_hm + o_h[None, :], mask=m_n[:, None] & m_h[None, :], other=0.0
            )
            if UPCAST:  # the interpreter's bf16 x bf16 dot is garbage (triton issue 11584)
                b_w = b_w.to(tl.float32)
                b_hc = b_hc.to(tl.float32)
                b_hm = b_hm.to(tl.float32)
            # One weight tile, loaded once, serves both hidden states.
            b_wt = tl.trans(b_w)  # (BLOCK_H, BLOCK_V)
            acc_c = tl.dot(b_hc, b_wt, acc_c, input_precision="ieee")  # no tf32 for fp32 inputs
            acc_m = tl.dot(b_hm, b_wt, acc_m, input_precision="ieee")
        a = tl.where(m_v[None, :], acc_c / temperature, float("-inf"))  # (BLOCK_N, BLOCK_V)
        b = tl.where(m_v[None, :], acc_m / temperature, float("-inf"))
        hit = o_v[None, :] == y[:, None]
        a_y += tl.sum(tl.where(hit, a, 0.0), axis=1)
        b_y += tl.sum(tl.where(hit, b, 0.0), axis=1)
        m_a, m_b, s_a, s_b, u, w = _online_update(m_a, m_b, s_a, s_b, u, w, a, b)
    p_p = p_part + i_s.to(tl.int64) * 8 * N + o_n
    tl.store(p_p, m_a, mask=m_n)
    tl.store(p_p + N, m_b, mask=m_n)
    tl.store(p_p + 2 * N, s_a, mask=m_n)
    tl.store(p_p + 3 * N, s_b, mask=m_n)
    tl.store(p_p + 4 * N, u, mask=m_n)
    tl.store(p_p + 5 * N, w, mask=m_n)
    tl.store(p_p + 6 * N, a_y, mask=m_n)  # 0 unless the label lies in this split
    tl.store(p_p + 7 * N, b_y, mask=m_n)


@triton.jit
def _merge_splits_kernel(p_part, p_labels, p_out, N, S, IGNORE: tl.constexpr, BLOCK_N: tl.constexpr):
    # Splits merged in their fixed order, from fixed buffers: bitwise deterministic.
    o_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < N
    y = tl.load(p_labels + o_n, mask=m_n, other=IGNORE)
    m_a = tl.full([BLOCK_N], NEG_BIG, tl.float32)
    m_b = tl.full([BLOCK_N], NEG_BIG, tl.float32)
    s_a = tl.zeros([BLOCK_N], tl.float32)
    s_b = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    w = tl.zeros([BLOCK_N], tl.float32)
    a_y = tl.zeros([BLOCK_N], tl.float32)
    b_y = tl.zeros([BLOCK_N], tl.float32)
    p_p = p_part + o_n
    for _ in range(0, S):
        m_a2 = tl.load(p_p, mask=m_n, other=NEG_BIG)
        m_b2 = tl.load(p_p + N, mask=m_n, other=NEG_BIG)
        s_a2 = tl.load(p_p + 2 * N, mask=m_n, other=0.0)
        s_b2 = tl.load(p_p + 3 * N, mask=m_n, other=0.0)
        u2 = tl.load(p_p + 4 * N, mask=m_n, other=0.0)
        w2 = tl.load(p_p + 5 * N, mask=m_n, other=0.0)
        a_y += tl.load(p_p + 6 * N, mask=m_n, other=0.0)
        b_y += tl.load(p_p + 7 * N, mask=m_n, other=0.0)
        m_a_new = tl.maximum(m_a, m_a2)
        m_b_new = tl.maximum(m_b, m_b2)
        s_a, s_b, u, w = _rescale(m_a, m_b, s_a, s_b, u, w, m_a_new, m_b_new)
        s_a2, s_b2, u2, w2 = _rescale(m_a2, m_b2, s_a2, s_b2, u2, w2, m_a_new, m_b_new)
        s_a += s_a2
        s_b += s_b2
        u += u2
        w += w2
        m_a = m_a_new
        m_b = m_b_new
        p_p += 8 * N  # next split; pointer arithmetic stays 64-bit
    keep = (y != IGNORE) & m_n
    logp_y, logq_y, kl, k3, ent = _finalize(m_a, m_b, s_a, s_b, u, w, a_y, b_y, keep)
    tl.store(p_out + o_n, logp_y, mask=m_n)
    tl.store(p_out + N + o_n, logq_y, mask=m_n)
    tl.store(p_out + 2 * N + o_n, kl, mask=m_n)
    tl.store(p_out + 3 * N + o_n, k3, mask=m_n)
    tl.store(p_out + 4 * N + o_n, ent, mask=m_n)


def _row_blocks(v: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_V) of _dependency_kernel: one row a program unless rows are shorter than
    a block; tiles of at most 4096 x 1 or 2048 elements compile without spills on sm_90."""
    block_v = min(triton.next_power_of_2(max(v, 16)), 4096)
    return max(1, min(2048 // block_v, 64)), block_v


def _linear_blocks(element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps) of _dependency_linear_kernel: tiles that compile
    without register spills on sm_80 and sm_90a (two fp32 [BLOCK_N, BLOCK_V] accumulators plus
    online-update temporaries of the same shape). 16-bit: 128 rows a block, since each row block
    streams the whole weight (64 x 128 spills on sm_80); fp32 IEEE dots run on FMA units."""
    return (128, 64, 32, 8) if element_size == 2 else (32, 64, 32, 8)


def _dependency_triton(clean, masked, labels, t: float) -> torch.Tensor:
    n, v = clean.shape
    out = torch.empty(5, n, dtype=torch.float32, device=clean.device)
    if n == 0:
        return out
    block_n, block_v = _row_blocks(v)
    _dependency_kernel[(triton.cdiv(n, block_n),)](
        clean,
        masked,
        labels,
        out,
        n,
        v,
        clean.stride(0),
        masked.stride(0),
        t,
        IGNORE=IGNORE_INDEX,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        num_warps=8,
    )
    return out  # (5, N)


def _log_softmax_f32(x: torch.Tensor, t: float, owned: bool) -> torch.Tensor:
    # Copy unless x is our own temporary: the in-place division must never touch the caller's
    # (fp32) logits.
    return torch.log_softmax(x.to(torch.float32, copy=not owned).div_(t), -1)  # (r, V)


def _dependency_torch_rows(clean, masked, labels, t: float, owned: bool = False) -> torch.Tensor:
    """Statistics of a chunk of rows, [5, r] float32, from about 12 * r * V bytes of temporaries."""
    logp = _log_softmax_f32(clean, t, owned)  # (r, V)
    logq = _log_softmax_f32(masked, t, owned)  # (r, V)
    idx = labels.clamp_min(0).long()[:, None]
    logp_y = logp.gather(1, idx).squeeze(1)  # (r,)
    logq_y = logq.gather(1, idx).squeeze(1)
    p = logp.exp()  # (r, V)
    # Padded columns: -inf -> the most negative float, so that p = 0 times it is 0 (0 log 0 = 0)
    # and -inf - -inf never happens; a column with p > 0 has log p > -104, never clamped.
    lowest = torch.finfo(torch.float32).min
    logp.clamp_min_(lowest)
    logq.clamp_min_(lowest)
    # Products in place then torch's pairwise sum (a batched matmul sums less accurately).
    kl = torch.sub(logp, logq, out=logq).mul_(p).sum(-1)  # sum p (log p - log q)
    ent = -logp.mul_(p).sum(-1)
    d = (logq_y - logp_y).clamp(-20, 20)
    k3 = (d.exp() - d - 1).clamp(0, 10)
    keep = labels != IGNORE_INDEX
    return torch.stack([logp_y, logq_y, kl, k3, ent]).masked_fill_(~keep, 0.0)  # (5, r)


def _rows_per_chunk(v: int, bytes_per_col: int) -> int:
    return max(1, CHUNK_BYTES // max(1, bytes_per_col * v))


def _dependency_torch(clean, masked, labels, t: float) -> torch.Tensor:
    n, v = clean.shape
    out = torch.empty(5, n, dtype=torch.float32, device=clean.device)
    rows = _rows_per_chunk(v, 16)  # 12 bytes a column measured with bench.meters, plus headroom
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        out[:, r0:r1] = _dependency_torch_rows(clean[r0:r1], masked[r0:r1], labels[r0:r1], t)
    return out  # (5, N)


def token_dependency(
    clean_logits: torch.Tensor,
    masked_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    impl: str = "auto",
) -> TokenStats:
    """Per-token visual dependency of two logits tensors, no grad (kernels.md).

    clean_logits, masked_logits: [N, V] float32 / bfloat16 / float16 (same dtype and device),
        contiguous in the last dimension; any row stride (a row slice needs no copy).
        Columns that are -inf in both (padded vocabulary) contribute nothing.
    labels: [N] int64 (or int32); -100 marks a row to ignore (all its statistics are 0).
    Returns TokenStats(logp_clean, logp_masked, kl, k3, entropy), each [N] float32, computed in
    float32 from logits / temperature. impl: "auto" | "triton" | "torch".
    """
    check_float("clean_logits", clean_logits, 2)
    check_float("masked_logits", masked_logits, 2)
    check_same("masked_logits", masked_logits, "clean_logits", clean_logits)
    n, v = clean_logits.shape
    check_labels(labels, n, v, clean_logits.device)
    t = check_temperature(temperature)
    impl = resolve_impl(impl, clean_logits)
    with torch.no_grad():
        labels = labels.contiguous()
        if impl == "triton":
            out = _dependency_triton(clean_logits, masked_logits, labels, t)
        else:
            out = _dependency_torch(clean_logits, masked_logits, labels, t)
    return TokenStats(*out.unbind(0))


def _dependency_linear_triton(hc, hm, weight, labels, t: float) -> torch.Tensor:
    n, h = hc.shape
    v = weight.shape[0]
    out = torch.empty(5, n, dtype=torch.float32, device=hc.device)
    if n == 0:
        return out
    block_n, block_v, block_h, warps = _linear_blocks(hc.element_size())
    assert LINEAR_SPLIT_V % block_v == 0
    splits = triton.cdiv(v, LINEAR_SPLIT_V)
    part = torch.empty(splits, 8, n, dtype=torch.float32, device=hc.device)
    _dependency_linear_kernel[(triton.cdiv(n, block_n), splits)](
        hc,
        hm,
        weight,
        labels,
        part,
        n,
        v,
        h,
        hc.stride(0),
        hm.stride(0),
        weight.stride(0),
        t,
        IGNORE=IGNORE_INDEX,
        SPLIT_V=LINEAR_SPLIT_V,
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_H=block_h,
        UPCAST=INTERPRET,
        num_warps=warps,
    )
    _merge_splits_kernel[(triton.cdiv(n, 256),)](
        part, labels, out, n, splits, IGNORE=IGNORE_INDEX, BLOCK_N=256
    )
    return out  # (5, N)


def _dependency_linear_torch(hc, hm, weight, labels, t: float) -> torch.Tensor:
    n = hc.shape[0]
    v = weight.shape[0]
    out = torch.empty(5, n, dtype=torch.float32, device=hc.device)
    # A chunk holds both logits blocks in the input dtype plus the 12 B/element of the stats.
    rows = _rows_per_chunk(v, 2 * hc.element_size() + 16)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        zc = hc[r0:r1] @ weight.T  # (r, V) in the input dtype, as the reference
        zm = hm[r0:r1] @ weight.T
        out[:, r0:r1] = _dependency_torch_rows(zc, zm, labels[r0:r1], t, owned=True)
        del zc, zm
    return out  # (5, N)


def token_dependency_linear(
    clean_hidden: torch.Tensor,
    masked_hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    impl: str = "auto",
) -> TokenStats:
    """token_dependency of clean_hidden @ weight.T and masked_hidden @ weight.T, no grad, without
    ever building the [N, V] logits (kernels.md).

    clean_hidden, masked_hidden: [N, H]; weight: [V, H] (the lm_head); all float32 / bfloat16 /
        float16 of one dtype and device, contiguous in the last dimension.
    labels: [N] int64 (or int32), -100 = ignored row (statistics 0).
    Returns TokenStats, each [N] float32. The Triton kernel multiplies with fp32 accumulation
    and splits the vocabulary in fixed LINEAR_SPLIT_V-column pieces merged in a fixed order, so
    the same inputs give bitwise the same scores. The torch impl forms the logits of a chunk of
    rows in the input dtype (as the reference does) and keeps at most CHUNK_BYTES of them.
    """
    check_float("clean_hidden", clean_hidden, 2)
    check_float("masked_hidden", masked_hidden, 2)
    check_float("weight", weight, 2)
    check_same("masked_hidden", masked_hidden, "clean_hidden", clean_hidden)
    check_same("weight", weight, "clean_hidden", clean_hidden, shape=False)
    n, h = clean_hidden.shape
    if weight.shape[1] != h:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {h}")
    check_labels(labels, n, weight.shape[0], clean_hidden.device)
    t = check_temperature(temperature)
    impl = resolve_impl(impl, clean_hidden)
    with torch.no_grad():
        labels = labels.contiguous()
        if impl == "triton":
            out = _dependency_linear_triton(clean_hidden, masked_hidden, weight, labels, t)
        else:
            out = _dependency_linear_torch(clean_hidden, masked_hidden, weight, labels, t)
    return TokenStats(*out.unbind(0))
