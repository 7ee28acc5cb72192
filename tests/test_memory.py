"""Memory bounds of the chunked torch impls, measured with bench.meters.peak_live_bytes."""

import pytest
import torch

import kernels
import kernels.dependency as dep
import kernels.dependency_linear as dep_lin
from bench.meters import peak_live_bytes, peak_tensor_bytes
from kernels import reference as ref

MB = 2**20


def pattern(x):
    a = torch.empty(1000, device=x.device)  # 4000 bytes
    b = torch.empty(2000, device=x.device)  # 8000: 12000 live, the peak
    del a  # 8000
    c = torch.empty(500, device=x.device)  # 10000
    v = x[: x.numel() // 2].add_(1)  # a view and an in-place op of the input: nothing new
    return b, c, v


def test_meter_on_a_known_allocation_pattern():
    x = torch.ones(1000)  # allocated before the call: not counted

    _, peak = peak_live_bytes(pattern, x)
    assert peak == 12000
    assert peak_live_bytes(torch.exp, x)[1] == x.nbytes
    # Workspaces inside an op count too: logsumexp shifts a full copy of its input.
    out, peak = peak_live_bytes(torch.logsumexp, x.view(10, 100), -1)
    assert out.nbytes == 40 and peak >= x.nbytes


def test_tensor_meter_on_a_known_allocation_pattern():
    for device in ("cpu", "meta"):
        x = torch.ones(1000, device=device)
        assert peak_tensor_bytes(pattern, x)[1] == 12000
        assert peak_tensor_bytes(torch.exp, x)[1] == 4000


@pytest.mark.slow  # about 15-35 s on 2 shared cores: the size is the point of the test
def test_token_dependency_torch_holds_one_chunk():
    n, v = 2048, 152064  # Qwen2.5-VL vocabulary; bf16 inputs: 2 x 623 MB
    z = torch.empty(n, v, dtype=torch.bfloat16).uniform_(-8, 8)  # faster than randn
    w = torch.empty(n, v, dtype=torch.bfloat16).uniform_(-8, 8)
    y = torch.randint(0, v, (n,))
    y[::7] = kernels.IGNORE_INDEX
    out, peak = peak_live_bytes(kernels.token_dependency, z, w, y, impl="torch")
    assert peak <= 256 * MB, peak / MB
    # The naive reference holds several fp32 [rows, V] tensors at once; measured on a slice of
    # 256 rows (all 2048 would need about 9 GB on this shared machine).
    m = 256
    r, peak_ref = peak_live_bytes(ref.token_dependency, z[:m], w[:m], y[:m])
    assert peak_ref >= 4 * m * v * 4, peak_ref / (m * v * 4)
    for a, b in zip(out, r):
        torch.testing.assert_close(a[:m], b, rtol=1e-5, atol=1e-5)


def test_token_dependency_linear_torch_never_holds_n_by_v():
    # The full size, N = 2048, H = 3584, V = 152064, on "meta" tensors: the allocation pattern
    # of the torch impl without its 4.5 TFLOP of CPU matmuls. (The private entry point skips
    # the label range check, which needs real data.)
    n, h, v = 2048, 3584, 152064
    meta = dict(device="meta", dtype=torch.bfloat16)
    hc, hm, w = torch.empty(n, h, **meta), torch.empty(n, h, **meta), torch.empty(v, h, **meta)
    y = torch.empty(n, dtype=torch.int64, device="meta")
    _, peak = peak_tensor_bytes(dep_lin._dependency_linear_torch, hc, hm, w, y, 1.0)
    assert peak <= 256 * MB, peak / MB
    assert peak < n * v * 2  # not even one bf16 [N, V] tensor
    # The same meter sees the naive route's logits: two bf16 [N, V] plus several fp32 ones.
    naive = lambda: dep._dependency_torch(hc @ w.T, hm @ w.T, y, 1.0)
    assert peak_tensor_bytes(naive)[1] >= 2 * n * v * 2


def test_token_dependency_linear_torch_real_allocations():
    # Real CPU allocations (op workspaces included) at a smaller hidden size.
    n, h, v = 512, 256, 152064
    hc, hm = torch.randn(n, h).bfloat16(), torch.randn(n, h).bfloat16()
    w = (torch.randn(v, h) / 8).bfloat16()
    y = torch.randint(0, v, (n,))
    out, peak = peak_live_bytes(kernels.token_dependency_linear, hc, hm, w, y, impl="torch")
    assert peak <= 256 * MB, peak / MB
    assert peak < n * v * 4  # less than one fp32 [N, V] tensor
    assert all(torch.isfinite(x).all() for x in out)
