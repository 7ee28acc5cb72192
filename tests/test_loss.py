"""Gradient checks of the whole VPPO micro-batch loss: vppo.loss (through the fused kernels,
Triton in the interpreter and the chunked torch impl) against vppo.objective.reference_loss
(naive materialized logits).

Three-way rule (docs/kernels.md section 4): with ref32 the reference loss on fp32 copies of the
inputs, the kernel path's error against ref32 is no worse than the same-dtype reference's error plus
TOL[dtype], for the loss value and for every gradient. In fp32 the same-dtype reference is
ref32 itself, so the kernel path must match it to TOL[float32]. Errors are relative RMS errors.
"""

import math

import pytest
import torch

import kernels
from kernels import reference as kref
from vppo.loss import LossOptions, scatter_rows, tgf_token_mask, vppo_loss, vppo_loss_linear
from vppo.objective import LossConfig, reference_loss

# one table: relative RMS error allowed beyond the same-dtype PyTorch error
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8}

B, T, V, H = 4, 6, 37, 16  # V not a multiple of any block
LENGTHS = [6, 3, 0, 1]  # a full row, a padded row, an empty row, a length-1 row
# log(pi / pi_old) per token: below 1 - 0.2, inside, inside, above 1 + 0.28, above the dual clip 3;
# every value at least 0.1 from the boundaries log 0.8, log 1.28, log 3 so that rounding in bf16
# cannot move a token across a clip boundary
OFFSETS = torch.tensor([-0.6, -0.1, 0.1, 0.5, 1.5])

CASES = {
    # name: (LossConfig, temperature)
    "nll": (LossConfig(), 0.7),
    "exact": (LossConfig(entropy_mode="exact"), 0.7),
    "exact-seq-kl": (LossConfig(entropy_mode="exact", loss_agg="seq", kl_coef=0.05, kl_estimator="k3"), 1.0),
    "tis": (LossConfig(tis_cap=2.0), 1.0),  # truncated importance sampling vs a sampling engine
}


def _batch(path: str, dtype: torch.dtype, case: str, seed: int = 0):
    """Leaves (logits or hidden + weight, in dtype) and the loss arguments, built so that the
    batch has tokens in every clip regime, advantages of both signs and ignored positions."""
    g = torch.Generator().manual_seed(seed)
    cfg, temp = CASES[case]
    valid = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]  # (B, T)
    # labels avoid the padded (-inf) vocabulary columns of the logits path
    labels = torch.where(valid, torch.randint(0, V - 3, (B, T), generator=g), kernels.IGNORE_INDEX)
    if path == "linear":
        leaves = {
            "hidden": torch.randn(B, T, H, generator=g).to(dtype),
            "weight": (0.5 * torch.randn(V, H, generator=g)).to(dtype),
        }
        logits32 = leaves["hidden"].float() @ leaves["weight"].float().T
    else:
        z = 2 * torch.randn(B, T, V, generator=g)
        z[..., -3:] = -math.inf  # padded vocabulary columns
        leaves = {"logits": z.to(dtype)}
        logits32 = leaves["logits"].float()
    logp32 = torch.log_softmax(logits32 / temp, -1).gather(-1, labels.clamp_min(0)[..., None]).squeeze(-1)
    advantages = torch.tensor([1.3, -0.7, 0.4, -1.1])
    token_mask = kref.topk_token_mask(torch.rand(B, T, generator=g), valid, 0.6)  # 4, 2, 0, 1 kept
    # the kept tokens cycle through the offsets in row-major order: row 0 (A > 0) gets
    # -0.6 -0.1 0.1 0.5 (clip high), row 1 (A < 0) gets 1.5 (dual clip) and -0.6 (clip low)
    offs = OFFSETS[torch.randint(0, len(OFFSETS), (B, T), generator=g)]
    keep = token_mask & valid
    offs[keep] = OFFSETS[torch.arange(int(keep.sum())) % len(OFFSETS)]
    old_logp = torch.where(valid, logp32 - offs, 0.0)
    adv_tok = advantages[:, None].expand(B, T)
    kw = dict(
        labels=labels,
        old_logp=old_logp,
        advantages=advantages,
        token_mask=token_mask,
        response_mask=valid,
        cfg=cfg,
        temperature=temp,
        ref_logp=torch.where(valid, logp32 + 0.3 * torch.randn(B, T, generator=g), 0.0),
    )
    if cfg.tis_cap is not None:  # weights on both sides of 1 and past the cap
        kw["sampler_logp"] = torch.where(valid, old_logp + 1.2 * torch.randn(B, T, generator=g), 0.0)
    return leaves, kw, offs, adv_tok


def test_batches_cover_every_clip_regime():
    for path in ("logits", "linear"):
        _, kw, offs, adv = _batch(path, torch.float32, "nll")
        keep = kw["response_mask"] & kw["token_mask"]
        assert bool((keep & (offs == 0.5) & (adv > 0)).any())  # clipped high
        assert bool((keep & (offs == -0.6) & (adv < 0)).any())  # clipped low
        assert bool((keep & (offs == 1.5) & (adv < 0)).any())  # dual clip
        assert bool((keep & (offs.abs() < 0.2)).any())  # inside the clip range
        assert bool((~keep & kw["response_mask"]).any())  # valid but filtered by TGF


def _ref_loss(path, leaves, kw):
    kw = dict(kw)
    if path == "linear":
        logits = leaves["hidden"] @ leaves["weight"].T  # (B, T, V) in the input dtype
    else:
        logits = leaves["logits"]
    return reference_loss(logits, kw.pop("labels"), *(kw.pop(k) for k in _POS), **kw)


_POS = ("old_logp", "advantages", "token_mask", "response_mask", "cfg")


def _kernel_loss(path, leaves, kw, impl):
    kw = dict(kw)
    labels = kw.pop("labels")
    pos = [kw.pop(k) for k in _POS[:-1]]
    opts = LossOptions(kw.pop("cfg"), temperature=kw.pop("temperature", 1.0), impl=impl)
    if path == "linear":
        return vppo_loss_linear(leaves["hidden"], leaves["weight"], labels, *pos, opts, **kw)
    return vppo_loss(leaves["logits"], labels, *pos, opts, **kw)


def _run(fn, leaves):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    loss, stats = fn(leaves)
    loss.backward()
    return loss.detach(), stats, {k: v.grad for k, v in leaves.items()}


def _err(x: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """Relative RMS error; the denominator is at least `floor`."""
    x, ref = x.double(), ref.double()
    return float((x - ref).square().mean().sqrt() / ref.square().mean().sqrt().clamp_min(floor))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("path", ["logits", "linear"])
def test_loss_and_gradients_match_reference(path, impl, case, dtype):
    leaves, kw, _, _ = _batch(path, dtype, case)
    leaves32 = {k: v.float() for k, v in leaves.items()}
    ref32 = _run(lambda lv: _ref_loss(path, lv, kw), leaves32)
    same = _run(lambda lv: _ref_loss(path, lv, kw), leaves)
    ker = _run(lambda lv: _kernel_loss(path, lv, kw, impl), leaves)

    # every branch of the surrogate is live in this batch
    st = ref32[1]
    assert st["clipfrac_high"] > 0 and st["clipfrac_low"] > 0 and st["clipfrac_dual"] > 0, st
    assert 0 < st["kept_frac"] < 1
    assert math.isfinite(ker[0].item())

    # the loss is a difference of O(1) terms that can land near 0: below magnitude 1 its error
    # is measured in absolute terms (floor 1)
    pairs = [("loss", ker[0], same[0], ref32[0], 1.0)]
    pairs += [(f"d{k}", ker[2][k], same[2][k], ref32[2][k], 1e-30) for k in leaves]
    for name, k, s, r, floor in pairs:
        assert k.dtype == s.dtype and k.shape == s.shape, name
        assert torch.isfinite(k).all(), name
        e_k, e_s = _err(k, r, floor), _err(s, r, floor)
        assert e_k <= e_s + TOL[dtype], (
            f"{name}: kernel err {e_k:.3g} > torch {dtype} err {e_s:.3g} + {TOL[dtype]}"
        )
    # the stats (detached floats) follow the same rule, in absolute terms below magnitude 1
    for key in ("pg_loss", "entropy_loss", "ratio_mean", "kept_frac", "clipfrac_dual"):
        k, s, r = ker[1][key], same[1][key], ref32[1][key]
        assert abs(k - r) <= abs(s - r) + TOL[dtype] * max(1.0, abs(r)), (key, k, s, r)
    # ignored positions get exactly zero gradient
    pad = ~kw["response_mask"]
    for k, g in ker[2].items():
        if k != "weight":
            assert g[pad].eq(0).all(), k


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gathered_rows_give_the_same_loss(impl):
    leaves, kw, _, _ = _batch("linear", torch.float32, "exact")
    valid = kw["response_mask"]
    full = _run(lambda lv: _kernel_loss("linear", lv, kw, impl), leaves)
    rows = {"hidden": leaves["hidden"][valid], "weight": leaves["weight"]}
    gathered = _run(lambda lv: _kernel_loss("linear", lv, kw, impl), rows)
    torch.testing.assert_close(gathered[0], full[0], rtol=0, atol=0)
    torch.testing.assert_close(gathered[2]["hidden"], full[2]["hidden"][valid], rtol=0, atol=0)
    torch.testing.assert_close(gathered[2]["weight"], full[2]["weight"], rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("frozen", ["weight", "hidden"])
def test_frozen_parameters_get_no_gradient(impl, frozen):
    leaves, kw, _, _ = _batch("linear", torch.float32, "exact")
    hidden = leaves["hidden"].requires_grad_(frozen != "hidden")
    weight = leaves["weight"].requires_grad_(frozen != "weight")
    loss, _ = _kernel_loss("linear", {"hidden": hidden, "weight": weight}, kw, impl)
    loss.backward()
    assert (hidden.grad is None) == (frozen == "hidden")
    assert (weight.grad is None) == (frozen == "weight")
    with torch.no_grad():
        loss, _ = _kernel_loss("linear", {"hidden": hidden, "weight": weight}, kw, impl)
    assert loss.grad_fn is None and math.isfinite(loss.item())


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("path", ["logits", "linear"])
def test_two_calls_are_bitwise_identical(impl, path):
    leaves, kw, _, _ = _batch(path, torch.bfloat16, "exact-seq-kl")
    a = _run(lambda lv: _kernel_loss(path, lv, kw, impl), leaves)
    b = _run(lambda lv: _kernel_loss(path, lv, kw, impl), leaves)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    for k in leaves:
        assert torch.equal(a[2][k], b[2][k]), k


def test_tgf_token_mask_from_token_stats():
    g = torch.Generator().manual_seed(3)
    valid = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    n = int(valid.sum())
    clean, masked = torch.randn(n, V, generator=g), torch.randn(n, V, generator=g)
    y = torch.randint(0, V, (n,), generator=g)
    stats = kref.token_dependency(clean, masked, y)
    for kind in ("k3", "kl"):
        mask = tgf_token_mask(stats, valid, 0.4, kind=kind, impl="torch")
        expect = kref.topk_token_mask(scatter_rows(getattr(stats, kind), valid), valid, 0.4)
        assert torch.equal(mask, expect), kind
        assert mask.sum(-1).tolist() == [3, 2, 0, 1]  # ceil(0.4 L) for L = 6, 3, 0, 1


def test_bad_input_names_the_argument():
    leaves, kw, _, _ = _batch("logits", torch.float32, "nll")
    kw = dict(kw)
    labels = kw["labels"].clone()
    labels[0, 0] = kernels.IGNORE_INDEX
    with pytest.raises(ValueError, match="labels"):
        _kernel_loss("logits", leaves, kw | {"labels": labels}, "torch")
    with pytest.raises(ValueError, match="logits"):
        _kernel_loss("logits", {"logits": leaves["logits"][:, :3]}, kw, "torch")
    with pytest.raises(ValueError, match="hidden"):
        vppo_loss_linear(
            torch.zeros(5, H),
            torch.zeros(V, H),
            kw["labels"],
            kw["old_logp"],
            kw["advantages"],
            None,
            kw["response_mask"],
            LossOptions(impl="torch"),
        )  # 5 != 10 valid rows
    with pytest.raises(ValueError, match="hidden"):
        vppo_loss_linear([0.0], torch.zeros(V, H), *(kw[k] for k in ("labels",) + _POS[:-1]), LossOptions())
    with pytest.raises(ValueError, match="opts must be a LossOptions"):  # the objective alone is not enough
        _ = vppo_loss_linear(
            torch.zeros(10, H), torch.zeros(V, H), *(kw[k] for k in ("labels",) + _POS[:-1]), kw["cfg"]
        )
    for bad, match in (
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(impl="cuda"), "impl"),
        (dict(objective="token"), "objective"),
    ):
        with pytest.raises(ValueError, match=match):
            LossOptions(**bad)
    with pytest.raises(ValueError, match="values"):
        scatter_rows(torch.zeros(3), kw["response_mask"])
