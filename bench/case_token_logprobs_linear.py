"""Case token_logprobs_linear: log p_y and entropy of hidden [N, H] @ weight[V, H].T, forward +
backward (d hidden, d weight), never building the [N, V] logits in the fused providers.

Minimum traffic: hidden and weight read once, labels read, 2 x fp32 written, d hidden and d
weight written once (d weight in the weight's dtype). Useful FLOPs: 4 GEMMs of 2 N H V
(forward, recompute, d hidden, d weight). Liger's fused linear cross-entropy (reduction "none")
gives -log p_y only (no entropy).
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
    call_compiled,
    compiled,
    fwd_bwd,
    gemm_flops,
    labels_for,
    liger_runnable,
    not_written,
    randn,
    triton_runnable,
)

T = 1.0


def make_inputs(s: Shape, device):
    dt = DTYPES[s.dtype]
    return dict(
        hidden=randn((s.N, s.H), dt, device, seed=1),
        weight=randn((s.V, s.H), dt, device, scale=s.H**-0.5, seed=2),
        labels=labels_for(s.N, s.V, device),
    )


def _provider(make):
    def build(x):
        h = x["hidden"].detach().clone().requires_grad_(True)
        w = x["weight"].detach().requires_grad_(True)
        return fwd_bwd(make(h, w, x["labels"]), [h, w])

    return build


def _naive(h, w, y):
    return lambda: R.token_logprobs_linear(h, w, y, temperature=T)


def _compile(h, w, y):
    return call_compiled(compiled(R.token_logprobs_linear, "token_logprobs_linear"), h, w, y, temperature=T)


def _torch(h, w, y):
    return not_written(lambda: kernels.token_logprobs_linear(h, w, y, temperature=T, impl="torch"))


def _triton(h, w, y):
    triton_runnable(h)
    return not_written(lambda: kernels.token_logprobs_linear(h, w, y, temperature=T, impl="triton"))


def _liger(h, w, y):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    liger_runnable(h)
    return lambda: -LigerFusedLinearCrossEntropyFunction.apply(h, w, y, None, None, -100, 0.0, 0.0, "none")[0]


def min_bytes(s: Shape) -> int:
    return 2 * (s.N * s.H + s.V * s.H) * s.elt + 8 * s.N + 4 * 4 * s.N


CASES = [
    Case(
        name="token_logprobs_linear",
        doc="forward + backward of (log p_y, entropy) from hidden [N, H] and lm_head weight [V, H]",
        make_inputs=make_inputs,
        providers={
            k: _provider(f)
            for k, f in dict(
                naive=_naive, compile=_compile, torch=_torch, triton=_triton, liger=_liger
            ).items()
        },
        cpu_shapes=[
            Shape(N=64, **QWEN),  # on CPU a call costs mostly the [V, H] weight passes, whatever N
            Shape(N=512, **SMALL),
        ],
        gpu_shapes=[Shape(N=n, **QWEN) for n in (1024, 4096, 8192)] + [Shape(N=8192, **SMALL)],
        tiny_shapes=[Shape(N=8, H=16, V=300)],
        traffic_shapes=[Shape(N=64, H=256, V=2000)],
        min_bytes=min_bytes,
        flops=lambda s: 4 * gemm_flops(s.N, s.H, s.V),
        backward=True,
        notes=dict(liger="Liger fused linear cross-entropy (reduction none): log p_y only, no entropy"),
    )
]
