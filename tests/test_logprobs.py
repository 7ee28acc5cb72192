"""kernels.token_logprobs (Triton under the interpreter, and the chunked torch impl) against
kernels.reference: values and gradients w.r.t. logits, by the three-way rule."""

import math

import pytest
import torch

import kernels
from kernels import logprobs as lp_mod
from kernels import reference as ref

IMPLS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The one tolerance table: the kernel's error (max abs error over max |truth|) may exceed
# same-dtype PyTorch's (the reference run on the input dtype) by at most this. For bf16/fp16
# about half an ulp, since both round the same fp32 gradient once to the logits dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}


def _run(fn, z, y, g, **kw):
    """(logp, entropy, d logits) of fn on a fresh leaf copy of z, upstream grads g = (g_lp, g_h)."""
    z = z.detach().clone().requires_grad_(True)
    logp, ent = fn(z, y, **kw)
    (logp * g[0] + ent * g[1]).sum().backward()
    return logp.detach(), ent.detach(), z.grad


def _err(x, r):
    x, r = x.detach().double(), r.detach().double()
    return float((x - r).abs().max() / r.abs().max().clamp_min(1.0))


def _float64(z, y, temperature=1.0):
    """The definitions of docs/kernels.md in float64, the arbiter of the three-way rule: the fp32
    reference itself is off by ~5e-5 at V = 152064 (fp32 sums), where the kernels are ~1e-6."""
    logp = torch.log_softmax(z / temperature, -1)
    p = logp.exp()
    ent = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)
    keep = y != kernels.IGNORE_INDEX
    return torch.where(keep, logp.gather(1, y.clamp_min(0)[:, None]).squeeze(1), 0.0), torch.where(
        keep, ent, 0.0
    )


def _three_way(z, y, impl, temperature=1.0, check_fp32_reference=True, **kw):
    """Kernel error vs float64 truth <= same-dtype reference error + TOL[dtype]; for fp32 input
    also directly close to the fp32 reference."""
    n = z.shape[0]
    g = (torch.randn(n), torch.randn(n))
    out = _run(kernels.token_logprobs, z, y, g, temperature=temperature, impl=impl, **kw)
    truth = _run(_float64, z.double(), y, g, temperature=temperature)
    same = _run(ref.token_logprobs, z, y, g, temperature=temperature)
    assert out[2].dtype == z.dtype and out[0].dtype == out[1].dtype == torch.float32
    assert (out[0] <= 0).all() and (out[1] >= 0).all()
    for name, k, r, s in zip(("logp", "entropy", "grad"), out, truth, same):
        assert torch.isfinite(k).all(), name
        ek, es = _err(k, r), _err(s, r)
        assert ek <= es + TOL[z.dtype], f"{name}: kernel err {ek:.3g} vs torch err {es:.3g} ({z.dtype})"
        if z.dtype == torch.float32 and check_fp32_reference:
            torch.testing.assert_close(k, s, rtol=1e-5, atol=1e-5)
    return out


def _labels(n, v, ignore=()):
    y = torch.randint(0, v, (n,))
    for i in ignore:
        y[i] = kernels.IGNORE_INDEX
    return y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,v,temperature", [(1, 37, 1.0), (7, 5000, 0.7), (4, 4096, 1.3)])
def test_matches_reference(impl, dtype, n, v, temperature):
    # 5000 = one full 4096 block plus a ragged one; 4096 exactly one block
    z = (torch.randn(n, v) * 4).to(dtype)
    y = _labels(n, v, ignore=[n - 1] if n > 1 else [])
    _three_way(z, y, impl, temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_vocab_rows(impl, dtype):
    v = 152064
    z = (torch.randn(3, v) * 3).to(dtype)
    y = torch.tensor([0, v - 1, 77777])
    logp, ent, _ = _three_way(z, y, impl, temperature=0.9, check_fp32_reference=False)
    assert (logp <= 0).all() and (ent >= 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_torch_impl_chunks_rows(impl, monkeypatch):
    # several row chunks (3 rows each) must give what one chunk gives
    z, y = torch.randn(7, 300), _labels(7, 300, ignore=[3])
    g = (torch.randn(7), torch.randn(7))
    one = _run(kernels.token_logprobs, z, y, g, impl=impl)
    monkeypatch.setattr(lp_mod, "CHUNK_ELEMS", 3 * 300)
    assert len(lp_mod._row_chunks(7, 300)) == 3
    many = _run(kernels.token_logprobs, z, y, g, impl=impl)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _hard_rows(v):
    """All-equal, all-negative, |z| > 1e4 (both signs), a peaked row, and padded vocab."""
    z = torch.randn(7, v, dtype=torch.float64)
    z[0] = 3.0  # all equal: p uniform
    z[1] = -1000.0 - 5 * z[1].abs()  # all negative (a running max starting at 0 would break)
    z[2] = 2e4 + 3 * z[2]  # huge positive: e^(z - 0) overflows, sums of z p cancel
    z[3] = -3e4 + 3 * z[3]
    z[4] = 0.0
    z[4, 5] = 60.0  # nearly one-hot: log p of the others around -60
    z[5, v // 2 :] = float("-inf")  # padded vocabulary
    z[6, : v // 3] = float("-inf")
    y = torch.tensor([1, 2, 3, 4, 7, v // 2 - 1, v - 1])
    return z, y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_logits(impl, dtype):
    v, t = 4999, 0.8
    z64, y = _hard_rows(v)
    if dtype == torch.float16:  # fp16 tops out at 65504
        z64[2:4] /= 2
    z = z64.to(dtype)
    # the fp32 reference divides by T before subtracting the max: at |z| = 3e4 that alone costs
    # 2e-3, so only the float64 arbiter is used here
    logp, ent, grad = _three_way(z, y, impl, temperature=t, check_fp32_reference=False)
    logp64, ent64 = _float64(z.double(), y, t)
    torch.testing.assert_close(logp.double(), logp64, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent64, rtol=0, atol=2e-5)
    assert (logp <= 0).all() and (ent >= 0).all()
    torch.testing.assert_close(logp[0], torch.tensor(-math.log(v)), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[0], torch.tensor(math.log(v)), rtol=0, atol=1e-5)
    assert (grad[5, v // 2 :] == 0).all() and (grad[6, : v // 3] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows_are_zero_and_get_no_grad(impl):
    z, y = torch.randn(5, 333), _labels(5, 333, ignore=[0, 3])
    logp, ent, grad = _run(kernels.token_logprobs, z, y, (torch.randn(5), torch.randn(5)), impl=impl)
    assert (logp[[0, 3]] == 0).all() and (ent[[0, 3]] == 0).all()
    assert (grad[[0, 3]] == 0).all() and (grad[[1, 2, 4]] != 0).any(-1).all()
    y[:] = kernels.IGNORE_INDEX  # every row ignored
    logp, ent, grad = _run(kernels.token_logprobs, z, y, (torch.randn(5), torch.randn(5)), impl=impl)
    assert not logp.any() and not ent.any() and not grad.any()


def test_triton_reads_each_kept_row_once_and_ignored_rows_never(monkeypatch):
    # bytes of bf16 logits requested under the interpreter (masked-in lanes): forward and
    # backward each read a kept row once (+ the forward's label gather), an ignored row not at all
    from triton.runtime import interpreter

    read = [0]
    original = interpreter.InterpreterBuilder.create_masked_load

    def counting(self, ptrs, mask, *args, **kwargs):
        ret = original(self, ptrs, mask, *args, **kwargs)
        if str(ptrs.get_element_ty()) == "bf16":
            read[0] += int(mask.data.sum()) * ret.data.itemsize
        return ret

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting)
    n, v = 5, 5000  # two vocab blocks a row, the last partial
    z = torch.randn(n, v).to(torch.bfloat16).requires_grad_(True)
    y = _labels(n, v, ignore=[1, 3])
    logp, ent = kernels.token_logprobs(z, y, impl="triton")
    assert read[0] == 3 * (v + 1) * 2, read
    read[0] = 0
    (logp.sum() + ent.sum()).backward()
    assert read[0] == 3 * v * 2, read
    assert not z.grad[[1, 3]].any() and z.grad[[0, 2, 4]].any(-1).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_equals_normal_and_consumes_logits(impl, dtype):
    n, v = 6, 5000
    w0 = torch.randn(n, v).to(dtype)
    y = _labels(n, v, ignore=[2])
    g = (torch.randn(n), torch.randn(n))
    grads = []
    for inplace in (False, True):
        w = w0.clone().requires_grad_(True)
        logits = w * 2  # a non-leaf activation, as the lm_head output would be
        logp, ent = kernels.token_logprobs(logits, y, temperature=0.7, impl=impl, inplace_backward=inplace)
        (logp * g[0] + ent * g[1]).sum().backward()
        grads.append((logp, ent, w.grad))
        if inplace:  # the logits buffer now holds d logits (= w.grad / 2)
            torch.testing.assert_close(logits.detach() * 2, w.grad, rtol=0, atol=0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("inplace", [False, True])
def test_row_stride(impl, inplace):
    # rows of a wider buffer (row stride 5013 != V): same results as the contiguous copy
    base = torch.randn(5, 5013)
    y, g = _labels(5, 5000), (torch.randn(5), torch.randn(5))
    want = _run(kernels.token_logprobs, base[:, :5000].contiguous(), y, g, impl=impl)
    leaf = base.clone().requires_grad_(True)
    view = (leaf * 1)[:, :5000]
    assert view.stride(0) == 5013
    logp, ent = kernels.token_logprobs(view, y, impl=impl, inplace_backward=inplace)
    (logp * g[0] + ent * g[1]).sum().backward()
    for a, b in zip(want, (logp, ent, leaf.grad[:, :5000])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (leaf.grad[:, 5000:] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic(impl):
    z, y = torch.randn(9, 4500).bfloat16(), _labels(9, 4500, ignore=[4])
    g = (torch.randn(9), torch.randn(9))
    a = _run(kernels.token_logprobs, z, y, g, impl=impl, temperature=1.7)
    b = _run(kernels.token_logprobs, z, y, g, impl=impl, temperature=1.7)
    for x1, x2 in zip(a, b):
        assert torch.equal(x1, x2)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_output_only_and_no_grad(impl):
    # upstream grad only through entropy (logp unused), and a logits tensor without grad
    z, y = torch.randn(4, 100), _labels(4, 100)
    zl = z.clone().requires_grad_(True)
    kernels.token_logprobs(zl, y, impl=impl)[1].sum().backward()
    zr = z.clone().requires_grad_(True)
    ref.token_logprobs(zr, y)[1].sum().backward()
    torch.testing.assert_close(zl.grad, zr.grad, rtol=1e-5, atol=1e-6)
    logp, ent = kernels.token_logprobs(z, y, impl=impl)
    assert not logp.requires_grad and not ent.requires_grad


def test_auto_is_torch_on_cpu():
    z, y = torch.randn(3, 50), _labels(3, 50)
    a = kernels.token_logprobs(z, y, impl="auto")
    b = kernels.token_logprobs(z, y, impl="torch")
    assert all(torch.equal(x1, x2) for x1, x2 in zip(a, b))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(logits=torch.randn(10)), "logits"),
        (dict(logits=torch.randint(0, 5, (2, 10))), "logits"),
        (dict(logits=torch.randn(10, 2).T), "logits"),
        (dict(labels=torch.tensor([0, 1, 2])), "labels"),
        (dict(labels=torch.tensor([0, 10])), "labels"),
        (dict(labels=torch.tensor([-1, 0])), "labels"),
        (dict(labels=torch.tensor([0.0, 1.0])), "labels"),
        (dict(labels=torch.tensor([0, 1], device="meta")), "labels"),
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(impl="cuda"), "impl"),
        (dict(inplace_backward="yes"), "inplace_backward"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(logits=torch.randn(2, 10), labels=torch.tensor([0, 9])) | kwargs
    with pytest.raises(ValueError, match=match):
        kernels.token_logprobs(args.pop("logits"), args.pop("labels"), **args)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grad_is_fp32_grad_rounded_once(impl, dtype):
    # the same values in fp32 run the same fp32 arithmetic: the low-precision gradient must be
    # exactly that gradient rounded to nearest (the interpreter truncates bf16 casts by itself)
    z, y = (torch.randn(5, 5000) * 3).to(dtype), _labels(5, 5000, ignore=[1])
    g = (torch.randn(5), torch.randn(5))
    low = _run(kernels.token_logprobs, z, y, g, impl=impl, temperature=0.7)
    f32 = _run(kernels.token_logprobs, z.float(), y, g, impl=impl, temperature=0.7)
    assert torch.equal(low[0], f32[0]) and torch.equal(low[1], f32[1])
    assert torch.equal(low[2], f32[2].to(dtype))


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch_and_int32_labels(impl):
    z = torch.randn(0, 10, requires_grad=True)
    logp, ent = kernels.token_logprobs(z, torch.zeros(0, dtype=torch.long), impl=impl)
    (logp.sum() + ent.sum()).backward()
    assert logp.shape == ent.shape == (0,) and z.grad.shape == (0, 10)
    z, y = torch.randn(3, 10), torch.tensor([1, -100, 9])
    a = kernels.token_logprobs(z, y, impl=impl)
    b = kernels.token_logprobs(z, y.int(), impl=impl)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
