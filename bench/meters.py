"""Meters shared by the tests and the benchmark harness.

peak_live_bytes(fn, *args, **kw) -> (result, peak_bytes): the largest number of bytes that
were allocated during the call and still alive at the same moment, on the CPU.
peak_tensor_bytes(fn, *args, **kw) -> (result, peak_bytes): the same for the tensors that ops
return, on any device, "meta" included: the allocation pattern of a full-size call can be
checked without computing it (op-internal workspaces are not seen).

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
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


class _StorageMeter(TorchDispatchMode):
    """Counts the bytes of every storage an op returns while that storage is alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self.seen: dict[int, weakref.finalize] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Views and in-place results share an input's storage: only new storages count.
        inputs = {
            t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self.seen or key in inputs:
                continue
            n = st.nbytes()
            # Storages keep their Python object alive as long as the storage lives, so the
            # finalizer runs exactly when the memory is released.
            self.seen[key] = weakref.finalize(st, self._release, key, n)
            self.live += n
            self.peak = max(self.peak, self.live)
        return out

    def _release(self, key: int, n: int) -> None:
        self.live -= n
        self.seen.pop(key, None)


def peak_tensor_bytes(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, int]:
    """Run fn(*args, **kwargs) under a TorchDispatchMode and return (its result, the peak bytes
    of op-returned storages alive at once). Works on "meta" tensors (nothing is computed), so a
    full-size call can be measured for free; storages existing before the call (inputs) and
    workspaces inside an op are not counted.
    """
    meter = _StorageMeter()
    with meter:
        result = fn(*args, **kwargs)
    for f in list(meter.seen.values()):
        f.detach()  # stop counting after the call
    return result, meter.peak
