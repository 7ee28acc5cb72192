"""GPU readiness without a GPU: compile every Triton kernel of `kernels` ahead of time for
sm_80 (A100) and sm_90a (H100) and read ptxas's resource report.

How the launch parameters are found: each public kernel function is called with impl="triton"
on CPU tensors of the bench shapes (Qwen2.5-VL-7B: H = 3584, V = 152064; and a small shape),
forward and backward, while `JITFunction.run` is replaced by a recorder. So the launchers
themselves pick the block sizes, warps and stages, and nothing here copies their logic. Each
recorded launch is specialised the way the JIT would specialise it on a GPU (triton's own
`native_specialize_impl`: 16-byte divisibility of pointers and ints, ints equal to 1 become
constants), then compiled with `triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`.
The resource report comes from running the bundled ptxas with `-v` on the PTX Triton produced,
with the flags Triton uses: the same report as TRITON_DUMP_PTXAS_LOG=1, independent of the
cache. Per kernel: registers per thread, spill bytes, shared memory, warps, stages, the widest
global load in the PTX, and tensor-core instructions (mma.sync on sm_80, wgmma on sm_90a).

Runs in a process with TRITON_INTERPRET=0 (`python -m bench.gpu_compile --json`), since the
interpreter replaces the JIT functions.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

ARCHS = (80, 90)
DTYPES = ("bfloat16", "float32")
QWEN = dict(N=64, H=3584, V=152064, B=8, T=2048)
# Same N as QWEN so that the row-block choices coincide and most compiles are shared.
SMALL = dict(N=64, H=256, V=4096, B=4, T=300)
TIMEOUT_S = 60.0  # a kernel that takes longer than this to compile is reported as a failure


@dataclass
class Launch:
    fn: object  # triton JITFunction
    args: tuple
    kwargs: dict
    origin: str  # the public call that launched it


@contextlib.contextmanager
def record_launches(origin: list[str]):
    """Replace JITFunction.run by a recorder that launches nothing; yields the list of Launch."""
    from triton.runtime.jit import JITFunction

    import kernels._utils as U

    launches: list[Launch] = []
    saved_run, saved_interp = JITFunction.run, U.INTERPRET

    def run(self, *args, grid, warmup=False, **kwargs):
        launches.append(Launch(self, args, dict(kwargs), origin[0]))

    JITFunction.run = run
    U.INTERPRET = True  # let resolve_impl accept impl="triton" on CPU tensors; kernels see their GPU flags
    try:
        yield launches
    finally:
        JITFunction.run, U.INTERPRET = saved_run, saved_interp


def _empty(shape, dtype, requires_grad=False):
    # torch.empty: never written by the recorder, so a [V, H] weight costs no memory
    return torch.empty(shape, dtype=dtype).requires_grad_(requires_grad)


def _labels(n, v):
    y = torch.randint(0, v, (n,))
    y[::7] = -100
    return y


def public_calls(dims: dict, dtype: torch.dtype):
    """(name, thunk) pairs calling every public kernel with impl="triton", forward and backward."""
    import kernels

    n, h, v, b, t = dims["N"], dims["H"], dims["V"], dims["B"], dims["T"]

    def dep():
        kernels.token_dependency(_empty((n, v), dtype), _empty((n, v), dtype), _labels(n, v), impl="triton")

    def dep_lin():
        kernels.token_dependency_linear(
            _empty((n, h), dtype), _empty((n, h), dtype), _empty((v, h), dtype), _labels(n, v), impl="triton"
        )

    def topk():
        mask = torch.ones(b, t, dtype=torch.bool)
        kernels.topk_token_mask(torch.randn(b, t).to(dtype), mask, 0.4, impl="triton")

    def logp():
        z = _empty((n, v), dtype, True)
        lp, ent = kernels.token_logprobs(z, _labels(n, v), impl="triton")
        torch.autograd.backward([lp, ent], [torch.ones_like(lp), torch.ones_like(ent)])

    def logp_lin():
        hid, w = _empty((n, h), dtype, True), _empty((v, h), dtype, True)
        lp, ent = kernels.token_logprobs_linear(hid, w, _labels(n, v), impl="triton")
        torch.autograd.backward([lp, ent], [torch.ones_like(lp), torch.ones_like(ent)])

    return [
        ("token_dependency", dep),
        ("token_dependency_linear", dep_lin),
        ("topk_token_mask", topk),
        ("token_logprobs", logp),
        ("token_logprobs_linear", logp_lin),
    ]


def specialize(launch: Launch) -> tuple[dict, dict, dict, dict]:
    """(signature, constexprs, attrs, options) of a recorded launch, as the JIT would build them."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    fn = launch.fn
    opt_names = (
        "num_warps",
        "num_stages",
        "num_ctas",
        "maxnreg",
        "enable_fp_fusion",
        "launch_cooperative_grid",
    )
    options = {k: launch.kwargs.pop(k) for k in opt_names if k in launch.kwargs}
    bound = inspect.signature(fn.fn).bind(*launch.args, **launch.kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for i, (p, (name, value)) in enumerate(zip(fn.params, bound.arguments.items())):
        if p.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
            continue
        spec = not p.do_not_specialize
        align = not p.do_not_specialize_on_alignment
        ty, attr = native_specialize_impl(BaseBackend, value, False, spec, align)
        if ty == "constexpr":  # an int equal to 1 (or None)
            signature[name], constexprs[name] = "constexpr", attr
        else:
            signature[name] = ty
            if attr == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
}
_LD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\b")


def ptxas_report(ptx: str, arch: str) -> dict:
    """ptxas -v on ptx for arch (e.g. sm_90a), with Triton's flags; parsed numbers and the log."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(int(re.sub(r"\D", "", arch))).path
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", src, "-o", src + ".o"]
        p = subprocess.run(cmd, capture_output=True, text=True)
    log = p.stderr + p.stdout
    out = {k: int(m.group(1)) if (m := r.search(log)) else None for k, r in _PTXAS_RE.items()}
    out["spill_bytes"] = (out["spill_stores"] or 0) + (out["spill_loads"] or 0)
    out["ptxas_rc"] = p.returncode
    out["ptxas_log"] = log.strip()[-1500:]
    return out


_CP_ASYNC = re.compile(
    r"\bcp\.async\.c[ag]\.shared\.global(?:\.[a-z0-9_:]+)*\s*\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)"
)


def ptx_features(ptx: str) -> dict:
    """Widest global load (plain ld.global, or cp.async into shared memory), TMA and tensor-core use."""
    widest = 0
    for m in _LD.finditer(ptx):
        widest = max(widest, int(m.group(1) or 1) * int(m.group(2)) // 8)
    widest_async = max((int(m.group(1), 0) for m in _CP_ASYNC.finditer(ptx)), default=0)
    return dict(
        widest_global_load_bytes=max(widest, widest_async),
        widest_ld_global_bytes=widest,
        widest_cp_async_bytes=widest_async,
        tma=len(re.findall(r"\bcp\.async\.bulk\.tensor\b", ptx)),
        mma_sync=len(re.findall(r"\bmma\.sync\.aligned\b", ptx)),
        wgmma=len(re.findall(r"\bwgmma\.mma_async\b", ptx)),
        ld_global=len(re.findall(r"\bld\.global\b", ptx)),
    )


def compile_launch(launch: Launch, cap: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, consts, attrs, options = specialize(
        Launch(launch.fn, launch.args, dict(launch.kwargs), launch.origin)
    )
    t0 = time.perf_counter()
    rec = dict(kernel=launch.fn.__name__, origin=launch.origin, arch=sm_arch(cap))
    rec["constexprs"] = {
        k: (v if isinstance(v, (int, float, str, bool)) or v is None else str(v)) for k, v in consts.items()
    }
    rec["signature"] = {k: v for k, v in sig.items() if v != "constexpr"}
    try:
        src = ASTSource(fn=launch.fn, signature=sig, constexprs=consts, attrs=attrs)
        ck = triton.compile(src, target=GPUTarget("cuda", cap, 32), options=options)
    except Exception as e:
        msg = [m for m in str(e).strip().splitlines() if m.strip()]
        # a CompilationError is "at L:C: <source lines> ... <reason>": keep the place and the reason
        where = msg[0].split(":")[:3] if msg else []
        reason = msg[-1] if msg else ""
        return rec | dict(status=f"compile error: {type(e).__name__} {':'.join(where)}: {reason}"[:600])
    md = ck.metadata
    ptx = ck.asm["ptx"]
    rec.update(num_warps=md.num_warps, num_stages=md.num_stages, shared_bytes=md.shared, compile_s=0.0)
    rec.update(ptxas_report(ptx, sm_arch(cap)))
    rec.update(ptx_features(ptx))
    rec["widest_global_load"] = (
        f"{rec['widest_ld_global_bytes']} B"
        + (f", cp.async {rec['widest_cp_async_bytes']} B" if rec["widest_cp_async_bytes"] else "")
        + (", TMA" if rec["tma"] else "")
    )
    rec["tensor_core"] = (
        f"wgmma x{rec['wgmma']}" if rec["wgmma"] else f"mma x{rec['mma_sync']}" if rec["mma_sync"] else "none"
    )
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    ok = rec["ptxas_rc"] == 0 and rec["registers"] is not None
    rec["status"] = "ok" if ok and rec["spill_bytes"] == 0 else ("spills" if ok else "ptxas failed")
    return rec


def compile_limited(launch: Launch, cap: int, timeout: float) -> dict:
    """compile_launch in a forked child, killed after `timeout` seconds (LLVM can take many
    minutes on a kernel whose tiles do not fit the register file)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(launch, cap, send))
    t0 = time.perf_counter()
    p.start()
    send.close()
    try:
        if recv.poll(timeout):
            return recv.recv()
        rec = dict(kernel=launch.fn.__name__, origin=launch.origin, arch=sm_arch(cap))
        return rec | dict(
            status=f"compile timeout: killed after {timeout:.0f} s",
            compile_s=round(time.perf_counter() - t0, 1),
        )
    except EOFError:
        return dict(
            kernel=launch.fn.__name__, origin=launch.origin, arch=sm_arch(cap), status="compiler crashed"
        )
    finally:
        if p.is_alive():
            p.kill()
        p.join()


def _child(launch, cap, send):
    try:
        send.send(compile_launch(launch, cap))
    except Exception as e:  # never leave the parent waiting
        send.send(
            dict(kernel=launch.fn.__name__, arch=sm_arch(cap), status=f"error: {type(e).__name__}: {e}"[:500])
        )


def sm_arch(cap: int) -> str:
    return f"sm_{cap}a" if cap >= 90 else f"sm_{cap}"


def report(
    shapes: dict[str, dict] | None = None, dtypes=DTYPES, archs=ARCHS, log=None, timeout: float = TIMEOUT_S
) -> dict:
    """Record every launch of every public call for each shape and dtype, compile each distinct
    (kernel, specialisation, options) once per arch. Returns {"kernels": [...], "calls": [...]}."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("bench.gpu_compile needs TRITON_INTERPRET=0 (the interpreter replaces the JIT)")
    shapes = shapes or dict(qwen=QWEN, small=SMALL)
    t_start = time.perf_counter()
    records, calls, seen = [], [], {}
    for label, dims in shapes.items():
        for dt in dtypes:
            dtype = getattr(torch, dt)
            for name, thunk in public_calls(dims, dtype):
                origin = [name]
                call = dict(call=name, shape=label, dtype=dt)
                with record_launches(origin) as launches:
                    try:
                        thunk()
                        call["status"] = "ok"
                    except NotImplementedError as e:
                        call["status"] = f"not written: {e}"
                    except Exception as e:
                        call["status"] = f"error: {type(e).__name__}: {e}"[:400]
                call["launches"] = [launch.fn.__name__ for launch in launches]
                calls.append(call)
                for launch in launches:
                    sig, consts, attrs, options = specialize(
                        Launch(launch.fn, launch.args, dict(launch.kwargs), launch.origin)
                    )
                    key = (
                        launch.fn.__name__,
                        repr(sorted(sig.items())),
                        repr(sorted(consts.items(), key=str)),
                        repr(sorted(attrs)),
                        repr(sorted(options.items())),
                    )
                    for cap in archs:
                        if (key, cap) in seen:
                            seen[key, cap]["shapes"].add(label)
                            seen[key, cap]["dtypes"].add(dt)  # e.g. a merge kernel of fp32 partials
                            continue
                        prev = [seen[key, c] for c in archs if (key, c) in seen]
                        if prev and prev[0]["status"].startswith("compile timeout"):
                            # the same kernel timed out for the other arch: do not spend another limit
                            rec = {k: prev[0][k] for k in ("kernel", "origin")} | dict(
                                arch=sm_arch(cap), status=f"not tried: timed out for {prev[0]['arch']}"
                            )
                        else:
                            rec = compile_limited(launch, cap, timeout)
                        rec.update(shapes={label}, dtypes={dt})
                        seen[key, cap] = rec
                        records.append(rec)
                        if log:
                            log(_line(rec, label, dt))
    for r in records:  # a compile shared by shapes / input dtypes lists them all
        r["shape"] = "+".join(sorted(r.pop("shapes"), reverse=True))
        r["dtypes"] = sorted(r["dtypes"])
        r["dtype"] = "+".join(r["dtypes"])
    return dict(kernels=records, calls=calls, shapes=shapes, wall_s=round(time.perf_counter() - t_start, 1))


def _line(rec: dict, label: str, dt: str) -> str:
    r = rec.get
    return (
        f"{rec['kernel']:28s} {rec['arch']:7s} {label:6s} {dt:9s} regs={r('registers')} "
        f"spill={r('spill_bytes')} "
        f"smem={r('shared_bytes')} ld={r('widest_global_load')} tc={r('tensor_core')} {rec['status']} "
        f"({r('compile_s')} s)"
    )


def _main(argv: list[str]) -> int:
    """`python -m bench.gpu_compile [--json] [--tiny] [--timeout S]`; --tiny: the small shape only."""
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-aot-"))
    shapes = dict(small=SMALL) if "--tiny" in argv else None
    as_json = "--json" in argv
    timeout = float(argv[argv.index("--timeout") + 1]) if "--timeout" in argv else TIMEOUT_S
    rep = report(shapes, log=None if as_json else print, timeout=timeout)
    if as_json:
        print(json.dumps(rep, default=str))
    else:
        bad = [r for r in rep["kernels"] if r["status"] != "ok"]
        print(f"{len(rep['kernels'])} compiles, {len(bad)} not ok, {rep['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
