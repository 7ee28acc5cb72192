"""What a bench case is (one file per case: bench/case_*.py, listed in bench/registry.py), and
the helpers the case files share.

A case owns its shapes, its inputs and its providers. A provider is a function of the inputs
that returns a zero-argument callable doing the work once (forward, or forward + backward);
it raises Unavailable when it cannot run here (Triton without a GPU, a kernel not written yet,
a library that computes something else), and the harness records the reason.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

PROVIDERS = ("naive", "compile", "torch", "triton", "liger")
QWEN = dict(H=3584, V=152064)  # Qwen2.5-VL-7B lm_head
SMALL = dict(H=1024, V=4096)  # the small-vocabulary shape
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


@dataclass
class Shape:
    """One bench point. tokens = N (rows); for top-k, B x T scores. memory_only: the memory
    target point, where only the memory-bounded providers run (see harness)."""

    N: int
    V: int = 0
    H: int = 0
    B: int = 0
    T: int = 0
    dtype: str = "bfloat16"
    label: str = ""
    memory_only: bool = False

    @property
    def tokens(self) -> int:
        return self.B * self.T if self.B else self.N

    @property
    def elt(self) -> int:
        return DTYPES[self.dtype].itemsize

    def key(self) -> str:
        dims = [f"{k}={getattr(self, k)}" for k in ("N", "B", "T", "H", "V") if getattr(self, k)]
        return " ".join(dims) + f" {self.dtype}"


def shape_dims(key: str) -> tuple[dict, str]:
    """The inverse of Shape.key: ({"N": 2048, "V": 152064, ...}, "bfloat16")."""
    *dims, dtype = key.split()
    return {k: int(v) for k, v in (d.split("=") for d in dims)}, dtype


@dataclass
class Case:
    name: str
    doc: str  # what one call computes
    make_inputs: Callable[[Shape, torch.device], dict]
    providers: dict[str, Callable[[dict], Callable[[], object]]]
    cpu_shapes: list[Shape]
    gpu_shapes: list[Shape]
    tiny_shapes: list[Shape]  # the test's end-to-end shape
    traffic_shapes: list[Shape]  # counted under the interpreter (small enough to run there)
    min_bytes: Callable[[Shape], int]  # each input read once, each output written once
    flops: Callable[[Shape], int] = lambda s: 0  # useful GEMM FLOPs of one call
    backward: bool = False
    # what a provider computes when it is not the full contract (e.g. Liger: log-probs only)
    notes: dict[str, str] = field(default_factory=dict)

    def shapes(self, device: str, tiny: bool) -> list[Shape]:
        if tiny:
            return self.tiny_shapes
        return self.gpu_shapes if device == "cuda" else self.cpu_shapes


# ---- helpers shared by the case files ------------------------------------------------------


def on_gpu(t: torch.Tensor) -> bool:
    return t.is_cuda


def triton_runnable(t: torch.Tensor) -> None:
    """Triton runs on CUDA tensors, or on CPU tensors only in an interpreter process."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unavailable("Triton needs a GPU (or the interpreter, used only to count traffic)")


def liger_runnable(t: torch.Tensor) -> None:
    """Liger is all Triton: on CPU tensors it runs only in the interpreter (traffic counting)."""
    if not t.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise Unavailable("Liger's Triton kernels need a GPU (its traffic is counted in the interpreter)")


def kept(n: int, ignore_every: int = 16) -> int:
    """Rows of labels_for(n) that are not ignored (an ignored row need not be read)."""
    return n - ceil_div(n, ignore_every)


def not_written(fn: Callable[[], object]) -> Callable[[], object]:
    """fn, with a kernel that is not written yet reported as Unavailable when first called."""

    def run():
        try:
            return fn()
        except NotImplementedError as e:
            raise Unavailable(f"not written yet: {e}") from None

    return run


def compiled(fn: Callable, key: str) -> Callable:
    """torch.compile(fn, dynamic=True), one compiled function per key for the whole run (the
    shape sweep reuses it); a failure to compile is raised as Unavailable with its message."""
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(fn, dynamic=True, backend=COMPILE_BACKEND[0])
    return _COMPILED[key]


_COMPILED: dict[str, Callable] = {}
COMPILE_BACKEND = ["inductor"]  # set by the harness (the smoke test uses "eager")


def call_compiled(cfn: Callable, *args, **kwargs) -> Callable[[], object]:
    run = lambda: cfn(*args, **kwargs)
    try:
        run()
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise Unavailable(
            f"torch.compile failed: {type(e).__name__}: {msg[0] if msg else ''}"[:400]
        ) from None
    return run


def fwd_bwd(forward: Callable[[], object], leaves: list[torch.Tensor]) -> Callable[[], object]:
    """A callable running forward() and backward of sum(out_i * g_i) with fixed random
    cotangents g_i; returns the gradients w.r.t. leaves (no .grad accumulation)."""
    cot: list[torch.Tensor] = []

    def run():
        outs = forward()
        outs = [outs] if isinstance(outs, torch.Tensor) else [o for o in outs if isinstance(o, torch.Tensor)]
        outs = [o for o in outs if o.requires_grad]
        if not cot:
            g = torch.Generator(device="cpu").manual_seed(1)
            cot.extend(torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs)
        loss = sum((o * c).sum() for o, c in zip(outs, cot))
        return torch.autograd.grad(loss, leaves)

    return run


def labels_for(n: int, v: int, device, ignore_every: int = 16) -> torch.Tensor:
    """Random labels in [0, v) with every `ignore_every`-th row ignored (-100)."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, v, (n,), generator=g)
    y[::ignore_every] = -100
    return y.to(device)


def randn(shape, dtype, device, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=dtype).mul_(scale)


def gemm_flops(n: int, h: int, v: int) -> int:
    return 2 * n * h * v


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = ["Case", "Shape", "Unavailable", "PROVIDERS", "QWEN", "SMALL", "math"]
