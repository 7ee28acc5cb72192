"""Bytes and FLOPs of PyTorch code, counted op by op with a TorchDispatchMode.

Every aten op that runs (forward and backward) is one GPU kernel in eager PyTorch, so the
sum over ops of max(bytes / bandwidth, flops / peak) is a roofline prediction of eager
time. Bytes: each distinct input element read once, each output written once; view ops move
nothing. FLOPs: only the matmul-like ops in torch.utils.flop_counter's registry (the
elementwise work is not modelled: it is bandwidth-bound on every GPU we care about).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements of t (a broadcast, stride-0 dimension is read once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


@dataclass
class OpCount:
    name: str
    bytes: int
    flops: int


class OpCounter(TorchDispatchMode):
    """Context manager: counts `bytes` and `flops` of every aten op run inside it (per op in `ops`)."""

    def __init__(self):
        super().__init__()
        self.ops: list[OpCount] = []

    @property
    def bytes(self) -> int:
        return sum(o.bytes for o in self.ops)

    @property
    def flops(self) -> int:
        return sum(o.flops for o in self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func._schema.name in _FREE:
            return out
        ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        # distinct inputs read once; every output written (an in-place op's output is read and written)
        reads = {(t.data_ptr(), tuple(t.shape), tuple(t.stride())): distinct_bytes(t) for t in ins}
        if func._schema.name.endswith("_like"):  # zeros_like & co. read only the input's shape
            reads = {}
        nbytes = sum(reads.values()) + sum(distinct_bytes(t) for t in outs)
        flops = 0
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            flops = int(count(*args, **kwargs, out_val=out))
        self.ops.append(OpCount(func._schema.name, nbytes, flops))
        return out


# Ops that allocate or describe but move no data worth counting.
_FREE = {
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::detach",
    "aten::lift_fresh",
    "aten::is_same_size",
    "aten::_local_scalar_dense",
    "aten::sym_size",
    "aten::sym_stride",
    "aten::sym_numel",
}


def count_torch(fn, *args, **kwargs) -> tuple[object, OpCounter]:
    """Run fn(*args, **kwargs) under an OpCounter; returns (result, counter)."""
    with OpCounter() as c:
        out = fn(*args, **kwargs)
    return out, c
