"""Measuring: each case's providers on its shapes, one row per (case, shape, provider).

Per row: median time with 20 % / 80 % quantiles (GPU: triton.testing.do_bench; CPU: torch
providers only, wall clock), peak extra memory (GPU: the CUDA allocator's peak; CPU:
bench.meters.peak_live_bytes), bytes and FLOPs of the torch providers counted op by op
(bench.flops) and ratios to the naive reference taken in the same run. Also the two
measurements that run in subprocesses: the bytes each Triton / Liger provider requests under
the interpreter (bench.traffic) and the ahead-of-time GPU compile report (bench.gpu_compile).
Judging the numbers is bench.judge's business, writing them bench.report's.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import roofline
from .cases import PROVIDERS, Case, Shape, Unavailable, shape_dims
from .flops import OpCounter

# ---- measuring one provider ------------------------------------------------------------------


def _nvtx(name: str):
    import nvtx

    return nvtx.annotate(name, color="green")


def time_call(fn, device: str, reps: int) -> dict:
    """Median and 20 % / 80 % quantiles of one call, in ms."""
    if device == "cuda":
        from triton.testing import do_bench

        med, q20, q80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return dict(ms=med, ms_q20=q20, ms_q80=q80, reps=None)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) > 1 else ts * 9
    return dict(ms=statistics.median(ts), ms_q20=q[1], ms_q80=q[7], reps=len(ts))


def peak_memory(fn, device: str) -> tuple[object, int]:
    """(result, peak extra bytes allocated during one call)."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        return out, torch.cuda.max_memory_allocated() - base
    from .meters import peak_live_bytes

    return peak_live_bytes(fn)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


def max_abs_err(out, ref) -> float | None:
    a, b = _tensors(out), _tensors(ref)
    if not a or len(a) != len(b):
        return None
    errs = [(x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(a, b) if x.numel()]
    return max(errs) if errs else 0.0


def reps_for(first_ms: float, tiny: bool) -> int:
    if tiny:
        return 2
    return 3 if first_ms > 1500 else 5 if first_ms > 200 else 10


def run_provider(case: Case, prov: str, inputs: dict, shape: Shape, device: str, tiny: bool, ref_out) -> dict:
    row = dict(
        case=case.name, shape=shape.key(), tokens=shape.tokens, provider=prov, memory_only=shape.memory_only
    )
    if prov in case.notes:
        row["note"] = case.notes[prov]
    tag = f"{case.name}/{prov}/{shape.key()}"
    try:
        with _nvtx(f"{tag}/setup"):
            fn = case.providers[prov](inputs)  # torch.compile compiles here (its first call)
        # The first call is the memory pass (on CPU eager code needs no warm-up; the compile
        # provider has had its first call): bytes, and for eager code its ops counted too.
        t0 = time.perf_counter()
        with _nvtx(f"{tag}/memory"):
            if prov in ("naive", "torch"):  # count the eager ops too (roofline of eager PyTorch)
                with OpCounter() as c:
                    out, peak = peak_memory(fn, device)
                row.update(torch_bytes=c.bytes, torch_flops=c.flops)
                row["pred_h100_ms"] = roofline.eager_time(c.ops) * 1e3
            else:
                out, peak = peak_memory(fn, device)
        first_ms = (time.perf_counter() - t0) * 1e3
    except Unavailable as e:
        return row | dict(status=f"unavailable: {e}")
    except Exception as e:
        return row | dict(status=f"error: {type(e).__name__}: {e}"[:500])
    row["status"] = "ok"
    row["peak_bytes"] = peak
    row["out_bytes"] = sum(t.numel() * t.element_size() for t in _tensors(out))
    if ref_out is not None and prov != "naive":
        row["max_abs_err_vs_naive"] = max_abs_err(out, ref_out)
    row["_out"] = out
    try:
        if not shape.memory_only:
            with _nvtx(f"{tag}/timed"):
                row.update(time_call(fn, device, reps_for(first_ms, tiny)))
    except Exception as e:
        row["status"] = f"error: {type(e).__name__}: {e}"[:500]
    return row


# ---- the run ---------------------------------------------------------------------------------


def run_case(case: Case, device: str, tiny: bool, log=print) -> list[dict]:
    rows = []
    for shape in case.shapes(device, tiny):
        inputs = case.make_inputs(shape, torch.device(device))
        ref_out = None
        for prov in PROVIDERS:
            if shape.memory_only and device == "cpu" and prov not in ("torch", "triton"):
                continue  # the naive reference at this point would not fit beside the others: extrapolated
            t0 = time.perf_counter()
            row = run_provider(case, prov, inputs, shape, device, tiny, ref_out)
            if prov == "naive":
                ref_out = row.get("_out")
            row.pop("_out", None)
            row["wall_s"] = round(time.perf_counter() - t0, 2)
            log(f"  {case.name:24s} {shape.key():32s} {prov:8s} {row['status'][:70]} ({row['wall_s']} s)")
            if device == "cuda" and "ms" in row:
                _achieved(case, shape, row)
            rows.append(row)
        del inputs, ref_out
    _ratios(rows, device)
    return rows


def _ratios(rows: list[dict], device: str) -> None:
    """Ratios to the naive reference of the same shape; on CPU the memory-only point's naive
    memory is extrapolated linearly in N from the measured shapes with the same V, H, dtype."""
    by_shape: dict[str, dict] = {}
    for r in rows:
        by_shape.setdefault(r["shape"], {})[r["provider"]] = r
    for key, provs in by_shape.items():
        naive = provs.get("naive")
        if naive is None and device == "cpu":
            naive = _extrapolated_naive(key, by_shape)
            if naive is not None:
                provs["naive_extrapolated"] = naive
        if not naive or naive.get("status") != "ok":
            continue
        for r in provs.values():
            if r is naive or r.get("status") != "ok":
                continue
            if "ms" in r and "ms" in naive:
                r["time_vs_naive"] = r["ms"] / naive["ms"]
            if naive.get("peak_bytes"):
                r["mem_vs_naive"] = r["peak_bytes"] / naive["peak_bytes"]
                if naive.get("extrapolated"):
                    r["naive_peak_bytes_extrapolated"] = naive["peak_bytes"]


def _extrapolated_naive(key: str, by_shape: dict) -> dict | None:
    d, dtype = shape_dims(key)
    pts = []
    for k, provs in by_shape.items():
        dk, dt = shape_dims(k)
        n = provs.get("naive")
        if (
            k != key
            and dt == dtype
            and {a: b for a, b in dk.items() if a != "N"} == {a: b for a, b in d.items() if a != "N"}
        ):
            if n and n.get("status") == "ok" and n.get("peak_bytes"):
                pts.append((dk["N"], n["peak_bytes"]))
    if len(pts) < 2:
        return None
    (n0, p0), (n1, p1) = sorted(pts)[-2:]
    slope = (p1 - p0) / (n1 - n0)
    return dict(status="ok", extrapolated=True, peak_bytes=int(p1 + slope * (d["N"] - n1)), from_points=pts)


def run_traffic(case_names: list[str], tiny: bool, log=print) -> dict:
    """Interpreter byte counts in a subprocess (TRITON_INTERPRET must be set before import)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "bench.traffic", *case_names] + (["--tiny"] if tiny else [])
    t0 = time.perf_counter()
    p = subprocess.run(
        cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent
    )
    log(f"  traffic counting under the interpreter: rc={p.returncode} ({time.perf_counter() - t0:.1f} s)")
    if p.returncode != 0:
        return dict(error=(p.stderr or p.stdout)[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_compile_report(tiny: bool, log=print) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="0")
    cmd = [sys.executable, "-m", "bench.gpu_compile", "--json"] + (["--tiny"] if tiny else [])
    t0 = time.perf_counter()
    p = subprocess.run(
        cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent
    )
    log(f"  ahead-of-time compile for sm_80 / sm_90: rc={p.returncode} ({time.perf_counter() - t0:.1f} s)")
    if p.returncode != 0 or not p.stdout.strip():
        return dict(error=(p.stderr or p.stdout)[-2000:])
    return json.loads(p.stdout.strip().splitlines()[-1])


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(
        device="cuda" if gpu else "cpu",
        gpu=gpu,
        cpu=cpu,
        cpu_count=os.cpu_count(),
        load_avg=round(os.getloadavg()[0], 1),  # other work on the machine makes CPU times noisy
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )


def quiet_compile_logs() -> None:
    """The references validate their labels with a host sync: torch.compile breaks the graph
    there (expected) and says so at length on every case."""
    import logging

    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")


def _achieved(case: Case, shape: Shape, r: dict) -> None:
    """GPU only: achieved useful bandwidth (minimum bytes / time) and useful FLOP rate, as fractions
    of the H100 datasheet peaks (roofline.H100; on another GPU the fractions are of H100's)."""
    s = r["ms"] / 1e3
    r["achieved_bw_frac"] = case.min_bytes(shape) / s / roofline.H100["hbm_bytes_per_s"]
    if case.flops(shape):
        r["achieved_flops_frac"] = case.flops(shape) / s / roofline.H100["bf16_flops_per_s"]
