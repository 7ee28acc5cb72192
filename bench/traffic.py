"""Global-memory traffic of Triton kernels, counted under the Triton interpreter.

Under TRITON_INTERPRET=1 every global access of a kernel goes through
`triton.runtime.interpreter.InterpreterBuilder`: plain loads and stores are routed to
`create_masked_load` / `create_masked_store` (so are tensor-descriptor accesses), atomics to
`create_atomic_rmw` / `create_atomic_cas`. Wrapping them to add up the masked-in lanes times
the element size gives the bytes a kernel *requests* (what a GPU would move with perfect
coalescing and no cache reuse). `create_dot` is wrapped to count 2*M*N*K FLOPs.

Torch ops run by a provider outside its Triton kernels (a launcher's allocations, Liger's
torch matmuls) are counted by bench.flops.OpCounter; ops issued by the interpreter itself
while it launches a kernel are not.

Must run in a process where TRITON_INTERPRET=1 was set before triton was imported: the
harness runs `python -m bench.traffic` in a subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .cases import Case, Unavailable
from .registry import load_cases


@dataclass
class Traffic:
    loaded: int = 0  # bytes requested by loads (atomics count as a load and a store)
    stored: int = 0
    dot_flops: int = 0
    launches: int = 0
    torch_bytes: int = 0  # torch ops of the provider outside its Triton kernels
    torch_flops: int = 0

    @property
    def triton_bytes(self) -> int:
        return self.loaded + self.stored


def _lanes(mask) -> int:
    return int(np.count_nonzero(mask.data))


@contextlib.contextmanager
def count_traffic():
    """Context manager yielding a Traffic that the Triton kernels and torch ops run inside fill in."""
    from triton.runtime import interpreter as I

    from .flops import OpCounter

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("count_traffic needs TRITON_INTERPRET=1 set before triton is imported")
    t = Traffic()
    B = I.InterpreterBuilder
    saved = {
        k: getattr(B, k)
        for k in (
            "create_masked_load",
            "create_masked_store",
            "create_atomic_rmw",
            "create_atomic_cas",
            "create_dot",
        )
    }
    saved_run = I.InterpretedFunction.run
    size = lambda handle: handle.get_element_ty().primitive_bitwidth // 8

    def masked_load(self, ptrs, mask, other, *a, **k):
        t.loaded += _lanes(mask) * size(ptrs)
        return saved["create_masked_load"](self, ptrs, mask, other, *a, **k)

    def masked_store(self, ptrs, value, mask, *a, **k):
        t.stored += _lanes(mask) * size(ptrs)
        return saved["create_masked_store"](self, ptrs, value, mask, *a, **k)

    def atomic_rmw(self, op, ptr, val, mask, *a, **k):
        n = _lanes(mask) * size(ptr)
        t.loaded += n
        t.stored += n
        return saved["create_atomic_rmw"](self, op, ptr, val, mask, *a, **k)

    def atomic_cas(self, ptr, cmp, val, *a, **k):
        n = int(np.size(ptr.data)) * size(ptr)
        t.loaded += n
        t.stored += n
        return saved["create_atomic_cas"](self, ptr, cmp, val, *a, **k)

    def dot(self, a, b, d, *rest, **k):
        m, kk = a.data.shape[-2:]
        t.dot_flops += 2 * m * kk * b.data.shape[-1] * int(np.prod(a.data.shape[:-2]))
        return saved["create_dot"](self, a, b, d, *rest, **k)

    counter = OpCounter()

    def run(self, *args, **kwargs):
        t.launches += 1
        # the interpreter copies arguments with torch ops: not the kernel's traffic
        with torch_paused(counter):
            return saved_run(self, *args, **kwargs)

    B.create_masked_load, B.create_masked_store = masked_load, masked_store
    B.create_atomic_rmw, B.create_atomic_cas, B.create_dot = atomic_rmw, atomic_cas, dot
    I.InterpretedFunction.run = run
    try:
        with counter:
            yield t
    finally:
        for k, v in saved.items():
            setattr(B, k, v)
        I.InterpretedFunction.run = saved_run
        t.torch_bytes, t.torch_flops = counter.bytes, counter.flops


@contextlib.contextmanager
def torch_paused(counter):
    """Stop counting torch ops inside (the interpreter's own argument copies)."""
    n = len(counter.ops)
    try:
        yield
    finally:
        del counter.ops[n:]


def count_case(case: Case, tiny: bool = False) -> list[dict]:
    """Bytes and FLOPs of the case's Triton and Liger providers under the interpreter (needs
    TRITON_INTERPRET=1), one row per (shape, provider)."""
    rows = []
    for shape in case.tiny_shapes if tiny else case.traffic_shapes:
        inputs = case.make_inputs(shape, torch.device("cpu"))
        for prov in ("triton", "liger"):
            row = dict(shape=shape.key(), tokens=shape.tokens, provider=prov, min_bytes=case.min_bytes(shape))
            row["useful_flops"] = case.flops(shape)
            try:
                fn = case.providers[prov](inputs)
                fn()  # compile / warm-up outside the count
                with count_traffic() as t:
                    fn()
                row.update(t.__dict__)
                row["status"] = "ok"
            except Unavailable as e:
                row["status"] = f"unavailable: {e}"
            except Exception as e:  # a kernel that fails here is reported, not fatal
                row["status"] = f"error: {type(e).__name__}: {e}"[:500]
            rows.append(row)
    return rows


def _main(argv: list[str]) -> int:
    """`python -m bench.traffic CASE [CASE ...] [--tiny]`: prints {case: [rows]} as JSON."""
    tiny = "--tiny" in argv
    names = [a for a in argv if not a.startswith("--")]
    out = {}
    for case in load_cases(names):
        out[case.name] = count_case(case, tiny=tiny)
    json.dump(out, sys.stdout, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
