"""kernels.token_logprobs_linear (Triton under the interpreter, and the chunked torch impl)
against kernels.reference: values and gradients w.r.t. hidden and weight by the three-way rule,
determinism, requires_grad handling, and the torch impl's memory at the 7B shape."""

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from test_logprobs import TOL, _err, _float64

import kernels
from bench.meters import peak_live_bytes
from kernels import logprobs_linear as lp_mod
from kernels import reference as ref

IMPLS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _run(fn, h, w, y, g, grad=(True, True), **kw):
    """(logp, entropy, d hidden, d weight) of fn on fresh leaf copies of h and w."""
    h = h.detach().clone().requires_grad_(grad[0])
    w = w.detach().clone().requires_grad_(grad[1])
    logp, ent = fn(h, w, y, **kw)
    if logp.requires_grad:
        (logp * g[0] + ent * g[1]).sum().backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


def _float64_linear(h, w, y, temperature=1.0):
    return _float64(h @ w.T, y, temperature)


def _three_way(h, w, y, impl, temperature=1.0, check_fp32_reference=True):
    """Kernel error vs float64 truth <= same-dtype reference error + TOL[dtype] for logp,
    entropy, d hidden and d weight; for fp32 also close to the fp32 reference itself."""
    n = h.shape[0]
    g = (torch.randn(n), torch.randn(n))
    out = _run(kernels.token_logprobs_linear, h, w, y, g, temperature=temperature, impl=impl)
    truth = _run(_float64_linear, h.double(), w.double(), y, g, temperature=temperature)
    same = _run(ref.token_logprobs_linear, h, w, y, g, temperature=temperature)
    assert out[2].dtype == out[3].dtype == h.dtype and out[0].dtype == out[1].dtype == torch.float32
    assert (out[0] <= 0).all() and (out[1] >= 0).all()
    for name, k, r, s in zip(("logp", "entropy", "d hidden", "d weight"), out, truth, same):
        assert torch.isfinite(k).all(), name
        ek, es = _err(k, r), _err(s, r)
        assert ek <= es + TOL[h.dtype], f"{name}: kernel err {ek:.3g} vs torch err {es:.3g} ({h.dtype})"
        if h.dtype == torch.float32 and check_fp32_reference:
            assert _err(k, s) <= TOL[torch.float32], name
    return out


def _inputs(n, hdim, v, dtype, ignore=(), scale=3.0):
    h = torch.randn(n, hdim)
    w = torch.randn(v, hdim) * (scale / math.sqrt(hdim))  # logits of std `scale`
    y = torch.randint(0, v, (n,))
    for i in ignore:
        y[i] = kernels.IGNORE_INDEX
    return h.to(dtype), w.to(dtype), y


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,hdim,v,temperature", [(1, 16, 37, 1.0), (67, 40, 5000, 0.7)])
def test_matches_reference(impl, dtype, n, hdim, v, temperature):
    # 67 rows: a full 64-row block plus 3; 5000 columns: two 2048 interpreter tiles plus a ragged one
    h, w, y = _inputs(n, hdim, v, dtype, ignore=[n // 2] if n > 1 else [])
    _three_way(h, w, y, impl, temperature)


@pytest.mark.parametrize("impl", IMPLS)
def test_full_vocab_rows(impl):
    v = 152064
    h, w, y = _inputs(3, 32, v, torch.bfloat16)
    y[:] = torch.tensor([0, v - 1, 77777])
    logp, ent, _, _ = _three_way(h, w, y, impl, temperature=0.9)
    assert (logp <= 0).all() and (ent >= 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_chunks(impl, dtype, monkeypatch):
    # triton: three d-logits scratch chunks (d hidden accumulated across them); torch: 5 vocab
    # x 5 row chunks (d weight summed over row chunks in fp32)
    monkeypatch.setattr(lp_mod, "SCRATCH_BYTES", 1)
    monkeypatch.setattr(lp_mod, "CHUNK_ELEMS", 1024 * 15)
    assert [len(c) for c in lp_mod._lin_chunks(67, 5000)] == [5, 5]
    h, w, y = _inputs(67, 40, 5000, dtype, ignore=[5, 66])
    _three_way(h, w, y, impl, temperature=1.3)


@pytest.mark.parametrize("impl", IMPLS)
def test_hard_logits(impl):
    # all-equal logits (zero hidden), all about -2000, |z| up to ~1e5, and all about 3e4 with a
    # small spread. Integer inputs keep every fp32 logit exact, so only the statistics can err.
    hdim, v, t = 32, 3000, 0.8
    w = torch.randint(-8, 9, (v, hdim)).float()
    w[:, 0] = 1.0
    h = torch.randint(-2, 3, (4, hdim)).float()
    h[0] = 0.0
    h[1, 0] = -2000.0
    h[2] = torch.randint(-1000, 1001, (hdim,)).float()
    h[3, 0] = 30000.0
    y = torch.tensor([5, 6, 7, 8])
    logp, ent, dh, dw = _three_way(h, w, y, impl, temperature=t, check_fp32_reference=False)
    logp64, ent64 = _float64_linear(h.double(), w.double(), y, t)
    torch.testing.assert_close(logp.double(), logp64, rtol=0, atol=2e-5)
    torch.testing.assert_close(ent.double(), ent64, rtol=0, atol=2e-5)
    torch.testing.assert_close(logp[0], torch.tensor(-math.log(v)), rtol=0, atol=1e-5)
    torch.testing.assert_close(ent[0], torch.tensor(math.log(v)), rtol=0, atol=1e-5)
    assert (logp <= 0).all() and (ent >= 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_ignored_rows(impl):
    h, w, y = _inputs(6, 24, 700, torch.float32, ignore=[1, 4])
    g = (torch.randn(6), torch.randn(6))
    logp, ent, dh, dw = _run(kernels.token_logprobs_linear, h, w, y, g, impl=impl)
    assert (logp[[1, 4]] == 0).all() and (ent[[1, 4]] == 0).all()
    assert (dh[[1, 4]] == 0).all() and (dh[[0, 2, 3, 5]] != 0).any(-1).all()
    # d weight must not see the ignored rows: equal to the run without them
    keep = torch.tensor([0, 2, 3, 5])
    sub = _run(kernels.token_logprobs_linear, h[keep], w, y[keep], (g[0][keep], g[1][keep]), impl=impl)
    assert _err(dw, sub[3]) <= 1e-6
    y[:] = kernels.IGNORE_INDEX
    logp, ent, dh, dw = _run(kernels.token_logprobs_linear, h, w, y, g, impl=impl)
    assert not logp.any() and not ent.any() and not dh.any() and not dw.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_grad_only_to_inputs_that_require_it(impl):
    h, w, y = _inputs(5, 24, 700, torch.bfloat16, ignore=[2])
    g = (torch.randn(5), torch.randn(5))
    both = _run(kernels.token_logprobs_linear, h, w, y, g, impl=impl)
    only_h = _run(kernels.token_logprobs_linear, h, w, y, g, grad=(True, False), impl=impl)
    only_w = _run(kernels.token_logprobs_linear, h, w, y, g, grad=(False, True), impl=impl)
    assert only_h[3] is None and only_w[2] is None
    assert torch.equal(only_h[2], both[2]) and torch.equal(only_w[3], both[3])
    none = _run(kernels.token_logprobs_linear, h, w, y, g, grad=(False, False), impl=impl)
    assert none[2] is None and none[3] is None
    hh, ww = h.clone(), w.clone()
    logp, ent = kernels.token_logprobs_linear(hh, ww, y, impl=impl)
    assert not logp.requires_grad and not ent.requires_grad


@pytest.mark.parametrize("impl", IMPLS)
def test_deterministic(impl):
    h, w, y = _inputs(67, 40, 3000, torch.bfloat16, ignore=[3])
    g = (torch.randn(67), torch.randn(67))
    a = _run(kernels.token_logprobs_linear, h, w, y, g, impl=impl, temperature=0.6)
    b = _run(kernels.token_logprobs_linear, h, w, y, g, impl=impl, temperature=0.6)
    for x1, x2 in zip(a, b):
        assert torch.equal(x1, x2)


@pytest.mark.parametrize("impl", IMPLS)
def test_row_strides(impl):
    # hidden rows of a wider buffer and a weight that is a column slice (unit column stride only)
    h, w, y = _inputs(9, 40, 900, torch.float32)
    g = (torch.randn(9), torch.randn(9))
    want = _run(kernels.token_logprobs_linear, h, w, y, g, impl=impl)
    hb, wb = torch.randn(9, 47), torch.randn(900, 45)
    hb[:, 3:43], wb[:, 5:] = h, w
    hb.requires_grad_(), wb.requires_grad_()
    hs, ws = hb[:, 3:43], wb[:, 5:]
    assert hs.stride(0) == 47 and ws.stride(0) == 45
    logp, ent = kernels.token_logprobs_linear(hs, ws, y, impl=impl)
    (logp * g[0] + ent * g[1]).sum().backward()
    for a, b in zip(want, (logp, ent, hb.grad[:, 3:43], wb.grad[:, 5:])):
        assert _err(b, a) <= 1e-6
    assert not hb.grad[:, :3].any() and not wb.grad[:, :5].any()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden=torch.randn(8)), "hidden"),
        (dict(hidden=torch.randint(0, 3, (2, 8))), "hidden"),
        (dict(weight=torch.randn(10, 7)), "weight"),
        (dict(weight=torch.randn(10, 8).half()), "weight"),
        (dict(weight=torch.randn(10, 8, 1)), "weight"),
        (dict(labels=torch.tensor([0, 10])), "labels"),
        (dict(labels=torch.tensor([0])), "labels"),
        (dict(temperature=-1.0), "temperature"),
        (dict(impl="fast"), "impl"),
    ],
)
def test_bad_input_raises(kwargs, match):
    args = dict(hidden=torch.randn(2, 8), weight=torch.randn(10, 8), labels=torch.tensor([0, 9])) | kwargs
    with pytest.raises(ValueError, match=match):
        kernels.token_logprobs_linear(args.pop("hidden"), args.pop("weight"), args.pop("labels"), **args)


def _fwd_bwd_peaks(fn, h, w, y):
    """(forward peak, backward peak) extra CPU bytes of fn(h, w, y) with random upstream grads."""
    (logp, ent), fwd = peak_live_bytes(fn, h, w, y)
    g = (torch.randn_like(logp), torch.randn_like(ent))
    _, bwd = peak_live_bytes(lambda: (logp * g[0] + ent * g[1]).sum().backward())
    return fwd, bwd


def test_torch_impl_memory_meter_catches_materialized_logits(monkeypatch):
    # small shape with small chunks: the meter sees the reference's [N, V] logits and the
    # chunked impl's lack of them (so the big test below can fail)
    n, hdim, v = 256, 32, 8192
    monkeypatch.setattr(lp_mod, "CHUNK_ELEMS", 1 << 16)  # blocks of 64 rows x 1024 columns
    h, w, y = _inputs(n, hdim, v, torch.float32)
    nv = n * v * 4
    outputs = w.nbytes + 3 * h.nbytes  # d weight, d hidden and its accumulator
    fwd, bwd = _fwd_bwd_peaks(ref.token_logprobs_linear, h.requires_grad_(), w.requires_grad_(), y)
    assert fwd >= 2 * nv and bwd >= nv
    h, w = h.detach().requires_grad_(), w.detach().requires_grad_()
    fwd, bwd = _fwd_bwd_peaks(lambda *a: kernels.token_logprobs_linear(*a, impl="torch"), h, w, y)
    assert fwd < nv // 4 and bwd - outputs < nv // 4


@pytest.mark.slow
def test_torch_impl_never_holds_n_by_v_at_7b_shape():
    # Qwen2.5-VL-7B lm_head: one bf16 [N, V] tensor would be 594 MiB; weight 1040 MiB
    n, hdim, v = 2048, 3584, 152064
    h = torch.randn(n, hdim, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(v, hdim, dtype=torch.bfloat16) * 0.02).requires_grad_()
    y = torch.randint(0, v, (n,))
    y[::7] = kernels.IGNORE_INDEX
    nv = n * v * 2
    fwd, bwd = _fwd_bwd_peaks(lambda *a: kernels.token_logprobs_linear(*a, impl="torch"), h, w, y)
    outputs = w.nbytes + 3 * h.nbytes  # d weight, d hidden and its fp32 accumulator
    print(f"peak extra bytes: forward {fwd / 2**20:.0f} MiB, backward {bwd / 2**20:.0f} MiB")
    assert fwd < nv // 4, fwd
    assert bwd - outputs < nv // 4, bwd
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert (h.grad[::7] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_tile_sizes(dtype, monkeypatch):
    # the interpreter runs wide vocab tiles; check the GPU tiling of the dtype (64-row blocks,
    # 128 or 64 columns, scratch chunks of 512 or 256 columns, several per V) on a small shape
    gpu = lp_mod.LIN_BLOCKS_GPU_FP32 if dtype == torch.float32 else lp_mod.LIN_BLOCKS_GPU
    monkeypatch.setattr(lp_mod, "LIN_BLOCKS_INTERPRET", gpu)
    monkeypatch.setattr(lp_mod, "SCRATCH_BYTES", 70 * 256 * 4)
    h, w, y = _inputs(70, 80, 600, dtype, ignore=[0])
    _three_way(h, w, y, "triton", temperature=0.9)


_COMPILE = r"""
import json, sys
import torch
from bench import gpu_compile as gc

out, seen = [], set()
for dt in (torch.bfloat16, torch.float32):
    for name, thunk in gc.public_calls(gc.QWEN, dt):
        if name not in ("token_logprobs", "token_logprobs_linear"):
            continue
        with gc.record_launches([name]) as launches:
            thunk()
        for launch in launches:
            copy = gc.Launch(launch.fn, launch.args, dict(launch.kwargs), launch.origin)  # specialize pops
            sig, consts, attrs, options = gc.specialize(copy)
            key = (launch.fn.__name__, repr(sorted(sig.items())), repr(sorted(consts.items(), key=str)))
            key += (repr(sorted(options.items())),)
            if key not in seen:
                seen.add(key)
                rec = gc.compile_launch(launch, 90)
                keep = ("kernel", "status", "registers", "spill_bytes", "num_warps")
                out.append({k: rec.get(k) for k in keep})
print(json.dumps(out))
"""


def test_kernels_compile_for_h100_without_spills():
    # The interpreter accepts code the GPU compiler rejects (a plain global IGNORE_INDEX once):
    # compile every launch of both public functions at the 7B shape for sm_90a, ahead of time.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="triton-aot-logprobs-")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", _COMPILE], env=env, cwd=root, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    recs = json.loads(r.stdout.strip().splitlines()[-1])
    names = {rec["kernel"] for rec in recs}
    assert names == {
        "_logprobs_fwd_kernel",
        "_logprobs_bwd_kernel",
        "_linear_fwd_kernel",
        "_linear_dz_kernel",
        "_linear_dh_kernel",
        "_linear_dw_kernel",
    }, names
    assert all(rec["status"] == "ok" for rec in recs), recs


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_batch(impl):
    h, w = torch.randn(0, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    logp, ent = kernels.token_logprobs_linear(h, w, torch.zeros(0, dtype=torch.long), impl=impl)
    (logp.sum() + ent.sum()).backward()
    assert logp.shape == (0,) and h.grad.shape == (0, 8) and not w.grad.any()
