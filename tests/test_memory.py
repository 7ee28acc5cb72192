"""Memory bounds of the chunked torch impls, measured with bench.meters.peak_live_bytes."""

import pytest
import torch

import kernels
from bench.meters import peak_live_bytes
from kernels import reference as ref

MB = 2**20


def test_meter_on_a_known_allocation_pattern():
    x = torch.ones(1000)  # allocated before the call: not counted

    def pattern(x):
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(2000)  # 8000: 12000 live, the peak
        del a  # 8000
        c = torch.empty(500)  # 10000
        return b, c

    (b, c), peak = peak_live_bytes(pattern, x)
    assert peak == 12000
    assert peak_live_bytes(torch.exp, x)[1] == x.nbytes
    # Workspaces inside an op count too: logsumexp shifts a full copy of its input.
    out, peak = peak_live_bytes(torch.logsumexp, x.view(10, 100), -1)
    assert out.nbytes == 40 and peak >= x.nbytes


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
