"""The VPPO micro-batch loss through the fused kernels: the path the training loop calls.

Only the valid response positions go through the vocabulary-wide kernels: their rows are
gathered ([N, H] hidden states or [N, V] logits), `kernels.token_logprobs_linear` /
`kernels.token_logprobs` give log p_y and the exact entropy per row, the results are scattered
back to [B, T] and `vppo.objective.policy_loss` does the rest. With the linear entry point the
[N, V] logits never exist in memory, forward or backward.

`vppo.objective.reference_loss` computes the same loss from materialized logits; the gradient
checks in tests/test_loss.py compare the two.
"""

from __future__ import annotations

import torch

import kernels
from vppo.objective import LossConfig, dependency_scores, policy_loss

_DEFAULT = LossConfig()  # the released recipe


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
    cfg: LossConfig = _DEFAULT,
    *,
    temperature: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """VPPO micro-batch loss from the last hidden states and the lm_head weight.

    hidden: [B, T, H] hidden states at the positions that predict each response token, or the
    [N, H] rows already gathered at the N valid positions of response_mask (row-major order);
    weight: [V, H] lm_head weight (same dtype); labels: [B, T] sampled token ids (any value at
    invalid positions); old_logp, advantages, token_mask, response_mask, cfg, ref_logp,
    loss_scale: as in `vppo.objective.policy_loss`. Differentiable w.r.t. hidden and weight;
    returns (scalar loss, stats).
    """
    valid, y = _check_common(labels, response_mask, "hidden", hidden)
    rows = hidden[valid] if hidden.dim() == 3 else hidden  # (N, H)
    logp, entropy = kernels.token_logprobs_linear(rows, weight, y, temperature=temperature, impl=impl)  # (N,)
    return _finish(logp, entropy, old_logp, advantages, token_mask, response_mask, cfg, ref_logp, loss_scale)


def vppo_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    token_mask: torch.Tensor | None,
    response_mask: torch.Tensor,
    cfg: LossConfig = _DEFAULT,
    *,
    temperature: float = 1.0,
    ref_logp: torch.Tensor | None = None,
    loss_scale: float = 1.0,
    impl: str = "auto",
) -> tuple[torch.Tensor, dict[str, float]]:
    """VPPO micro-batch loss from logits [B, T, V] (or the gathered [N, V] valid rows) through
    `kernels.token_logprobs`; otherwise as `vppo_loss_linear`. Differentiable w.r.t. logits."""
    valid, y = _check_common(labels, response_mask, "logits", logits)
    rows = logits[valid] if logits.dim() == 3 else logits  # (N, V)
    logp, entropy = kernels.token_logprobs(rows, y, temperature=temperature, impl=impl)  # (N,)
    return _finish(logp, entropy, old_logp, advantages, token_mask, response_mask, cfg, ref_logp, loss_scale)


def _finish(logp, entropy, old_logp, advantages, token_mask, response_mask, cfg, ref_logp, loss_scale):
    ent = scatter_rows(entropy, response_mask) if cfg.entropy_mode == "exact" else None
    return policy_loss(
        scatter_rows(logp, response_mask),
        old_logp,
        advantages,
        token_mask,
        response_mask,
        cfg,
        entropy=ent,
        ref_logp=ref_logp,
        loss_scale=loss_scale,
    )


def tgf_token_mask(
    stats, response_mask: torch.Tensor, ratio: float = 0.4, *, kind: str = "k3", impl: str = "auto"
) -> torch.Tensor:
    """TGF (vppo.md section 2): [B, T] bool, the top ceil(ratio * L_i) valid tokens of each row by
    visual dependency (kind "k3" as released, "kl" exact as in the paper), ties to the lower
    position. stats: a kernels.TokenStats of [N] rows at the valid positions, or of [B, T]."""
    scores = dependency_scores(stats, kind)
    if scores.dim() == 1:
        scores = scatter_rows(scores, response_mask)
    return kernels.topk_token_mask(scores, response_mask, ratio, impl=impl)
