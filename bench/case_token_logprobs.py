"""Cases token_logprobs (forward) and token_logprobs_fwd_bwd: log p_y and entropy from logits
[N, V], and their gradient w.r.t. the logits.

Minimum traffic, forward: the logits of kept rows read once, labels read, 2 x fp32 written.
Forward + backward: the logits read twice (forward, then the backward's recompute: the forward
keeps only per-row statistics) and d logits written once. Liger's cross-entropy with
reduction="none" gives -log p_y only (no entropy): its figures are for less work.
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
    kept,
    labels_for,
    liger_runnable,
    not_written,
    randn,
    triton_runnable,
)

T = 1.0  # the released recipe's temperature (Liger's cross-entropy has none)


def make_inputs(s: Shape, device):
    return dict(
        logits=randn((s.N, s.V), DTYPES[s.dtype], device, scale=3.0, seed=1),
        labels=labels_for(s.N, s.V, device),
    )


def _liger_fwd(z, y):
    from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

    return -LigerCrossEntropyFunction.apply(z, y, None, -100, 0.0, 0.0, "none")[0]


def providers(backward: bool):
    def wrap(make, leaf_key="logits"):
        def build(x):
            if not backward:
                return make(x["logits"], x)
            leaf = x["logits"].detach().clone().requires_grad_(True)  # Liger writes into its input
            return fwd_bwd(make(leaf, x), [leaf])

        return build

    def naive(z, x):
        return lambda: R.token_logprobs(z, x["labels"], temperature=T)

    def comp(z, x):
        return call_compiled(
            compiled(R.token_logprobs, f"token_logprobs{backward}"), z, x["labels"], temperature=T
        )

    def torch_(z, x):
        return not_written(lambda: kernels.token_logprobs(z, x["labels"], temperature=T, impl="torch"))

    def triton_(z, x):
        triton_runnable(z)
        return not_written(lambda: kernels.token_logprobs(z, x["labels"], temperature=T, impl="triton"))

    def liger(z, x):
        liger_runnable(z)
        return lambda: _liger_fwd(z, x["labels"])

    return dict(
        naive=wrap(naive), compile=wrap(comp), torch=wrap(torch_), triton=wrap(triton_), liger=wrap(liger)
    )


def min_fwd(s: Shape) -> int:
    return kept(s.N) * s.V * s.elt + 8 * s.N + 2 * 4 * s.N


def min_fwd_bwd(s: Shape) -> int:
    return min_fwd(s) + kept(s.N) * s.V * s.elt + s.N * s.V * s.elt + 2 * 4 * s.N  # re-read, d logits, d outs


def _case(backward: bool) -> Case:
    return Case(
        name="token_logprobs_fwd_bwd" if backward else "token_logprobs",
        doc=("forward + backward" if backward else "forward") + " of (log p_y, entropy) from logits [N, V]",
        make_inputs=make_inputs,
        providers=providers(backward),
        cpu_shapes=[
            Shape(N=32, **QWEN),
            Shape(N=128, **QWEN),
            Shape(N=1024, **SMALL),
            Shape(N=2048, **QWEN, memory_only=True),
        ],
        gpu_shapes=[Shape(N=n, **QWEN) for n in (1024, 4096, 8192)] + [Shape(N=8192, **SMALL)],
        tiny_shapes=[Shape(N=8, H=16, V=300)],
        traffic_shapes=[Shape(N=16, **QWEN), Shape(N=16, **SMALL)],
        min_bytes=min_fwd_bwd if backward else min_fwd,
        backward=backward,
        notes=dict(liger="Liger cross-entropy (reduction none): log p_y only, no entropy"),
    )


CASES = [_case(False), _case(True)]
