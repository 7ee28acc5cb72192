"""Naive PyTorch definitions of every public kernel (docs/kernels.md).

Readable, materializes everything, and is the single source of truth that tests and
benchmarks compare against. Statistics are float32 from the logits divided by temperature.
"""

from __future__ import annotations

import torch

from ._utils import (
    IGNORE_INDEX,
    TokenStats,
    check_float,
    check_labels,
    check_same,
    check_temperature,
    check_topk_inputs,
)


def _gather(logp: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logp.gather(-1, labels.clamp_min(0).long()[:, None]).squeeze(-1)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    # -sum p log p with 0 log 0 = 0 (padded -inf columns), written so that autograd
    # never multiplies a zero gradient by -inf.
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def token_dependency(clean_logits, masked_logits, labels, *, temperature: float = 1.0) -> TokenStats:
    """Per-token visual dependency from two [N, V] logits tensors (see docs/kernels.md)."""
    check_float("clean_logits", clean_logits, 2)
    check_float("masked_logits", masked_logits, 2)
    check_same("masked_logits", masked_logits, "clean_logits", clean_logits)
    n, v = clean_logits.shape
    check_labels(labels, n, v, clean_logits.device)
    t = check_temperature(temperature)
    with torch.no_grad():
        logp = torch.log_softmax(clean_logits.float() / t, dim=-1)
        logq = torch.log_softmax(masked_logits.float() / t, dim=-1)
        p = logp.exp()
        diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
        kl = (p * diff).sum(-1)
        entropy = _entropy(logp)
        logp_y, logq_y = _gather(logp, labels), _gather(logq, labels)
        d = (logq_y - logp_y).clamp(-20, 20)
        k3 = (d.exp() - d - 1).clamp(0, 10)
        keep = labels != IGNORE_INDEX
        z = torch.zeros_like(kl)
        return TokenStats(*(torch.where(keep, x, z) for x in (logp_y, logq_y, kl, k3, entropy)))


def token_dependency_linear(
    clean_hidden, masked_hidden, weight, labels, *, temperature: float = 1.0
) -> TokenStats:
    """token_dependency of (hidden @ weight.T) for both hidden states; logits in the input dtype."""
    check_float("clean_hidden", clean_hidden, 2)
    check_float("masked_hidden", masked_hidden, 2)
    check_float("weight", weight, 2)
    check_same("masked_hidden", masked_hidden, "clean_hidden", clean_hidden)
    check_same("weight", weight, "clean_hidden", clean_hidden, shape=False)
    if weight.shape[1] != clean_hidden.shape[1]:
        raise ValueError(
            f"weight shape {tuple(weight.shape)} does not match hidden size {clean_hidden.shape[1]}"
        )
    with torch.no_grad():
        return token_dependency(
            clean_hidden @ weight.T, masked_hidden @ weight.T, labels, temperature=temperature
        )


def token_logprobs(logits, labels, *, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_y, entropy), each [N] float32, differentiable w.r.t. logits."""
    check_float("logits", logits, 2)
    n, v = logits.shape
    check_labels(labels, n, v, logits.device)
    t = check_temperature(temperature)
    logp = torch.log_softmax(logits.float() / t, dim=-1)
    keep = labels != IGNORE_INDEX
    zero = torch.zeros((), device=logits.device)
    return torch.where(keep, _gather(logp, labels), zero), torch.where(keep, _entropy(logp), zero)


def token_logprobs_linear(hidden, weight, labels, *, temperature: float = 1.0):
    """token_logprobs of hidden @ weight.T (logits in the input dtype), differentiable w.r.t. both."""
    check_float("hidden", hidden, 2)
    check_float("weight", weight, 2)
    check_same("weight", weight, "hidden", hidden, shape=False)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden.shape[1]}")
    return token_logprobs(hidden @ weight.T, labels, temperature=temperature)


def topk_token_mask(scores, response_mask, ratio: float) -> torch.Tensor:
    """[B, T] bool: in each row the ceil(ratio * L) valid positions with the largest scores,
    ties to the lower position; invalid positions False."""
    valid, counts = check_topk_inputs(scores, response_mask, ratio)
    out = torch.zeros_like(valid)
    for b in range(scores.shape[0]):
        idx = valid[b].nonzero().squeeze(-1)
        order = torch.sort(scores[b, idx].float(), descending=True, stable=True).indices
        out[b, idx[order[: int(counts[b])]]] = True
    return out
