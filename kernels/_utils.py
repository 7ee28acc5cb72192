"""Shared plumbing of the kernels package: input checks, impl dispatch, top-k counts.

Nothing here knows about RL. Every public kernel validates through these helpers so that
bad input raises one kind of error (ValueError naming the argument) whatever the impl.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch

IGNORE_INDEX = -100
IMPLS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The torch impls never hold more than this many bytes of [rows, V] temporaries (bench's
# memory targets use the same bound).
CHUNK_BYTES = 256 * 1024 * 1024
# Interpreter trap (triton issue 11584): tl.dot of two bf16 operands is garbage under
# TRITON_INTERPRET=1, so kernels upcast dot operands to fp32 when this is set.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


class TokenStats(NamedTuple):
    """Per-token statistics of token_dependency*, each [N] float32."""

    logp_clean: torch.Tensor
    logp_masked: torch.Tensor
    kl: torch.Tensor
    k3: torch.Tensor
    entropy: torch.Tensor


def resolve_impl(impl: str, t: torch.Tensor) -> str:
    """Map impl="auto" | "triton" | "torch" to the implementation that will run on t."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if t.is_cuda else "torch"
    if impl == "triton" and not t.is_cuda and not INTERPRET:
        raise RuntimeError(
            "impl='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before importing kernels, move the tensors to a GPU, or use impl='torch'"
        )
    return impl


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride {t.stride(-1)})")


def check_same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor, *, shape: bool = True) -> None:
    if shape and t.shape != ref.shape:
        raise ValueError(f"{name} shape {tuple(t.shape)} does not match {ref_name} shape {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} dtype {t.dtype} does not match {ref_name} dtype {ref.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} device {t.device} does not match {ref_name} device {ref.device}")


def check_labels(labels: torch.Tensor, n: int, v: int, device: torch.device) -> None:
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},), got {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be int64 (or int32), got {labels.dtype}")
    if labels.device != device:
        raise ValueError(f"labels device {labels.device} does not match the logits device {device}")
    if n:
        bad = ((labels < 0) & (labels != IGNORE_INDEX)) | (labels >= v)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"labels out of range: labels[{i}] = {int(labels[i])}, expected 0 <= label < {v} "
                f"or {IGNORE_INDEX} (ignored)"
            )


def check_temperature(temperature: float) -> float:
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return t


def check_ratio(ratio: float) -> float:
    r = float(ratio)
    if not (0.0 < r <= 1.0):
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    return r


def check_topk_inputs(scores: torch.Tensor, response_mask: torch.Tensor, ratio: float):
    """Checks of topk_token_mask's arguments; returns (valid [B, T] bool, k [B] int64)."""
    check_float("scores", scores, 2)
    if not isinstance(response_mask, torch.Tensor) or response_mask.shape != scores.shape:
        raise ValueError(
            f"response_mask must be a tensor of the scores shape {tuple(scores.shape)}, "
            f"got {getattr(response_mask, 'shape', type(response_mask).__name__)}"
        )
    if response_mask.device != scores.device:
        raise ValueError(
            f"response_mask device {response_mask.device} does not match scores device {scores.device}"
        )
    if response_mask.dtype.is_floating_point or response_mask.dtype.is_complex:
        raise ValueError(f"response_mask must be bool or integer, got {response_mask.dtype}")
    ratio = check_ratio(ratio)
    valid = response_mask.bool()
    if bool((torch.isnan(scores) & valid).any()):
        raise ValueError("scores contains NaN at a valid position")
    return valid, topk_counts(valid.sum(-1), ratio)  # k computed once so every impl agrees


def topk_counts(lengths: torch.Tensor, ratio: float) -> torch.Tensor:
    """k = ceil(ratio * L) per row, computed in float64 with a guard against products such as
    0.7 * 10 = 7.000000000000001 rounding up to one token too many. int64, same device."""
    k = torch.ceil(lengths.to(torch.float64) * ratio - 1e-9).to(torch.int64)
    return torch.minimum(k.clamp_min(0), lengths.to(torch.int64))
