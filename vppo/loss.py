"""The bridge between the RL math and the kernels: the only module of vppo/ that calls `kernels`.

It holds the three things a training step asks of the vocabulary-wide kernels:
  score            the old policy's no-grad passes over a trajectory: per response token the
                   log-prob and exact entropy of the clean pass, and for VPPO the exact KL and the
                   k3 estimate between the clean and the perturbed pass (`token_stats`), plus the
                   reference policy's log-probs when there is one;
  tgf_token_mask   the top-k token mask of gradient filtering (docs/algorithm.md section 2);
  vppo_loss_linear the differentiable micro-batch loss from hidden states and the lm_head weight.

Only the valid response positions go through the kernels: their rows are gathered ([N, H] hidden
states or [N, V] logits), and the [N] results go back to [B, R] through one scatter (`scatter_rows`)
on both roads, so the old log-probs of the importance ratio and the new ones are laid out by the
same code. With the linear entry points the [N, V] logits never exist, forward or backward.
`vppo.objective.policy_loss` does the rest of the loss, and `vppo.objective.reference_loss`
computes the same loss from materialized logits (the gradient checks in tests/test_loss.py).

The lm_head weight is always reached through the model's `FusedLMHead` module call
(`vppo.model`), which hands it to a function of this module: under ZeRO-3 the module call gathers
the weight, for the scoring pass and the update alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

import torch

import kernels
from vppo import packing
from vppo.objective import LossConfig, dependency_scores, policy_loss
from vppo.rollout import model_inputs, response_hidden
from vppo.trajectory import Trajectory

IMPLS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class LossOptions:
    """Everything the kernels and the objective need besides the tensors, fixed for a run.

    objective: the surrogate's options; temperature: the sampling temperature (the logits are
    divided by it in every pass, as at generation); impl: "auto" | "triton" | "torch".
    """

    objective: LossConfig = field(default_factory=LossConfig)
    temperature: float = 1.0
    impl: str = "auto"

    def __post_init__(self):
        if not isinstance(self.objective, LossConfig):
            raise ValueError(f"objective must be a LossConfig, got {type(self.objective).__name__}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {self.impl!r}")

    @classmethod
    def from_config(cls, cfg) -> LossOptions:
        """From a vppo.config.Config: algo.* (the objective), rollout.temperature, train.impl."""
        a = cfg.algo
        objective = LossConfig(
            clip_low=a.clip_low, clip_high=a.clip_high, dual_clip=a.dual_clip, entropy_coef=a.entropy_coef,
            entropy_mode=a.entropy_mode, loss_agg=a.loss_agg, kl_coef=a.kl_coef, tis_cap=a.tis_cap,
        )  # fmt: skip
        return cls(objective, temperature=cfg.rollout.temperature, impl=cfg.train.impl)


_DEFAULT = LossOptions()  # the released recipe at temperature 1


def scatter_rows(values: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[N] values of the valid positions (row-major order) -> [B, T] with zeros elsewhere.

    Differentiable w.r.t. values; N must equal response_mask.sum().
    """
    valid = response_mask.bool()
    if values.dim() != 1 or values.shape[0] != int(valid.sum()):
        raise ValueError(
            f"values must have shape ({int(valid.sum())},), one per valid position, got {tuple(values.shape)}"
        )
    return values.new_zeros(valid.shape).masked_scatter(valid, values)


def _check_opts(opts) -> None:
    if not isinstance(opts, LossOptions):
        raise ValueError(f"opts must be a LossOptions, got {type(opts).__name__}")


def _check_common(labels, response_mask, rows_name, rows):
    """Checks the arguments; returns (valid [B, T] bool, labels of the valid rows [N])."""
    if not isinstance(response_mask, torch.Tensor) or response_mask.dim() != 2:
        raise ValueError(
            f"response_mask must be a 2-D [B, T] tensor, got {getattr(response_mask, 'shape', None)}"
        )
    if response_mask.dtype.is_floating_point:
        raise ValueError(f"response_mask must be bool or integer, got {response_mask.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.shape != response_mask.shape:
        raise ValueError(
            f"labels must be a tensor of the response_mask shape {tuple(response_mask.shape)}, "
            f"got {getattr(labels, 'shape', type(labels).__name__)}"
        )
    if not isinstance(rows, torch.Tensor):
        raise ValueError(f"{rows_name} must be a torch.Tensor, got {type(rows).__name__}")
    valid = response_mask.bool()
    if rows.dim() == 3:
        if rows.shape[:2] != valid.shape:
            raise ValueError(
                f"{rows_name} must be [B, T, *] with [B, T] = {tuple(valid.shape)} (or the gathered "
                f"[N, *] rows), got {tuple(rows.shape)}"
            )
    elif rows.shape[0] != int(valid.sum()):
        raise ValueError(
            f"{rows_name} has {rows.shape[0]} rows but response_mask has {int(valid.sum())} valid positions"
        )
    y = labels[valid]
    if bool((y == kernels.IGNORE_INDEX).any()):
        # the kernel would return 0 for such a row and the loss would silently use logp = 0
        raise ValueError(f"labels is {kernels.IGNORE_INDEX} (ignored) at a valid response position")
    return valid, y


def vppo_loss_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
    opts: LossOptions = _DEFAULT,
    *,
    ref_logp: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    sampler_logp: torch.Tensor | None = None,
    token_scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """VPPO micro-batch loss from the last hidden states and the lm_head weight.

    hidden: [B, T, H] hidden states at the positions that predict each response token, or the
    [N, H] rows already gathered at the N valid positions of response_mask (row-major order);
    weight: [V, H] lm_head weight (same dtype); labels: [B, T] sampled token ids (any value at
    invalid positions); opts: LossOptions; old_logp, advantages, token_mask, response_mask,
    ref_logp, loss_scale, sampler_logp, token_scale: as in `vppo.objective.policy_loss` (opts.objective
    is its cfg).
    Differentiable w.r.t. hidden and weight; returns (scalar loss, stats).
    """
    _check_opts(opts)
    valid, y = _check_common(labels, response_mask, "hidden", hidden)
    rows = hidden[valid] if hidden.dim() == 3 else hidden  # (N, H)
    logp, entropy = kernels.token_logprobs_linear(
        rows, weight, y, temperature=opts.temperature, impl=opts.impl
    )
    extras = dict(
        ref_logp=ref_logp, sampler_logp=sampler_logp, loss_scale=loss_scale, token_scale=token_scale
    )
    return _finish(logp, entropy, old_logp, advantages, token_mask, response_mask, opts, **extras)


def vppo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
    opts: LossOptions = _DEFAULT,
    *,
    ref_logp: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    sampler_logp: torch.Tensor | None = None,
    token_scale: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """VPPO micro-batch loss from logits [B, T, V] (or the gathered [N, V] valid rows) through
    `kernels.token_logprobs`; otherwise as `vppo_loss_linear`. Differentiable w.r.t. logits."""
    _check_opts(opts)
    valid, y = _check_common(labels, response_mask, "logits", logits)
    rows = logits[valid] if logits.dim() == 3 else logits  # (N, V)
    logp, entropy = kernels.token_logprobs(rows, y, temperature=opts.temperature, impl=opts.impl)  # (N,)
    extras = dict(
        ref_logp=ref_logp, sampler_logp=sampler_logp, loss_scale=loss_scale, token_scale=token_scale
    )
    return _finish(logp, entropy, old_logp, advantages, token_mask, response_mask, opts, **extras)


def _finish(logp, entropy, old_logp, advantages, token_mask, response_mask, opts, **extras):
    cfg = opts.objective
    ent = scatter_rows(entropy, response_mask) if cfg.entropy_mode == "exact" else None
    return policy_loss(
        scatter_rows(logp, response_mask),
        old_logp,
        advantages,
        token_mask,
        response_mask,
        cfg,
        entropy=ent,
        **extras,
    )


def tgf_token_mask(
    stats, response_mask: torch.Tensor, ratio: float = 0.4, *, kind: str = "k3", impl: str = "auto"
) -> torch.Tensor:
    """TGF (docs/algorithm.md section 2): [B, T] bool, the top ceil(ratio * L_i) valid tokens of each row by
    visual dependency (kind "k3" as released, "kl" exact as in the paper), ties to the lower
    position. stats: a kernels.TokenStats of [N] rows at the valid positions, or of [B, T]."""
    scores = dependency_scores(stats, kind)
    if scores.dim() == 1:
        scores = scatter_rows(scores, response_mask)
    return kernels.topk_token_mask(scores, response_mask, ratio, impl=impl)


# ---------------------------------------------------------------------------------------------
# The no-grad scoring pass.


def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    opts: LossOptions = _DEFAULT,
    *,
    masked: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row statistics of [N, H] hidden rows predicting the [N] `labels` under the lm_head
    weight [V, H]: {"old_logp", "entropy"}, and with the [N, H] rows of the perturbed pass also
    {"kl", "k3"} from one read of the weight. [N] float32 each (no grad)."""
    t, impl = opts.temperature, opts.impl
    if masked is None:
        logp, ent = kernels.token_logprobs_linear(hidden, weight, labels, temperature=t, impl=impl)
        return {"old_logp": logp, "entropy": ent}
    st = kernels.token_dependency_linear(hidden, masked, weight, labels, temperature=t, impl=impl)
    return {"old_logp": st.logp_clean, "entropy": st.entropy, "kl": st.kl, "k3": st.k3}


@torch.no_grad()
def score(
    hf,
    traj: Trajectory,
    opts: LossOptions,
    *,
    ids,
    micro: int,
    dependency: bool,
    ref=None,
    packed: bool = False,
    max_tokens: int | None = None,
    reduce=None,
) -> Trajectory:
    """Fill traj.old_logp and traj.entropy (with dependency=True also traj.kl and traj.k3, from the
    clean and the perturbed pass; with a reference model traj.ref_logp), micro rows at a time.

    hf / ref: models whose lm_head is a `vppo.model.FusedLMHead`; ids: `vppo.tokens.TokenIds`.
    Returns traj, its fields [B, R] float32 on the CPU with zeros at invalid positions.
    packed: each micro-batch's rows as one packed sequence (`vppo.packing`); max_tokens: micro-batches
    filled by token count instead (`vppo.packing.micro_batches`, `reduce` agrees on their number).
    """

    def rows_of(model, inputs, mask):  # (N, H) hidden states predicting the valid response tokens
        if packed:
            return packing.packed_hidden(model, packing.pack(model, inputs, mask, traj.prompt_len))
        h = response_hidden(model, inputs, traj.prompt_len)
        return h[mask.to(h.device)]

    parts: dict[str, list[torch.Tensor]] = {}
    for idx in packing.micro_batches(traj, micro, max_tokens, packed=packed, reduce=reduce):
        part = traj.select(idx)
        inputs = model_inputs(part, vision_ids=ids.vision, pad_id=ids.pad)
        h = rows_of(hf, inputs, part.response_mask)
        y = part.responses.to(h.device)[part.response_mask.to(h.device)]  # (N,) response tokens only
        hm = None
        if dependency:
            masked = model_inputs(part, masked=True, vision_ids=ids.vision, pad_id=ids.pad)
            hm = rows_of(hf, masked, part.response_mask)
        vals = hf.lm_head(h, partial(token_stats, labels=y, opts=opts, masked=hm))
        if ref is not None:
            hr = rows_of(ref, inputs, part.response_mask)
            vals["ref_logp"] = ref.lm_head(hr, partial(token_stats, labels=y, opts=opts))["old_logp"]
        for k, v in vals.items():
            parts.setdefault(k, []).append(v.float().cpu())
    for k, v in parts.items():
        setattr(traj, k, scatter_rows(torch.cat(v), traj.response_mask))
    return traj
