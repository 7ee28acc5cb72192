"""token_dependency: the Triton kernel (interpreter on CPU) and the chunked torch impl against
kernels.reference, by the three-way rule of style.md."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import IGNORE_INDEX
from kernels import reference as ref

IMPLS = ["triton", "torch"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# The one tolerance table, per input dtype, for the three-way rule of style.md:
#     err(impl) <= err(same-dtype PyTorch) + TOL[dtype],   err(x) = max |x - r| / (1 + |r|)
# where r is the fp32 reference (kernels.reference upcasts its inputs). The impls compute in
# fp32 whatever the input dtype, so they must also be within TOL[float32] of r.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
FIELDS = kernels.TokenStats._fields


def _err(x: torch.Tensor, r: torch.Tensor) -> float:
    return float(((x.double() - r.double()).abs() / (1 + r.double().abs())).max())


def _same_dtype_torch(z, w, y, t) -> kernels.TokenStats:
    """Plain PyTorch kept in the input dtype (no fp32 upcast): the yardstick of the three-way
    rule, what a naive bf16/fp16 implementation would give. Not a definition: that is ref."""
    lp, lq = F.log_softmax(z / t, -1), F.log_softmax(w / t, -1)
    p = lp.exp()
    kl = torch.where(p > 0, p * (lp - lq), 0).sum(-1)
    ent = torch.special.entr(p).sum(-1)
    lp_y, lq_y = (x.gather(1, y.clamp_min(0)[:, None]).squeeze(1) for x in (lp, lq))
    d = (lq_y - lp_y).clamp(-20, 20)
    k3 = (d.exp() - d - 1).clamp(0, 10)
    keep = y != IGNORE_INDEX
    return kernels.TokenStats(*(torch.where(keep, x, 0).float() for x in (lp_y, lq_y, kl, k3, ent)))


def _case(name: str):
    """(clean, masked, labels, temperature) in fp32, before rounding to the tested dtype."""
    g = torch.Generator().manual_seed(CASES.index(name))
    randn = lambda *s: torch.randn(*s, generator=g)

    def labels(n, v):
        y = torch.randint(0, v, (n,), generator=g)
        y[torch.rand(n, generator=g) < 0.2] = IGNORE_INDEX
        return y

    if name == "random":  # V not a multiple of the 4096 block, temperature != 1
        z = 4 * randn(37, 5000)
        return z, z + randn(37, 5000), labels(37, 5000), 0.7
    if name == "one_row":
        z = 3 * randn(1, 1000)
        return z, 3 * randn(1, 1000), torch.tensor([17]), 1.0
    if name == "many_rows":  # N = 4099, small V: several rows per program
        z = 2 * randn(4099, 64)
        return z, z + randn(4099, 64), labels(4099, 64), 1.0
    if name == "qwen_vocab":  # V = 152064, a few rows
        z = 5 * randn(3, 152064)
        return z, z + 2 * randn(3, 152064), torch.tensor([5, IGNORE_INDEX, 152063]), 1.0
    if name == "padded":  # -inf columns in both; the last 4096-block is all padding
        z, w = 3 * randn(6, 9000), 3 * randn(6, 9000)
        z[:, 4500:] = w[:, 4500:] = float("-inf")
        return z, w, labels(6, 4500), 1.0
    if name == "special":
        z, w = randn(6, 5000), randn(6, 5000)
        z[0], w[0] = 3.0, 3.0  # all equal
        z[1], w[1] = -60 - 5 * z[1].abs(), -60 - 5 * w[1].abs()  # all negative
        z[2], w[2] = 1.2e4 + 40 * z[2], 1.2e4 + 40 * z[2] + 5 * w[2]  # |z| > 1e4 (fits fp16)
        z[3], w[3] = -1.5e4 + 30 * z[3], -1.5e4 + 30 * w[3]
        z[4], w[4] = 8 * z[4], 8 * w[4]
        y = torch.tensor([3, 4999, int(z[2].argmax()), 7, IGNORE_INDEX, 0])
        return z, w, y, 1.3
    raise KeyError(name)


CASES = ["random", "one_row", "many_rows", "qwen_vocab", "padded", "special"]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_three_way(impl, dtype, case):
    z32, w32, y, t = _case(case)
    z, w = z32.to(dtype), w32.to(dtype)
    out = kernels.token_dependency(z, w, y, temperature=t, impl=impl)
    truth = ref.token_dependency(z, w, y, temperature=t)  # fp32 math from the same inputs
    base = _same_dtype_torch(z, w, y, t)
    for f, x, r, b in zip(FIELDS, out, truth, base):
        assert x.dtype == torch.float32 and x.shape == (z.shape[0],)
        assert torch.isfinite(x).all(), f
        assert (x[y == IGNORE_INDEX] == 0).all(), f
        assert _err(x, r) <= _err(b, r) + TOL[dtype], (f, _err(x, r), _err(b, r))
        assert _err(x, r) <= TOL[torch.float32], (f, _err(x, r))


def _fp64_truth(z, w, y, t):
    """Independent fp64 evaluation (torch's own log_softmax / entr), as in test_reference."""
    lp, lq = F.log_softmax(z.double() / t, -1), F.log_softmax(w.double() / t, -1)
    p = lp.exp()
    kl = torch.where(p > 0, p * (lp - lq), 0).sum(-1)
    ent = torch.special.entr(p).sum(-1)
    return lp.gather(1, y[:, None])[:, 0], lq.gather(1, y[:, None])[:, 0], kl, ent


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("t", [1.0, 2.0])  # exact scalings: any error is the kernel's own
def test_large_logits_do_not_cancel(impl, t):
    # |z| ~ 1e4: a formula such as entropy = lse - E_p[z] loses ~1e-3 to fp32 rounding of
    # lse; sums relative to the running max keep the statistics at fp32 precision.
    g = torch.Generator().manual_seed(1)
    z = 2e4 + 6 * torch.randn(8, 3000, generator=g)
    z[4:] = -3e4 + 6 * torch.randn(4, 3000, generator=g)
    w = z + torch.randn(8, 3000, generator=g)
    y = torch.randint(0, 3000, (8,), generator=g)
    y[0] = z[0].argmax()
    out = kernels.token_dependency(z, w, y, temperature=t, impl=impl)
    lp, lq, kl, ent = _fp64_truth(z, w, y, t)
    for f, x, r in zip(
        ["logp_clean", "logp_masked", "kl", "entropy"], (out[0], out[1], out[2], out[4]), (lp, lq, kl, ent)
    ):
        assert _err(x, r) <= 2e-6, (f, _err(x, r))
    assert (out.entropy > 0.1).all()  # the rows are genuinely spread, not one-hot


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_row_views_need_no_copy_and_match(impl, dtype):
    n, v = 9, 5000
    big_c = torch.randn(2 * n, v + 24).to(dtype)
    big_m = torch.randn(n + 3, v + 40).to(dtype)
    z, w = big_c[::2, 7 : 7 + v], big_m[3:, :v]  # row strides 2 (V + 24) and V + 40
    assert not z.is_contiguous() and not w.is_contiguous()
    y = torch.randint(0, v, (n,))
    out = kernels.token_dependency(z, w, y, temperature=0.9, impl=impl)
    dense = kernels.token_dependency(z.contiguous(), w.contiguous(), y, temperature=0.9, impl=impl)
    for a, b in zip(out, dense):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_untouched_and_no_grad(impl):
    z = torch.randn(5, 300, requires_grad=True)
    w = torch.randn(5, 300, requires_grad=True)
    z0, w0 = z.detach().clone(), w.detach().clone()
    out = kernels.token_dependency(z, w, torch.arange(5), temperature=0.5, impl=impl)
    assert torch.equal(z.detach(), z0) and torch.equal(w.detach(), w0)
    assert not any(x.requires_grad for x in out)
    out32 = kernels.token_dependency(z, w, torch.arange(5, dtype=torch.int32), temperature=0.5, impl=impl)
    assert all(torch.equal(a, b) for a, b in zip(out, out32))


def test_torch_impl_chunks_rows(monkeypatch):
    # Several chunks of rows give the same result as one.
    import kernels.dependency as dep

    z, w = torch.randn(10, 700), torch.randn(10, 700)
    y = torch.randint(0, 700, (10,))
    one = kernels.token_dependency(z, w, y, impl="torch")
    monkeypatch.setattr(dep, "CHUNK_BYTES", 3 * 16 * 700)  # 3 rows a chunk
    many = kernels.token_dependency(z, w, y, impl="torch")
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_batch():
    for impl in IMPLS:
        out = kernels.token_dependency(
            torch.zeros(0, 10), torch.zeros(0, 10), torch.zeros(0, dtype=torch.long), impl=impl
        )
        assert all(x.shape == (0,) for x in out)


@pytest.mark.parametrize("impl", IMPLS + ["auto"])
def test_bad_input_names_the_argument(impl):
    z, w, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, -100])
    td = lambda *a, **k: kernels.token_dependency(*a, impl=impl, **k)
    with pytest.raises(ValueError, match="masked_logits"):
        td(z, torch.randn(4, 11), y)
    with pytest.raises(ValueError, match="masked_logits"):
        td(z, w.bfloat16(), y)
    with pytest.raises(ValueError, match="masked_logits"):
        td(z, torch.empty(4, 10, device="meta"), y)
    with pytest.raises(ValueError, match="clean_logits"):
        td(z.double(), w.double(), y)
    with pytest.raises(ValueError, match="clean_logits"):
        td(z[0], w[0], y)
    with pytest.raises(ValueError, match="clean_logits"):
        td(z.t(), w.t(), y)  # last dimension not contiguous
    with pytest.raises(ValueError, match="labels"):
        td(z, w, torch.tensor([1, 2, 10, 0]))
    with pytest.raises(ValueError, match="labels"):
        td(z, w, torch.tensor([1, 2, -1, 0]))
    with pytest.raises(ValueError, match="labels"):
        td(z, w, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="labels"):
        td(z, w, y.float())
    with pytest.raises(ValueError, match="temperature"):
        td(z, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="impl"):
        kernels.token_dependency(z, w, y, impl="cuda")


# token_dependency_linear ----------------------------------------------------------------------


def _hidden_case(dtype, n=70, h=96, v=1000):
    """Hidden states and an lm_head whose logits have a realistic spread; H, V and N are not
    multiples of the kernel's blocks."""
    g = torch.Generator().manual_seed(7)
    hc = torch.randn(n, h, generator=g)
    hm = hc + 0.5 * torch.randn(n, h, generator=g)
    w = torch.randn(v, h, generator=g) / 3
    y = torch.randint(0, v, (n,), generator=g)
    y[::6] = IGNORE_INDEX
    return hc.to(dtype), hm.to(dtype), w.to(dtype), y


@pytest.fixture(params=[8192, 256], ids=["one_split", "four_splits"])
def split_v(request, monkeypatch):
    import kernels.dependency_linear as dep_lin

    monkeypatch.setattr(dep_lin, "LINEAR_SPLIT_V", request.param)
    return request.param


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_matches_materialized_logits_fp32(impl, split_v):
    hc, hm, w, y = _hidden_case(torch.float32)
    out = kernels.token_dependency_linear(hc, hm, w, y, temperature=0.8, impl=impl)
    zc, zm = hc @ w.T, hm @ w.T
    for other in (
        kernels.token_dependency(zc, zm, y, temperature=0.8, impl=impl),
        ref.token_dependency_linear(hc, hm, w, y, temperature=0.8),
    ):
        for f, x, r in zip(FIELDS, out, other):
            assert _err(x, r) <= TOL[torch.float32], (f, _err(x, r))
    assert (out.kl[y != IGNORE_INDEX] > 0).all() and (out.kl[y == IGNORE_INDEX] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_linear_three_way(impl, dtype):
    hc, hm, w, y = _hidden_case(dtype)
    out = kernels.token_dependency_linear(hc, hm, w, y, temperature=1.3, impl=impl)
    # fp32 reference from the same inputs: logits multiplied in fp32.
    truth = ref.token_dependency(hc.float() @ w.float().T, hm.float() @ w.float().T, y, temperature=1.3)
    base = ref.token_dependency_linear(hc, hm, w, y, temperature=1.3)  # logits in the input dtype
    for f, x, r, b in zip(FIELDS, out, truth, base):
        assert _err(x, r) <= _err(b, r) + TOL[dtype], (f, _err(x, r), _err(b, r))
        if impl == "triton":  # fp32 accumulation: fp32 accuracy from half inputs
            assert _err(x, r) <= TOL[torch.float32], (f, _err(x, r))


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_is_deterministic_and_takes_row_slices(impl, split_v):
    hc, hm, w, y = _hidden_case(torch.bfloat16, n=40)
    first = kernels.token_dependency_linear(hc, hm, w, y, impl=impl)
    second = kernels.token_dependency_linear(hc.clone(), hm.clone(), w.clone(), y, impl=impl)
    for a, b in zip(first, second):
        assert torch.equal(a, b)  # bitwise
    big = torch.zeros(40, 2 * hc.shape[1], dtype=hc.dtype)
    big[:, 5 : 5 + hc.shape[1]] = hc
    sliced = kernels.token_dependency_linear(big[:, 5 : 5 + hc.shape[1]], hm, w, y, impl=impl)
    for a, b in zip(first, sliced):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS + ["auto"])
def test_linear_bad_input_names_the_argument(impl):
    hc, hm, w, y = _hidden_case(torch.float32, n=4, h=8, v=20)
    tdl = lambda *a, **k: kernels.token_dependency_linear(*a, impl=impl, **k)
    with pytest.raises(ValueError, match="masked_hidden"):
        tdl(hc, hm[:, :7], w, y)
    with pytest.raises(ValueError, match="masked_hidden"):
        tdl(hc, hm.bfloat16(), w, y)
    with pytest.raises(ValueError, match="weight"):
        tdl(hc, hm, w[:, :7], y)
    with pytest.raises(ValueError, match="weight"):
        tdl(hc, hm, w.half(), y)
    with pytest.raises(ValueError, match="weight"):
        tdl(hc, hm, torch.empty(20, 8, device="meta"), y)
    with pytest.raises(ValueError, match="labels"):
        tdl(hc, hm, w, torch.tensor([0, 1, 20, 3]))
    with pytest.raises(ValueError, match="temperature"):
        tdl(hc, hm, w, y, temperature=-1.0)


# GPU compilation -------------------------------------------------------------------------------

_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import kernels.dependency as dep
import kernels.dependency_linear as dep_lin

I = dict(IGNORE=-100)


def build(fn, types, consts, warps, arch):
    sig = {a: ("constexpr" if a in consts else types[a]) for a in fn.arg_names}
    src = ASTSource(fn=fn, signature=sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


for arch in (90,):  # H100 here; tests/test_compile.py covers sm_80 and sm_90a for every kernel
    for dt in ("*bf16", "*fp16", "*fp32"):
        for v in (64, 152064):
            bn, bv = dep._row_blocks(v)
            t = dict(p_clean=dt, p_masked=dt, p_labels="*i64", p_out="*fp32", temperature="fp32")
            t.update(N="i32", V="i32", stride_c="i64", stride_m="i32")
            build(dep._dependency_kernel, t, dict(I, BLOCK_N=bn, BLOCK_V=bv), 8, arch)
        bn, bv, bh, warps = dep_lin._linear_blocks(4 if dt == "*fp32" else 2)
        t = dict(p_hc=dt, p_hm=dt, p_w=dt, p_labels="*i64", p_part="*fp32", N="i32", V="i32", H="i32")
        t.update(stride_hc="i32", stride_hm="i32", stride_w="i32", temperature="fp32")
        c = dict(I, SPLIT_V=dep_lin.LINEAR_SPLIT_V, BLOCK_N=bn, BLOCK_V=bv, BLOCK_H=bh, UPCAST=False)
        build(dep_lin._dependency_linear_kernel, t, c, warps, arch)
    t = dict(p_part="*fp32", p_labels="*i64", p_out="*fp32", N="i32", S="i32")
    build(dep_lin._merge_splits_kernel, t, dict(I, BLOCK_N=256), 4, arch)
"""


def test_kernels_compile_for_gpus_without_spills(tmp_path):
    # The interpreter accepts code that the GPU compiler rejects; compile ahead of time for
    # sm_90 with the launchers' block sizes (a fresh cache so that ptxas runs and reports).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DUMP_PTXAS_LOG="1")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    log = [line for line in (r.stdout + r.stderr).splitlines() if "spill stores" in line]
    assert len(log) == 3 * 2 + 3 + 1, log  # one ptxas report per kernel compiled
    assert all(" 0 bytes spill stores" in line for line in log), log


# Memory traffic under the interpreter ---------------------------------------------------------


@pytest.fixture
def loads(monkeypatch):
    """Counts the bytes each load requests under the interpreter (masked-in lanes x element size),
    keyed by (element type, block shape)."""
    from triton.runtime import interpreter

    counts: dict = {}
    original = interpreter.InterpreterBuilder.create_masked_load

    def counting(self, ptrs, mask, *args, **kwargs):
        ret = original(self, ptrs, mask, *args, **kwargs)
        key = (str(ptrs.get_element_ty()), tuple(ptrs.data.shape))
        counts[key] = counts.get(key, 0) + int(mask.data.sum()) * ret.data.itemsize
        return ret

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", counting)
    return counts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_each_logit_is_read_once(loads, dtype):
    n, v = 5, 9000  # 3 blocks a row, the last partial
    z, w = torch.randn(n, v).to(dtype), torch.randn(n, v).to(dtype)
    y = torch.tensor([1, IGNORE_INDEX, 8999, 4096, 0])
    kernels.token_dependency(z, w, y, impl="triton")
    s = z.element_size()
    logits = sum(b for (ty, _), b in loads.items() if ty != "int64")
    assert logits == 2 * (n - 1) * v * s  # both tensors once; the ignored row not at all
    assert sum(loads.values()) == logits + n * 8  # plus the labels


def test_linear_loads_each_weight_tile_once_per_row_block(loads):
    import kernels.dependency_linear as dep_lin

    hc, hm, w, y = _hidden_case(torch.bfloat16, n=70, h=96, v=1000)
    kernels.token_dependency_linear(hc, hm, w, y, impl="triton")
    bn, bv, bh, _ = dep_lin._linear_blocks(2)
    weight = loads[("bf16", (bv, bh))]
    assert weight == -(-70 // bn) * 1000 * 96 * 2  # serves both hidden states
