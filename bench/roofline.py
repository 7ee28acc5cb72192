"""Roofline predictions for one H100 SXM. Predictions, never measurements.

Figures used (NVIDIA H100 SXM5 datasheet): HBM3 bandwidth 3.35 TB/s, dense bf16 tensor-core
peak 989 TFLOP/s. A kernel is predicted to take max(bytes / bandwidth, flops / peak); an eager
PyTorch function is a sequence of kernels, one per aten op, so its prediction is the sum of the
per-op predictions. Launch latency, caches, the elementwise and exp work on the CUDA cores and
the achievable fraction of peak (about 90 % of HBM, 70-80 % of tensor-core peak in practice)
are not modelled: real times are longer.
"""

from __future__ import annotations

H100 = dict(name="H100 SXM (datasheet)", hbm_bytes_per_s=3.35e12, bf16_flops_per_s=989e12)


def kernel_time(nbytes: float, flops: float = 0.0, dev: dict = H100) -> float:
    """Seconds for one kernel moving nbytes and doing flops (tensor-core) at the roofline."""
    return max(nbytes / dev["hbm_bytes_per_s"], flops / dev["bf16_flops_per_s"])


def eager_time(ops, dev: dict = H100) -> float:
    """Seconds for a sequence of ops (each with .bytes and .flops), one kernel each."""
    return sum(kernel_time(o.bytes, o.flops, dev) for o in ops)
