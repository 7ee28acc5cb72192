"""topk_token_mask: per sequence, the ceil(ratio * L) valid positions with the largest scores.

The Triton kernel reads only the [B, T] scores, one program per row, looping over T in blocks
so rows of any length work. Scores map to int32 keys whose signed order is the float order;
a bisection on the key finds the k-th largest value t; positions with key > t are taken, and
the remaining k - count(key > t) come from the ties key == t in position order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import check_topk_inputs, resolve_impl


@triton.jit
def _keys(p_s, p_valid, o_t, T):
    """int32 keys of a block of scores (signed order = float order), and the validity mask."""
    m_t = o_t < T
    s = tl.load(p_s + o_t, mask=m_t, other=0.0).to(tl.float32)
    valid = (tl.load(p_valid + o_t, mask=m_t, other=0) != 0) & m_t
    # -0.0 and +0.0 are equal scores and must tie: both get key 0.
    bits = tl.where(s == 0.0, 0, s.to(tl.int32, bitcast=True))
    # Negative floats order backwards as integers: flip their 31 magnitude bits.
    key = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return key, valid


@triton.jit
def _topk_kernel(
    p_scores,
    p_valid,  # [B, T] int8
    p_k,  # [B] int64: how many to take in each row
    p_out,  # [B, T] int8 (viewed as bool by the caller)
    T,
    stride_s,
    stride_v,
    stride_o,
    BLOCK_T: tl.constexpr,
):
    i_b = tl.program_id(0).to(tl.int64)
    k = tl.load(p_k + i_b).to(tl.int32)
    p_s = p_scores + i_b * stride_s
    p_v = p_valid + i_b * stride_v
    p_o = p_out + i_b * stride_o
    # Key range of the valid positions bounds the bisection.
    lo = tl.full([], 2147483647, tl.int64)
    hi = tl.full([], -2147483648, tl.int64)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        key, valid = _keys(p_s, p_v, o_t, T)
        lo = tl.minimum(lo, tl.min(tl.where(valid, key, 2147483647), axis=0).to(tl.int64))
        hi = tl.maximum(hi, tl.max(tl.where(valid, key, -2147483648), axis=0).to(tl.int64))
    # Largest threshold t with count(key >= t) >= k: invariant count(key >= lo) >= k and
    # count(key >= hi + 1) < k. k = 0 skips the search (nothing is taken).
    if k == 0:
        hi = lo
    while lo < hi:
        mid = (lo + hi + 1) // 2  # int64: no overflow
        cnt = tl.zeros([], tl.int32)
        for t0 in range(0, T, BLOCK_T):
            o_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
            key, valid = _keys(p_s, p_v, o_t, T)
            cnt += tl.sum((valid & (key.to(tl.int64) >= mid)).to(tl.int32), axis=0)
        ge = cnt >= k
        lo = tl.where(ge, mid, lo)
        hi = tl.where(ge, hi, mid - 1)
    thr = lo
    n_gt = tl.zeros([], tl.int32)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        key, valid = _keys(p_s, p_v, o_t, T)
        n_gt += tl.sum((valid & (key.to(tl.int64) > thr)).to(tl.int32), axis=0)
    # Ties at the threshold fill the rest, lowest positions first (running inclusive cumsum).
    need = k - n_gt
    seen = tl.zeros([], tl.int32)
    for t0 in range(0, T, BLOCK_T):
        o_t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        key, valid = _keys(p_s, p_v, o_t, T)
        k64 = key.to(tl.int64)
        tie = (valid & (k64 == thr)).to(tl.int32)
        rank = seen + tl.cumsum(tie, axis=0)  # 1-based rank among ties so far
        take = (valid & (k64 > thr)) | ((tie != 0) & (rank <= need))
        take = take & (k > 0)
        tl.store(p_o + o_t, take.to(tl.int8), mask=o_t < T)
        seen += tl.sum(tie, axis=0)


def _topk_triton(scores, valid, k) -> torch.Tensor:
    b, t = scores.shape
    out = torch.empty(b, t, dtype=torch.int8, device=scores.device)
    if b == 0 or t == 0:
        return out.view(torch.bool)
    valid = valid.to(torch.int8)
    block_t = min(triton.next_power_of_2(max(t, 16)), 4096)
    _topk_kernel[(b,)](
        scores, valid, k, out, t, scores.stride(0), valid.stride(0), out.stride(0), BLOCK_T=block_t
    )
    return out.view(torch.bool)  # (B, T)


def _topk_torch(scores, valid, k) -> torch.Tensor:
    b, t = scores.shape
    s = torch.where(valid, scores.float(), 0.0)  # invalid values (NaN included) never matter
    # Lexicographic order (valid first, score descending, position ascending) from two
    # stable sorts: the secondary key first.
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # (B, T)
    order = order.gather(
        -1, torch.sort(valid.gather(-1, order).to(torch.int8), dim=-1, descending=True, stable=True).indices
    )
    rank = torch.arange(t, device=scores.device).expand(b, t)
    return torch.zeros_like(valid).scatter_(-1, order, rank < k[:, None])  # (B, T)


def topk_token_mask(
    scores: torch.Tensor, response_mask: torch.Tensor, ratio: float, *, impl: str = "auto"
) -> torch.Tensor:
    """Top-k token mask of each row (docs/kernels.md).

    scores: [B, T] float32 / bfloat16 / float16; NaN at a valid position is a ValueError.
    response_mask: [B, T] bool or integer, nonzero = valid position.
    ratio: in (0, 1]. Returns [B, T] bool with exactly ceil(ratio * L) of the L valid positions
    of each row True (kernels._utils.topk_counts), the largest scores, ties to the lower position.
    """
    valid, k = check_topk_inputs(scores, response_mask, ratio)
    impl = resolve_impl(impl, scores)
    if impl == "triton":
        return _topk_triton(scores, valid, k)
    return _topk_torch(scores, valid, k)
