"""Meters shared by the tests and the benchmark harness.

peak_live_bytes(fn, *args, **kw) -> (result, peak_bytes): the largest number of bytes that
were allocated during the call and still alive at the same moment, on the CPU.

It records every allocation and free of PyTorch's CPU allocator through the profiler's memory
events (torch.profiler with profile_memory=True), so it sees op outputs and the workspaces ops
allocate inside (logsumexp's shifted copy, a sort's index buffers), not just the tensors the
Python code names. Memory that existed before the call (the inputs) is not counted; memory that
the call frees but did not allocate counts as negative, so the peak is of the extra bytes.
Allocators outside PyTorch (numpy, the Triton interpreter's host buffers) are invisible to it.
For CUDA tensors use torch.cuda.reset_peak_memory_stats / max_memory_allocated instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

# Kineto logs an error line on machines without a GPU; the meter has no use for it.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")


def peak_live_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run fn(*args, **kwargs) and return (its result, peak extra CPU bytes alive during it).

    The result itself counts while the call runs (it is allocated inside it). Example:
        out, peak = peak_live_bytes(torch.exp, x)   # peak == x.numel() * x.element_size()
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn(*args, **kwargs)
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()  # negative for a free
        peak = max(peak, live)
    return result, peak
