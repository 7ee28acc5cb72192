"""Case token_dependency_linear: token_dependency of clean / masked hidden [N, H] times the
lm_head weight [V, H], no grad, never building the [N, V] logits in the fused providers.

Minimum traffic: both hidden states and the weight read once, labels read, 5 x fp32 written.
Useful FLOPs: 2 GEMMs of 2 N H V (compute-bound at the Qwen shape).
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
    gemm_flops,
    labels_for,
    not_written,
    randn,
    triton_runnable,
)

T = 1.3


def make_inputs(s: Shape, device):
    dt = DTYPES[s.dtype]
    return dict(
        clean=randn((s.N, s.H), dt, device, seed=1),
        masked=randn((s.N, s.H), dt, device, seed=3),
        weight=randn((s.V, s.H), dt, device, scale=s.H**-0.5, seed=2),
        labels=labels_for(s.N, s.V, device),
    )


def _args(x):
    return x["clean"], x["masked"], x["weight"], x["labels"]


def _naive(x):
    return lambda: R.token_dependency_linear(*_args(x), temperature=T)


def _compile(x):
    return call_compiled(
        compiled(R.token_dependency_linear, "token_dependency_linear"), *_args(x), temperature=T
    )


def _torch(x):
    return not_written(lambda: kernels.token_dependency_linear(*_args(x), temperature=T, impl="torch"))


def _triton(x):
    triton_runnable(x["clean"])
    return not_written(lambda: kernels.token_dependency_linear(*_args(x), temperature=T, impl="triton"))


def _liger(x):
    raise Unavailable(
        "Liger has no fused linear KL / entropy between two hidden states (its fused linear "
        "KL/JSD losses compare a student to a teacher with separate weights and reduce over rows)"
    )


def min_bytes(s: Shape) -> int:
    return (2 * s.N * s.H + s.V * s.H) * s.elt + 8 * s.N + 5 * 4 * s.N


CASES = [
    Case(
        name="token_dependency_linear",
        doc="token_dependency of clean / masked hidden [N, H] @ weight[V, H].T (no grad)",
        make_inputs=make_inputs,
        providers=dict(naive=_naive, compile=_compile, torch=_torch, triton=_triton, liger=_liger),
        cpu_shapes=[
            Shape(N=64, **QWEN),  # on CPU a call costs mostly the [V, H] weight passes, whatever N
            Shape(N=512, **SMALL),
        ],
        gpu_shapes=[Shape(N=n, **QWEN) for n in (1024, 4096, 8192)] + [Shape(N=8192, **SMALL)],
        tiny_shapes=[Shape(N=8, H=16, V=300)],
        traffic_shapes=[Shape(N=64, H=256, V=2000)],
        min_bytes=min_bytes,
        flops=lambda s: 2 * gemm_flops(s.N, s.H, s.V),
    )
]
