"""topk_token_mask: the Triton kernel (interpreter on CPU) and the torch impl against
kernels.reference, exact counts, ties, degenerate rows and bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import reference as ref
from kernels._utils import topk_counts

IMPLS = ["triton", "torch"]


def _check(scores, mask, ratio, impl):
    out = kernels.topk_token_mask(scores, mask, ratio, impl=impl)
    valid = mask.bool()
    assert out.dtype == torch.bool and out.shape == scores.shape
    assert not (out & ~valid).any()  # invalid positions are never taken
    assert torch.equal(out.sum(-1), topk_counts(valid.sum(-1), ratio))  # exact counts
    assert torch.equal(out, ref.topk_token_mask(scores, mask, ratio))
    return out


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ratio", [0.05, 0.3, 0.7, 1.0])
def test_matches_reference(impl, dtype, ratio):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 300, generator=g)
    s[1] = torch.randint(-3, 4, (300,), generator=g).float()  # many ties
    s[2, ::5] = -0.0  # -0.0 ties with +0.0
    s[2, 1::5] = 0.0
    s[3, ::7] = float("inf")
    s[3, 3::7] = float("-inf")
    mask = torch.rand(6, 300, generator=g) < 0.7
    mask[4] = False  # L = 0
    mask[5, :1] = True
    mask[5, 1:] = False  # L = 1
    _check(s.to(dtype), mask, ratio, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_ties_go_to_the_lower_position(impl):
    s = torch.tensor([[2.0, 5.0, 5.0, 5.0, 1.0, 5.0], [0.0] * 6])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    out = kernels.topk_token_mask(s, mask, 0.5, impl=impl)  # k = 3 of 6, 3 of 5
    assert out.tolist() == [
        [False, True, True, True, False, False],
        [False, True, True, True, False, False],
    ]


@pytest.mark.parametrize("impl", IMPLS)
def test_ratio_one_and_empty_rows(impl):
    s = torch.randn(3, 50)
    mask = torch.ones(3, 50, dtype=torch.int64)
    mask[1] = 0
    mask[2, 25:] = 0
    out = kernels.topk_token_mask(s, mask, 1.0, impl=impl)
    assert torch.equal(out, mask.bool())
    out = kernels.topk_token_mask(s, mask, 1e-6, impl=impl)  # at least one of L > 0
    assert out.sum(-1).tolist() == [1, 0, 1]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("length", [4096, 5000, 20000])  # one block, past one block, 20k tokens
def test_long_rows(impl, length):
    g = torch.Generator().manual_seed(length)
    s = torch.randn(2, length, generator=g)
    s[1] = torch.randint(0, 50, (length,), generator=g).float()  # long runs of ties
    mask = torch.ones(2, length, dtype=torch.bool)
    mask[0, length - 123 :] = False
    _check(s, mask, 0.37, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_scores_and_integer_masks(impl):
    big = torch.randn(4, 700).bfloat16()
    s = big[:, 50:650]  # row stride 700
    mask = (torch.rand(4, 600) < 0.5).to(torch.uint8)
    _check(s, mask, 0.25, impl)


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_only_matters_at_valid_positions(impl):
    s = torch.randn(2, 10)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 3] = False
    s[0, 3] = float("nan")
    _check(s, mask, 0.5, impl)
    s[1, 4] = float("nan")
    with pytest.raises(ValueError, match="scores"):
        kernels.topk_token_mask(s, mask, 0.5, impl=impl)


@pytest.mark.parametrize("impl", IMPLS + ["auto"])
def test_bad_input_names_the_argument(impl):
    s, mask = torch.randn(2, 8), torch.ones(2, 8, dtype=torch.bool)
    for ratio in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="ratio"):
            kernels.topk_token_mask(s, mask, ratio, impl=impl)
    with pytest.raises(ValueError, match="response_mask"):
        kernels.topk_token_mask(s, mask[:, :7], 0.5, impl=impl)
    with pytest.raises(ValueError, match="response_mask"):
        kernels.topk_token_mask(s, mask.float(), 0.5, impl=impl)
    with pytest.raises(ValueError, match="response_mask"):
        kernels.topk_token_mask(s, torch.ones(2, 8, dtype=torch.bool, device="meta"), 0.5, impl=impl)
    with pytest.raises(ValueError, match="scores"):
        kernels.topk_token_mask(s[0], mask[0], 0.5, impl=impl)
    with pytest.raises(ValueError, match="scores"):
        kernels.topk_token_mask(s.long(), mask, 0.5, impl=impl)


_COMPILE = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.topk import _topk_kernel

for dt in ("*fp32", "*bf16"):
    t = dict(p_scores=dt, p_valid="*i8", p_k="*i64", p_out="*i8", T="i32")
    t.update(stride_s="i32", stride_v="i32", stride_o="i32", BLOCK_T="constexpr")
    src = ASTSource(fn=_topk_kernel, signature=t, constexprs=dict(BLOCK_T=4096))
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
"""


def test_kernel_compiles_for_h100_without_spills(tmp_path):
    # The interpreter accepts code that the GPU compiler rejects (the launcher's block size).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DUMP_PTXAS_LOG="1")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", _COMPILE], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr[-4000:]
    log = [line for line in (r.stdout + r.stderr).splitlines() if "spill stores" in line]
    assert len(log) == 2 and all(" 0 bytes spill stores" in line for line in log), log
