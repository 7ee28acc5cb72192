"""The VPPO math on per-token scalars (docs/algorithm.md sections 2-4). Plain PyTorch: no Triton, no model.

Pieces, in the order a training step uses them:
  group_advantages     GRPO advantages per response                                   [B]
  dependency_scores    per-token visual dependency S_t from a TokenStats-like object  (kl | k3)
  trajectory_scores    Sbar_i, the mean of S_t over the valid tokens of a response    [B]
  trajectory_alphas    TAS factors alpha_i in the "released" / "global" / "static" forms
  shape_advantages     A'_i = alpha_i * A_i
  kl_penalty           k1 / k2 / k3 (low_var_kl) estimators to a reference policy
  policy_loss          clip-higher + dual-clip surrogate with the TGF token mask, entropy
                       penalty and optional KL -> (loss, stats)
  loss_scale           the micro-batch / rank factor that makes gradients sum to the global mean
  step_stats           the logged statistics of an optimizer step: global means over all its
                       micro-batches and ranks, each over the unit STAT_MEAN_OVER names
  reference_loss       the whole micro-batch loss from naive logits: the reference the fused
                       kernel path is checked against

Where the paper and the released code differ both are here, chosen by option:
  - token averaging ("token", as released: masked-out tokens stay in the denominator) or the
    paper's per-sequence mean ("seq");
  - entropy penalty on the sampled-token NLL ("nll", as released) or the exact entropy ("exact");
  - TAS statistics per device mini-batch with the per-micro-batch dynamic b_max ("released"),
    over the whole global batch ("global"), or the paper's static [b_min, b_max] ("static").
The token selection itself (top-k of the scores) is `kernels.topk_token_mask`; see vppo/loss.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

ENTROPY_MODES = ("nll", "exact")
LOSS_AGGS = ("token", "seq")
KL_ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")
SHAPING_MODES = ("released", "global", "static")
DEPENDENCY_KINDS = ("kl", "k3")

# reduce(t, op) -> t reduced over all ranks, op in {"min", "max", "sum"}; identity on one rank.
Reduce = Callable[[torch.Tensor, str], torch.Tensor]


@dataclass(frozen=True)
class LossConfig:
    """Options of the per-micro-batch objective; defaults are the released 7B recipe.

    clip_low, clip_high: ratio clip range [1 - clip_low, 1 + clip_high] (clip-higher).
    dual_clip: cap c of dual-clip PPO for negative advantages (None = off); must be > 1.
    entropy_coef, entropy_mode: + coef * mean over valid tokens of (-logp) ("nll", released)
        or of the exact entropy ("exact").
    loss_agg: "token" (sum over kept tokens / all valid tokens) or "seq" (mean of per-sequence means).
    kl_coef, kl_estimator, kl_clamp: optional KL-to-reference term (0 = off, as released).
    logratio_clamp: log(pi/pi_old) and the k3 log-ratio are clamped to +-this before exp.
    tis_cap: truncated importance sampling of the policy term for a sampling engine whose
        probabilities differ from the trainer's: each token's surrogate is weighted by
        min(pi_old / pi_sampler, tis_cap) (no gradient through the weight), tis_cap >= 1. None = off,
        as released.
    """

    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = 3.0
    entropy_coef: float = 0.06
    entropy_mode: str = "nll"
    loss_agg: str = "token"
    kl_coef: float = 0.0
    kl_estimator: str = "low_var_kl"
    kl_clamp: float = 10.0
    logratio_clamp: float = 20.0
    tis_cap: float | None = None

    def __post_init__(self):
        def finite(name, lo=None, hi=None, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if lo is not None and (v < lo or (lo_open and v == lo)):
                raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {v!r}")
            if hi is not None and v >= hi:
                raise ValueError(f"{name} must be < {hi}, got {v!r}")

        finite("clip_low", 0.0, 1.0)
        finite("clip_high", 0.0)
        if self.dual_clip is not None:
            finite("dual_clip", 1.0, lo_open=True)
        finite("entropy_coef", 0.0)
        finite("kl_coef", 0.0)
        finite("kl_clamp", 0.0, lo_open=True)
        finite("logratio_clamp", 0.0, lo_open=True)
        if self.tis_cap is not None:  # below 1 it would down-weight tokens where the two engines agree
            finite("tis_cap", 1.0)
        for name, allowed in (
            ("entropy_mode", ENTROPY_MODES),
            ("loss_agg", LOSS_AGGS),
            ("kl_estimator", KL_ESTIMATORS),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")


# ---------------------------------------------------------------------------------------------
# input checks


def _check_tensor(name: str, t, ndim: int | tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in ndims:
        raise ValueError(f"{name} must be {' or '.join(f'{d}-D' for d in ndims)}, got shape {tuple(t.shape)}")
    return t


def _check_float(name: str, t, ndim, like: torch.Tensor | None = None, like_name: str = "") -> torch.Tensor:
    _check_tensor(name, t, ndim)
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is not None:
        if t.device != like.device:
            raise ValueError(f"{name} device {t.device} does not match {like_name} device {like.device}")
        if t.dim() == like.dim() and t.shape != like.shape:
            raise ValueError(
                f"{name} shape {tuple(t.shape)} does not match {like_name} shape {tuple(like.shape)}"
            )
    return t


def _check_mask(name: str, m, like: torch.Tensor, like_name: str) -> torch.Tensor:
    _check_tensor(name, m, like.dim())
    if m.shape != like.shape:
        raise ValueError(
            f"{name} shape {tuple(m.shape)} does not match {like_name} shape {tuple(like.shape)}"
        )
    if m.dtype.is_floating_point or m.dtype.is_complex:
        raise ValueError(f"{name} must be bool or integer, got {m.dtype}")
    if m.device != like.device:
        raise ValueError(f"{name} device {m.device} does not match {like_name} device {like.device}")
    return m.bool()


def _check_row_mask(name: str, m, b: int, device) -> torch.Tensor | None:
    if m is None:
        return None
    _check_tensor(name, m, 1)
    if m.shape[0] != b or m.dtype != torch.bool or m.device != device:
        raise ValueError(
            f"{name} must be a bool tensor of shape ({b},) on {device}, got {m.dtype} {tuple(m.shape)}"
        )
    return m


# ---------------------------------------------------------------------------------------------
# advantages and trajectory shaping


def group_advantages(rewards: torch.Tensor, groups: int | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: A_i = (R_i - mean_g R) / (std_g R + eps) with the unbiased std over each group.

    rewards: [B] float. groups: an int G (consecutive groups of G responses, B % G == 0) or a
    [B] integer tensor of group ids. A group of one response has no std: its advantage is 0;
    a group whose rewards are all equal gets exactly 0. Returns [B] float32.
    """
    _check_float("rewards", rewards, 1)
    b = rewards.shape[0]
    if isinstance(groups, bool) or not isinstance(groups, (int, torch.Tensor)):
        raise ValueError(f"groups must be an int or a tensor of group ids, got {type(groups).__name__}")
    if isinstance(groups, int):
        if groups < 1 or b % groups:
            raise ValueError(f"groups must be a positive divisor of the batch size {b}, got {groups}")
        ids = torch.arange(b, device=rewards.device) // groups
    else:
        _check_tensor("groups", groups, 1)
        if groups.shape[0] != b or groups.dtype.is_floating_point or groups.device != rewards.device:
            raise ValueError(f"groups must be an integer tensor of shape ({b},) on {rewards.device}")
        ids = groups
    if not b:
        return torch.zeros(0, device=rewards.device)
    _, inv = torch.unique(ids, return_inverse=True)  # [B] dense group index
    g = int(inv.max()) + 1
    r = rewards.double()
    count = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros_like(count).index_add_(0, inv, r) / count
    dev = r - mean[inv]
    var = torch.zeros_like(count).index_add_(0, inv, dev * dev) / (count - 1).clamp_min(1)
    hi = torch.full_like(count, -math.inf).scatter_reduce(0, inv, r, "amax")
    lo = torch.full_like(count, math.inf).scatter_reduce(0, inv, r, "amin")
    adv = dev / (var.sqrt()[inv] + eps)
    # one response, or equal rewards: no signal (and no 1e-17 / 1e-6 rounding noise)
    dead = (count[inv] < 2) | (hi[inv] == lo[inv])
    return torch.where(dead, torch.zeros_like(adv), adv).float()


def dependency_scores(stats, kind: str = "k3") -> torch.Tensor:
    """The per-token visual dependency S_t from a TokenStats-like object (anything with .kl and .k3).

    kind="kl": the exact KL(clean || masked) over the vocabulary (paper, Eq. 3);
    kind="k3": the sampled-token low-variance estimator, as in the released code.
    """
    if kind not in DEPENDENCY_KINDS:
        raise ValueError(f"kind must be one of {DEPENDENCY_KINDS}, got {kind!r}")
    if not hasattr(stats, kind):
        raise ValueError(f"stats has no field {kind!r} (expected kernels.TokenStats or alike)")
    return getattr(stats, kind)


TOKEN_SELECTS = ("dependency", "random", "entropy")


class _Scores:
    """A TokenStats-like view whose dependency fields both hold `scores` (for vppo.loss.tgf_token_mask)."""

    def __init__(self, scores: torch.Tensor):
        self.kl = self.k3 = scores


def selection_stats(traj, select: str = "dependency", seed: int = 0):
    """What TGF ranks tokens by: `traj` itself for "dependency" (its kl / k3), else a stand-in whose
    kl and k3 are i.i.d. uniform scores from a generator seeded by `seed` ("random", the paper's
    random-token ablation) or the clean pass's exact entropy ("entropy", the high-entropy-token
    selection of the ablations). traj: anything with .entropy and .response_mask ([B, T])."""
    if select not in TOKEN_SELECTS:
        raise ValueError(f"select must be one of {TOKEN_SELECTS}, got {select!r}")
    if select == "dependency":
        return traj
    if select == "entropy":
        if traj.entropy is None:
            raise ValueError("select='entropy' needs the scoring pass's entropy")
        return _Scores(traj.entropy.float())
    gen = torch.Generator().manual_seed(int(seed) % (2**63))
    return _Scores(torch.rand(traj.response_mask.shape, generator=gen).to(traj.response_mask.device))


def trajectory_scores(dep: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sbar_i = mean of dep over the valid tokens of row i; 0 for a response of length 0.

    dep: [B, T] float, response_mask: [B, T] bool/int. Returns [B] float32.
    """
    _check_float("dep", dep, 2)
    valid = _check_mask("response_mask", response_mask, dep, "dep")
    total = torch.where(valid, dep.float(), 0.0).sum(-1)
    return total / valid.sum(-1).clamp_min(1)


def trajectory_alphas(
    scores: torch.Tensor,
    mode: str = "released",
    *,
    b_min: float = 0.9,
    b_max: float | None = None,
    valid: torch.Tensor | None = None,
    micro_batch_size: int | None = None,
    reduce: Reduce | None = None,
    eps: float = 1e-6,
) -> torch.Tensor:
    """TAS factors alpha_i (docs/algorithm.md section 3) from trajectory scores.

    scores: [B] trajectory scores Sbar. valid: optional [B] bool, rows that take part (e.g. length
    > 0); the others get alpha = 1 and are left out of every min / max / mean. With lo / hi the
    min / max over the valid rows, n_i = clamp((Sbar_i - lo) / (hi - lo), 0, 1), and
      "released": lo / hi over the B rows passed (the per-device mini-batch); then over each
                  micro-batch (consecutive chunks of micro_batch_size rows, None = one chunk)
                  alpha_i = b_min + (1 - b_min) * n_i / mean(n): mean 1, floor b_min, no cap.
      "global":   the same formula with lo, hi and mean(n) over the whole global batch: each rank
                  passes its whole mini-batch and `reduce(t, op)` (op in "min" | "max" | "sum")
                  all-reduces over ranks, so the result depends neither on the micro-batch size
                  nor on the number of GPUs.
      "static":   alpha_i = b_min + (b_max - b_min) * n_i (paper, Eq. 5); reduce optional.
    The mean-1 forms divide by mean(n) + 1e-8, as the released code does: a micro-batch whose rows
    all sit within a hair of the minimum gets factors near b_min rather than large ones, and one
    whose rows all sit at it (mean(n) == 0) gets alpha = b_min.
    Degenerate cases: hi - lo <= eps (all scores equal, or fewer than two rows) -> alpha = 1.
    Returns [B] float32.
    """
    _check_float("scores", scores, 1)
    if mode not in SHAPING_MODES:
        raise ValueError(f"mode must be one of {SHAPING_MODES}, got {mode!r}")
    if not (isinstance(b_min, (int, float)) and math.isfinite(b_min) and 0.0 <= b_min <= 1.0):
        raise ValueError(f"b_min must be in [0, 1], got {b_min!r}")
    if mode == "static":
        if b_max is None or not math.isfinite(b_max) or b_max < b_min:
            raise ValueError(f"b_max must be a finite number >= b_min for mode='static', got {b_max!r}")
    elif b_max is not None:
        raise ValueError(f"b_max is only used by mode='static' (mode={mode!r} derives it), got {b_max!r}")
    if micro_batch_size is not None and (mode != "released" or micro_batch_size < 1):
        raise ValueError(
            f"micro_batch_size must be a positive int and only with mode='released', got {micro_batch_size!r}"
        )
    if reduce is not None and mode == "released":
        raise ValueError("reduce is not used by mode='released' (per-device statistics, as released)")
    b = scores.shape[0]
    valid = _check_row_mask("valid", valid, b, scores.device)
    if valid is None:
        valid = torch.ones(b, dtype=torch.bool, device=scores.device)
    red = reduce if reduce is not None else (lambda t, op: t)

    s = scores.float()
    lo = red(
        torch.where(valid, s, math.inf).amin(0, keepdim=True) if b else s.new_full((1,), math.inf), "min"
    )
    hi = red(
        torch.where(valid, s, -math.inf).amax(0, keepdim=True) if b else s.new_full((1,), -math.inf), "max"
    )
    flat = ~(hi - lo > eps)  # also true with no valid row (-inf - inf)
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    n = torch.where(valid, ((s - torch.where(flat, 0.0, lo)) / span).clamp(0, 1), 0.0)  # [B]

    if mode == "static":
        alpha = b_min + (b_max - b_min) * n
    else:
        if mode == "global":
            total = red(n.sum(0, keepdim=True), "sum")
            count = red(valid.sum(0, keepdim=True).float(), "sum")
            mean = (total / count.clamp_min(1)).expand(b)
        else:
            mb = micro_batch_size or max(b, 1)
            chunk = torch.arange(b, device=s.device) // mb
            k = (b + mb - 1) // mb
            total = torch.zeros(k, device=s.device).index_add_(0, chunk, n)
            count = torch.zeros(k, device=s.device).index_add_(0, chunk, valid.float())
            mean = (total / count.clamp_min(1))[chunk]
        alpha = b_min + (1.0 - b_min) * (n / (mean + 1e-8))  # the released formula, epsilon included
    return torch.where(flat | ~valid, torch.ones_like(alpha), alpha)


def shape_advantages(
    advantages: torch.Tensor,
    scores: torch.Tensor,
    mode: str = "released",
    *,
    return_alpha: bool = False,
    **kw,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A'_i = alpha_i * A_i for both signs; advantages [B] or [B, T], kw as trajectory_alphas.
    With return_alpha=True returns (A', alpha)."""
    _check_float("advantages", advantages, (1, 2))
    if advantages.shape[0] != scores.shape[0]:
        raise ValueError(f"advantages rows {advantages.shape[0]} do not match scores rows {scores.shape[0]}")
    alpha = trajectory_alphas(scores, mode, **kw)
    shaped = advantages * (alpha if advantages.dim() == 1 else alpha[:, None])
    return (shaped, alpha) if return_alpha else shaped


# ---------------------------------------------------------------------------------------------
# the objective


def kl_penalty(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    estimator: str = "low_var_kl",
    *,
    clamp: float = 10.0,
    logratio_clamp: float = 20.0,
) -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from sampled-token log-probs (same shapes).

    k1 = logp - ref_logp; k2 = (logp - ref_logp)^2 / 2;
    k3 = low_var_kl: d = clamp(ref_logp - logp, +-logratio_clamp), clamp(exp(d) - d - 1, +-clamp).
    k1 and k3 are unbiased (E over y ~ pi_theta is the exact KL); all three are 0 when equal.
    """
    _check_float("logp", logp, (1, 2))
    _check_float("ref_logp", ref_logp, logp.dim(), logp, "logp")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    diff = logp.float() - ref_logp.float()
    if estimator == "k1":
        return diff
    if estimator == "k2":
        return 0.5 * diff.square()
    d = (-diff).clamp(-logratio_clamp, logratio_clamp)
    return (d.exp() - d - 1).clamp(-clamp, clamp)


def loss_scale(micro_tokens: int, global_tokens: int, world_size: int = 1) -> float:
    """(valid tokens in micro-batch) * world_size / (valid tokens in the global mini-batch).

    Multiplying each micro-batch's token-mean loss by this makes the gradients summed over
    micro-batches and averaged over ranks (DDP / ZeRO) equal those of the global token mean.
    For loss_agg="seq" pass sequence counts instead of token counts.
    """
    micro, total, world = int(micro_tokens), int(global_tokens), int(world_size)
    if world < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size!r}")
    if micro < 0:
        raise ValueError(f"micro_tokens must be >= 0, got {micro_tokens!r}")
    if total < micro:
        raise ValueError(f"global_tokens ({global_tokens!r}) must be >= micro_tokens ({micro_tokens!r})")
    return micro * world / total if total else 0.0


def _token_mean(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp_min(1)


def _aggregate(x: torch.Tensor, valid: torch.Tensor, mode: str) -> torch.Tensor:
    """token: sum over valid / number of valid; seq: mean over non-empty rows of row means."""
    if mode == "token":
        return _token_mean(x, valid)
    lengths = valid.sum(-1)  # [B]
    row = torch.where(valid, x, 0.0).sum(-1) / lengths.clamp_min(1)
    return row.sum() / (lengths > 0).sum().clamp_min(1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
    cfg: LossConfig = LossConfig(),
    *,
    entropy: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    sampler_logp: torch.Tensor | None = None,
    token_scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The VPPO micro-batch loss (docs/algorithm.md section 4) -> (scalar loss, stats of detached floats).

    logp [B, T]: log pi_theta of the sampled tokens (differentiable); old_logp [B, T]: log pi_old;
    advantages [B] or [B, T] (already shaped by TAS); token_mask [B, T] bool: the TGF selection
    (None = every valid token); response_mask [B, T]: valid response tokens; entropy [B, T]:
    exact entropy, needed for cfg.entropy_mode="exact"; ref_logp [B, T]: needed when kl_coef > 0;
    sampler_logp [B, T]: the sampling engine's log-probs, needed when cfg.tis_cap is set.
    Per token, r = exp(clamp(logp - old_logp)), l1 = -A r, l2 = -A clip(r, 1 - cl, 1 + ch),
    l3 = -A dual_clip, l = max(l1, l2) if A >= 0 else min(max(l1, l2), l3); the masked-out tokens
    contribute 0 but stay in the denominator. loss = (pg + kl_coef * KL) * loss_scale +
    entropy_coef * H * token_scale, with H the token mean of -logp ("nll", released) or of the
    entropy ("exact") over all valid tokens (not TGF-masked) and KL aggregated like pg. H is a token
    mean whatever cfg.loss_agg: with "seq" loss_scale counts sequences and token_scale (None =
    loss_scale) must count tokens, or the entropy term of the whole batch would depend on the split.
    Values at invalid positions are never read (they may be anything, even NaN).
    """
    if not isinstance(cfg, LossConfig):
        raise ValueError(f"cfg must be a LossConfig, got {type(cfg).__name__}")
    _check_float("logp", logp, 2)
    _check_float("old_logp", old_logp, 2, logp, "logp")
    _check_float("advantages", advantages, (1, 2), logp, "logp")
    if advantages.shape[0] != logp.shape[0]:
        raise ValueError(
            f"advantages shape {tuple(advantages.shape)} does not match logp rows {logp.shape[0]}"
        )
    valid = _check_mask("response_mask", response_mask, logp, "logp")
    keep = valid if token_mask is None else _check_mask("token_mask", token_mask, logp, "logp") & valid
    if cfg.entropy_mode == "exact" and entropy is None:
        raise ValueError("entropy is required with entropy_mode='exact'")
    if entropy is not None:
        _check_float("entropy", entropy, 2, logp, "logp")
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("ref_logp is required with kl_coef > 0")
    if ref_logp is not None:
        _check_float("ref_logp", ref_logp, 2, logp, "logp")
    if token_scale is None:
        token_scale = loss_scale
    for name, v in (("loss_scale", loss_scale), ("token_scale", token_scale)):
        if not math.isfinite(float(v)) or float(v) < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    if cfg.tis_cap is not None and sampler_logp is None:
        raise ValueError("sampler_logp is required with tis_cap (the sampling engine's log-probs)")
    if sampler_logp is not None:
        _check_float("sampler_logp", sampler_logp, 2, logp, "logp")

    # Sanitise invalid positions first: where() alone would still send NaN gradients through them.
    adv = advantages.float() if advantages.dim() == 2 else advantages.float()[:, None].expand_as(logp)
    adv = torch.where(valid, adv, 0.0)
    lp = torch.where(valid, logp.float(), 0.0)
    logratio = (lp - torch.where(valid, old_logp.float(), 0.0)).clamp(-cfg.logratio_clamp, cfg.logratio_clamp)
    ratio = logratio.exp()
    # exp of the clamped log-ratio == clip(ratio) in value and gradient, without overflow
    clipped = logratio.clamp(math.log1p(-cfg.clip_low), math.log1p(cfg.clip_high)).exp()
    l1, l2 = -adv * ratio, -adv * clipped
    l12 = torch.maximum(l1, l2)
    per_token = l12
    if cfg.dual_clip is not None:
        l3 = -adv * cfg.dual_clip
        per_token = torch.where(adv < 0, torch.minimum(l12, l3), l12)
    tis = None
    if cfg.tis_cap is not None:  # min(pi_old / pi_sampler, cap), a constant weight per token
        gap = torch.where(valid, old_logp.float() - sampler_logp.float(), 0.0)
        tis = gap.clamp(-cfg.logratio_clamp, cfg.logratio_clamp).exp().clamp(max=cfg.tis_cap).detach()
        per_token = per_token * tis
    pg = _aggregate(torch.where(keep, per_token, 0.0), valid, cfg.loss_agg)

    if cfg.entropy_mode == "nll":
        ent = _token_mean(-lp, valid)
    else:
        ent = _token_mean(entropy.float(), valid)
    loss = pg
    kl = None
    if ref_logp is not None:
        kl_tok = kl_penalty(
            lp,
            torch.where(valid, ref_logp.float(), 0.0),
            cfg.kl_estimator,
            clamp=cfg.kl_clamp,
            logratio_clamp=cfg.logratio_clamp,
        )
        kl = _aggregate(kl_tok, valid, cfg.loss_agg)
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * kl
    loss = loss * float(loss_scale) + cfg.entropy_coef * ent * float(token_scale)

    with torch.no_grad():
        n = valid.sum().clamp_min(1).float()
        frac = lambda m: (m & valid).sum() / n
        hi_clip = (adv > 0) & (logratio > math.log1p(cfg.clip_high))
        lo_clip = (adv < 0) & (logratio < math.log1p(-cfg.clip_low))
        dual = (adv < 0) & (l12 > l3) if cfg.dual_clip is not None else torch.zeros_like(valid)
        names = [
            "loss",
            "pg_loss",
            "entropy_loss",
            "ppo_kl",
            "ratio_mean",
            "clipfrac_high",
            "clipfrac_low",
            "clipfrac_dual",
            "kept_frac",
            "valid_tokens",
            "valid_seqs",
        ]
        vals = [
            loss,
            pg,
            ent,
            _token_mean(-logratio, valid),
            _token_mean(ratio, valid),
            frac(hi_clip),
            frac(lo_clip),
            frac(dual),
            frac(keep),
            valid.sum().float(),
            valid.any(-1).sum().float(),
        ]
        if kl is not None:
            names.append("kl_loss")
            vals.append(kl)
        if tis is not None:
            names.append("tis_weight_mean")
            vals.append(_token_mean(tis, valid))
        stats = dict(zip(names, torch.stack([v.detach().float() for v in vals]).tolist()))
    return loss, stats


# What each statistic of `policy_loss` is a mean over, the one definition the update's logged
# statistics follow (vppo.train.update through `step_stats`): "token" = the valid response tokens,
# "agg" = the unit of loss_agg (tokens with "token", non-empty sequences with "seq"), "count" = a
# count that is added up. `loss` is None: the update logs the sum of the pre-scaled micro losses.
STAT_MEAN_OVER: dict[str, str | None] = {
    "loss": None,
    "pg_loss": "agg",
    "kl_loss": "agg",
    "entropy_loss": "token",
    "ppo_kl": "token",
    "ratio_mean": "token",
    "clipfrac_high": "token",
    "clipfrac_low": "token",
    "clipfrac_dual": "token",
    "kept_frac": "token",
    "tis_weight_mean": "token",
    "valid_tokens": "count",
    "valid_seqs": "count",
}


def step_stats(micro: list[dict[str, float]], loss_agg: str = "token", reduce: Reduce | None = None) -> dict:
    """The statistics of one optimizer step from the `policy_loss` stats of its micro-batches on this
    rank: each the mean over the whole global mini-batch (every micro-batch of every rank) of the unit
    STAT_MEAN_OVER gives it, whatever the split, and the counts summed (valid_tokens, valid_seqs: the
    step's global totals). Each micro mean is turned back into its sum (mean x count, in float64),
    the sums and counts are all-reduced once (`reduce(t, "sum")`), then divided. `loss` is left out.
    """
    if loss_agg not in LOSS_AGGS:
        raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {loss_agg!r}")
    if not micro:
        raise ValueError("step_stats needs the stats of at least one micro-batch")
    keys = list(micro[0])
    unknown = [k for k in keys if k not in STAT_MEAN_OVER]
    if unknown:  # a new statistic must say what it is a mean over
        raise ValueError(f"statistics {unknown} have no entry in vppo.objective.STAT_MEAN_OVER")
    for m in micro:
        if list(m) != keys:
            raise ValueError(f"micro-batch statistics differ in their keys: {sorted(set(m) ^ set(keys))}")
    unit = {"token": "valid_tokens", "agg": "valid_tokens" if loss_agg == "token" else "valid_seqs"}
    kept = [k for k in keys if STAT_MEAN_OVER[k] is not None]
    weight = lambda m, k: 1.0 if STAT_MEAN_OVER[k] == "count" else m[unit[STAT_MEAN_OVER[k]]]  # noqa: E731
    sums = torch.tensor([[m[k] * weight(m, k) for k in kept] for m in micro], dtype=torch.float64).sum(0)
    if reduce is not None:
        sums = reduce(sums, "sum")
    total = dict(zip(kept, sums.tolist()))
    out = {}
    for k in kept:
        kind = STAT_MEAN_OVER[k]
        out[k] = total[k] if kind == "count" else total[k] / max(total[unit[kind]], 1.0)
    return out


def reference_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
    cfg: LossConfig = LossConfig(),
    *,
    temperature: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    sampler_logp: torch.Tensor | None = None,
    token_scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The whole VPPO micro-batch loss from materialized logits [B, T, V] (any float dtype).

    log_softmax(logits.float() / temperature), the label gather and the exact entropy, all in
    fp32 on the full [B, T, V] tensor, then policy_loss. labels [B, T] int (any value at invalid
    positions, e.g. -100). Naive on purpose: the reference the fused kernel path is checked
    against (vppo/loss.py, tests/test_loss.py).
    """
    _check_float("logits", logits, 3)
    _check_tensor("labels", labels, 2)
    if labels.shape != logits.shape[:2] or labels.dtype.is_floating_point or labels.device != logits.device:
        raise ValueError(
            f"labels must be an integer tensor of shape {tuple(logits.shape[:2])} on {logits.device}"
        )
    if not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    valid = _check_mask("response_mask", response_mask, labels, "labels")
    v = logits.shape[-1]
    if bool(((labels < 0) | (labels >= v))[valid].any()):
        raise ValueError(f"labels out of range [0, {v}) at a valid response position")
    logprobs = torch.log_softmax(logits.float() / float(temperature), dim=-1)  # (B, T, V)
    logp = logprobs.gather(-1, labels.clamp(0, v - 1).long()[..., None]).squeeze(-1)  # (B, T)
    p = logprobs.exp()
    entropy = -(p * torch.where(p > 0, logprobs, 0.0)).sum(-1)  # (B, T); 0 log 0 = 0 on padded vocab
    return policy_loss(
        torch.where(valid, logp, 0.0),
        old_logp,
        advantages,
        token_mask,
        response_mask,
        cfg,
        entropy=torch.where(valid, entropy, 0.0),
        ref_logp=ref_logp,
        loss_scale=loss_scale,
        sampler_logp=sampler_logp,
        token_scale=token_scale,
    )
