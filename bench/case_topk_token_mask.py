"""Case topk_token_mask: the TGF mask, the top ceil(0.4 L) valid positions of each row of [B, T]
scores. Reads only [B, T] scalars, never the logits.

Minimum traffic: scores and mask read once, the bool mask written once.
"""

from __future__ import annotations

import torch

import kernels
from kernels import reference as R

from .cases import DTYPES, Case, Shape, Unavailable, call_compiled, compiled, not_written, triton_runnable

RATIO = 0.4


def make_inputs(s: Shape, device):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(s.B, s.T, generator=g).to(DTYPES[s.dtype])
    lengths = torch.randint(s.T // 2, s.T + 1, (s.B,), generator=g)
    mask = torch.arange(s.T)[None, :] < lengths[:, None]  # right-padded responses
    return dict(scores=scores.to(device), mask=mask.to(device))


def _naive(x):
    return lambda: R.topk_token_mask(x["scores"], x["mask"], RATIO)


def _compile(x):
    return call_compiled(compiled(R.topk_token_mask, "topk_token_mask"), x["scores"], x["mask"], RATIO)


def _torch(x):
    return not_written(lambda: kernels.topk_token_mask(x["scores"], x["mask"], RATIO, impl="torch"))


def _triton(x):
    triton_runnable(x["scores"])
    return not_written(lambda: kernels.topk_token_mask(x["scores"], x["mask"], RATIO, impl="triton"))


def _liger(x):
    raise Unavailable("Liger has no per-row top-k selection")


def min_bytes(s: Shape) -> int:
    return s.B * s.T * (s.elt + 1 + 1)


def _s(b, t, **kw):
    return Shape(N=0, B=b, T=t, dtype="float32", **kw)


CASES = [
    Case(
        name="topk_token_mask",
        doc="[B, T] bool: top ceil(0.4 L) valid positions per row by score (TGF)",
        make_inputs=make_inputs,
        providers=dict(naive=_naive, compile=_compile, torch=_torch, triton=_triton, liger=_liger),
        cpu_shapes=[_s(16, 2048), _s(128, 2048), _s(8, 20000)],
        gpu_shapes=[_s(128, 2048), _s(512, 2048), _s(16, 20000)],
        tiny_shapes=[_s(3, 50)],
        traffic_shapes=[_s(4, 2048), _s(2, 5000)],
        min_bytes=min_bytes,
    )
]
