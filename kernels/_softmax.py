"""The online log-sum-exp helpers every kernel shares: one place for the running-max algebra.

Two states, both folded block by block over the vocabulary and kept relative to running maxima
so that rows with |z| > 1e4 lose nothing to cancellation:

- one softmax (token_logprobs, token_logprobs_linear): online_update, and online_update_torch,
  its PyTorch twin. Per row m = max z, s = sum e^a, t = sum e^a a with a = (z - m) / T, so
  that log-sum-exp = m / T + log s and entropy = log s - t / s.
- a pair of softmaxes (token_dependency, token_dependency_linear): rescale_pair and
  online_update_pair, on the temperature-scaled logits a = clean / T, b = masked / T, with
  running maxima m_a (clean) and m_b (masked):
      s_a = sum e^(a - m_a)       s_b = sum e^(b - m_b)
      u   = sum e^(a - m_a) (a - m_a)
      w   = sum e^(a - m_a) ((a - m_a) - (b - m_b))
  so that entropy = log s_a - u / s_a and kl = w / s_a - log s_a + log s_b. Keeping the terms
  relative to the maxima (rather than E_p[a] - lse) avoids catastrophic cancellation. Padded
  vocabulary columns (-inf) add e^(-inf) = 0 and are masked out of u, w.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Running maxima of the pair state start at this finite sentinel instead of -inf so that blocks
# made only of padded (-inf) columns rescale by e^0 rather than producing -inf - -inf = NaN.
# Logits below it count as -inf, which they are for every practical purpose.
NEG_BIG = tl.constexpr(-1.0e30)


# ----------------------------------------------------------------------------- one softmax


@triton.jit
def online_update(m, s, t, b_z, T):
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


def online_update_torch(m, s, t, z, temp):
    """torch twin of online_update on raw finite fp32 logits z (R, C), which it overwrites;
    returns the new (m, s, t), each (R,)."""
    m_new = torch.maximum(m, z.amax(-1))
    shift = torch.where(m == float("-inf"), 0.0, (m - m_new) / temp)
    scale = shift.exp()
    d = z.sub_(m_new[:, None]).div_(temp)  # (z - m) / T
    e = d.exp()
    s_new = scale * s + e.sum(-1)
    t = scale * (t + shift * s) + e.mul_(d).sum(-1)
    return m_new, s_new, t


# ----------------------------------------------------------------------------- a pair of softmaxes


@triton.jit
def rescale_pair(m_a, m_b, s_a, s_b, u, w, m_a_new, m_b_new):
    """Re-express a state's sums relative to larger maxima m_a_new >= m_a, m_b_new >= m_b."""
    da = m_a_new - m_a
    db = m_b_new - m_b
    alpha = tl.exp(-da)
    # e^(a - m') ((a - m') - (b - m_b')) = e^(-da) e^(a - m) ((a - m) - (b - m_b) - da + db)
    w = alpha * (w - (da - db) * s_a)
    u = alpha * (u - da * s_a)
    return alpha * s_a, tl.exp(-db) * s_b, u, w


@triton.jit
def online_update_pair(m_a, m_b, s_a, s_b, u, w, a, b):
    """Fold a [..., BLOCK] tile of scaled logits into the per-row state (vectors over [...])."""
    m_a_new = tl.maximum(m_a, tl.max(a, axis=-1))
    m_b_new = tl.maximum(m_b, tl.max(b, axis=-1))
    s_a, s_b, u, w = rescale_pair(m_a, m_b, s_a, s_b, u, w, m_a_new, m_b_new)
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
