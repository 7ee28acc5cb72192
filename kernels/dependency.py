"""token_dependency: per-token KL(clean || masked), k3, log-probs and clean entropy from two
logits tensors, no grad (docs/kernels.md).

The kernel keeps, per row, the online state of the pair of softmaxes (clean and masked) over
the vocabulary, relative to running maxima (kernels._softmax: rescale_pair,
online_update_pair, where the state and its algebra are written out), and _finalize turns it
into the statistics. token_dependency_linear (kernels/dependency_linear.py) is the same op on
two hidden states and the lm_head weight and shares _finalize and the torch impl's row
statistics from here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._softmax import NEG_BIG, online_update_pair
from ._utils import (
    CHUNK_BYTES,
    IGNORE_INDEX,
    TokenStats,
    check_float,
    check_labels,
    check_same,
    check_temperature,
    resolve_impl,
)


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
        m_a, m_b, s_a, s_b, u, w = online_update_pair(m_a, m_b, s_a, s_b, u, w, a, b)
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
    """Per-token visual dependency of two logits tensors, no grad (docs/kernels.md).

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
