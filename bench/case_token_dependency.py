"""Case token_dependency: the five per-token statistics from clean and masked logits [N, V].

Minimum traffic: both logits rows of each kept (not ignored) row read once, labels read once,
5 x fp32 written per row.
"""

from __future__ import annotations

import kernels
from kernels import reference as R

from .cases import (
    DTYPES,
    QWEN,
    SMALL,
    Case,
    Shape,
    Unavailable,
    call_compiled,
    compiled,
    kept,
    labels_for,
    not_written,
    randn,
    triton_runnable,
)

T = 1.3  # temperature != 1 so that no provider can skip the division


def make_inputs(s: Shape, device):
    dtype = DTYPES[s.dtype]
    return dict(
        clean=randn((s.N, s.V), dtype, device, scale=3.0, seed=1),
        masked=randn((s.N, s.V), dtype, device, scale=3.0, seed=2),
        labels=labels_for(s.N, s.V, device),
    )


def _naive(x):
    return lambda: R.token_dependency(x["clean"], x["masked"], x["labels"], temperature=T)


def _compile(x):
    return call_compiled(
        compiled(R.token_dependency, "token_dependency"), x["clean"], x["masked"], x["labels"], temperature=T
    )


def _torch(x):
    return not_written(
        lambda: kernels.token_dependency(x["clean"], x["masked"], x["labels"], temperature=T, impl="torch")
    )


def _triton(x):
    triton_runnable(x["clean"])
    return not_written(
        lambda: kernels.token_dependency(x["clean"], x["masked"], x["labels"], temperature=T, impl="triton")
    )


def _liger(x):
    raise Unavailable("Liger has no KL / entropy between two logits tensors (its kl_div takes log-probs)")


def min_bytes(s: Shape) -> int:
    return 2 * kept(s.N) * s.V * s.elt + 8 * s.N + 5 * 4 * s.N


CASES = [
    Case(
        name="token_dependency",
        doc="logp_clean, logp_masked, KL, k3, entropy from two [N, V] logits (no grad)",
        make_inputs=make_inputs,
        providers=dict(naive=_naive, compile=_compile, torch=_torch, triton=_triton, liger=_liger),
        cpu_shapes=[
            Shape(N=32, **QWEN),
            Shape(N=128, **QWEN),
            Shape(N=1024, **SMALL),
            Shape(N=2048, **QWEN, memory_only=True),
        ],
        gpu_shapes=[Shape(N=n, **QWEN) for n in (1024, 4096, 8192)] + [Shape(N=8192, **SMALL)],
        tiny_shapes=[Shape(N=8, H=16, V=300)],
        traffic_shapes=[Shape(N=16, **QWEN), Shape(N=16, **SMALL)],
        min_bytes=min_bytes,
    )
]
