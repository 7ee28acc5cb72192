"""token_dependency_linear: token_dependency of clean_hidden @ weight.T and
masked_hidden @ weight.T, no grad, without ever building the [N, V] logits (docs/kernels.md).

Each program folds tl.dot logits tiles of a block of rows into the pair state of
kernels._softmax over one fixed LINEAR_SPLIT_V-column piece of the vocabulary; a second kernel
merges the pieces in their fixed order (rescale_pair) and finalizes the statistics with
token_dependency's _finalize (kernels/dependency.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._softmax import NEG_BIG, online_update_pair, rescale_pair
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
from .dependency import _dependency_torch_rows, _finalize, _rows_per_chunk

# Vocabulary columns per program of the linear kernel: a constant (not derived from N or the
# GPU), so a row's statistics are bitwise the same whatever the batch or the machine.
LINEAR_SPLIT_V = 8192


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
        m_a, m_b, s_a, s_b, u, w = online_update_pair(m_a, m_b, s_a, s_b, u, w, a, b)
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
        s_a, s_b, u, w = rescale_pair(m_a, m_b, s_a, s_b, u, w, m_a_new, m_b_new)
        s_a2, s_b2, u2, w2 = rescale_pair(m_a2, m_b2, s_a2, s_b2, u2, w2, m_a_new, m_b_new)
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


def _linear_blocks(element_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps) of _dependency_linear_kernel: tiles that compile
    without register spills on sm_80 and sm_90a (two fp32 [BLOCK_N, BLOCK_V] accumulators plus
    online-update temporaries of the same shape). 16-bit: 128 rows a block, since each row block
    streams the whole weight (64 x 128 spills on sm_80); fp32 IEEE dots run on FMA units."""
    return (128, 64, 32, 8) if element_size == 2 else (32, 64, 32, 8)


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
    ever building the [N, V] logits (docs/kernels.md).

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
