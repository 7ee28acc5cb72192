"""Case vppo_step: one VPPO micro-batch loss step from hidden states, forward and backward.

naive: the two no-grad lm_head passes materialize [B, T, V] logits for the clean and masked
image, kernels.reference.token_dependency gives the dependency, kernels.reference.topk_token_mask
the TGF mask, then the policy pass materializes logits again and vppo.objective.reference_loss
computes the loss; backward to the hidden states and the lm_head weight.
fused (providers torch / triton): kernels.token_dependency_linear, vppo.loss.tgf_token_mask and
vppo.loss.vppo_loss_linear with the same impl, never building [N, V].
Both return (d hidden, d weight). Minimum traffic: the three hidden states and the weight read
once, d hidden and d weight written once. Useful FLOPs: 2 GEMMs (dependency) + 3 (the policy
forward, d hidden and d weight) of 2 N H V each.
"""

from __future__ import annotations

import torch

from kernels import reference as R

from .cases import (
    DTYPES,
    QWEN,
    Case,
    Shape,
    Unavailable,
    call_compiled,
    compiled,
    gemm_flops,
    not_written,
    randn,
    triton_runnable,
)

RATIO = 0.4


def make_inputs(s: Shape, device):
    dt = DTYPES[s.dtype]
    b, t = s.B, s.T
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(t // 2, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]  # (B, T) right-padded responses
    labels = torch.randint(0, s.V, (b, t), generator=g).masked_fill(~mask, -100)
    adv = torch.randn(b, generator=g)
    return dict(
        policy=randn((b, t, s.H), dt, device, seed=1),  # the trained pass's hidden states
        clean=randn((b, t, s.H), dt, device, seed=1),  # old policy, clean image (same weights here)
        masked=randn((b, t, s.H), dt, device, seed=3),  # old policy, masked image
        weight=randn((s.V, s.H), dt, device, scale=s.H**-0.5, seed=2),
        labels=labels.to(device),
        mask=mask.to(device),
        adv=adv.to(device),
        noise=(0.1 * torch.randn(b, t, generator=g)).to(device),  # old_logp != logp: the clip is active
    )


def naive_loss(h, w, clean, masked, labels, mask, adv, noise):
    from vppo.objective import reference_loss

    with torch.no_grad():
        b, t, _ = clean.shape
        y = labels.masked_fill(~mask, -100).reshape(-1)
        stats = R.token_dependency(
            (clean @ w.T).flatten(0, 1), (masked @ w.T).flatten(0, 1), y
        )  # (B T, V) x2
        token_mask = R.topk_token_mask(stats.k3.view(b, t), mask, RATIO)
        old_logp = stats.logp_clean.view(b, t) + noise
    return reference_loss(h @ w.T, labels, old_logp, adv, token_mask, mask)[0]  # logits (B, T, V)


def fused_loss(h, w, clean, masked, labels, mask, adv, noise, impl):
    import kernels
    from vppo import loss as vl

    with torch.no_grad():
        y = labels[mask]
        stats = kernels.token_dependency_linear(clean[mask], masked[mask], w, y, impl=impl)  # (N,) each
        token_mask = vl.tgf_token_mask(stats, mask, RATIO, impl=impl)
        old_logp = vl.scatter_rows(stats.logp_clean, mask) + noise
    return vl.vppo_loss_linear(h, w, labels, old_logp, adv, token_mask, mask, vl.LossOptions(impl=impl))[0]


def _provider(loss_fn):
    def build(x):
        h = x["policy"].detach().clone().requires_grad_(True)
        w = x["weight"].detach().requires_grad_(True)
        args = (x["clean"], x["masked"], x["labels"], x["mask"], x["adv"], x["noise"])
        fwd = loss_fn(h, w, args)

        def step():
            return torch.autograd.grad(fwd(), [h, w])

        return step

    return build


def _naive(h, w, args):
    return lambda: naive_loss(h, w, *args)


def _compile(h, w, args):
    run = call_compiled(compiled(naive_loss, "vppo_step"), h, w, *args)
    return run


def _fused(impl):
    def make(h, w, args):
        if impl == "triton":
            triton_runnable(h)
        return not_written(lambda: fused_loss(h, w, *args, impl=impl))

    return make


def _liger(x):
    raise Unavailable("Liger's GRPO losses have no visual dependency or top-k token mask")


def min_bytes(s: Shape) -> int:
    n = s.B * s.T
    return (3 * n * s.H + s.V * s.H) * s.elt + (n * s.H + s.V * s.H) * s.elt + 8 * n


def _s(b, t, v, **kw):
    return Shape(N=0, B=b, T=t, H=QWEN["H"], V=v, **kw)


CASES = [
    Case(
        name="vppo_step",
        doc="VPPO micro-batch step from hidden states: lm_head + dependency + top-k + loss + backward",
        make_inputs=make_inputs,
        providers=dict(
            naive=_provider(_naive),
            compile=_provider(_compile),
            torch=_provider(_fused("torch")),
            triton=_provider(_fused("triton")),
            liger=_liger,
        ),
        # the same N at two vocabularies (same H): the fused step's memory must not grow with V
        cpu_shapes=[_s(2, 32, 4096), _s(2, 32, QWEN["V"])],
        gpu_shapes=[_s(4, 1024, 4096), _s(4, 1024, QWEN["V"]), _s(8, 1024, QWEN["V"])],
        tiny_shapes=[Shape(N=0, B=2, T=6, H=16, V=300)],
        traffic_shapes=[Shape(N=0, B=2, T=32, H=256, V=2000)],
        min_bytes=min_bytes,
        flops=lambda s: 5 * gemm_flops(s.B * s.T, s.H, s.V),
        backward=True,
    )
]
