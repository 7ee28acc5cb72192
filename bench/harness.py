"""The bench harness: runs every case's providers on its shapes and reports ratios to the naive
reference taken in the same run.

Per (case, shape, provider): median time with 20 % / 80 % quantiles (GPU: triton.testing.do_bench;
CPU: torch providers only, wall clock), peak extra memory (GPU: the CUDA allocator's peak; CPU:
bench.meters.peak_live_bytes), bytes and FLOPs of the torch providers counted op by op
(bench.flops) and, in an interpreter subprocess, the bytes each Triton / Liger provider
requests (bench.traffic). Then the roofline predictions (bench.roofline), the targets
(PASS / MISS), the ahead-of-time GPU compile report (bench.gpu_compile), and the outputs:
a table on stdout, bench/out/results.json, bench/out/README_table.md and PNG plots.
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
from .cases import COMPILE_BACKEND, PROVIDERS, QWEN, Case, Shape, Unavailable, load_cases
from .flops import OpCounter

CHUNK_BYTES = 256 * 2**20  # the torch impls' bound on [rows, V] temporaries (issue 2)
GPU_ONLY = (
    "Triton time and memory, Liger time and memory, achieved bandwidth / FLOP rate as a fraction "
    "of peak, and the measured side of the roofline comparison need a GPU"
)


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


def _dims(key: str) -> tuple[dict, str]:
    *dims, dtype = key.split()
    return {k: int(v) for k, v in (d.split("=") for d in dims)}, dtype


def _extrapolated_naive(key: str, by_shape: dict) -> dict | None:
    d, dtype = _dims(key)
    pts = []
    for k, provs in by_shape.items():
        dk, dt = _dims(k)
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


# ---- predictions and targets -----------------------------------------------------------------


def _traffic_for(case: Case, shape: Shape, traffic: dict, prov: str) -> dict | None:
    """The interpreter count to scale to `shape`: same V (and H) if counted, else the first."""
    rows = [r for r in traffic.get(case.name, []) if r["provider"] == prov and r["status"] == "ok"]
    if not rows:
        return None
    d, _ = _dims(shape.key())
    for r in rows:
        dr, _ = _dims(r["shape"])
        if dr.get("V") == d.get("V") and dr.get("H") == d.get("H"):
            return r
    return rows[0]


def predict(case: Case, shape: Shape, traffic: dict, prov: str = "triton") -> dict | None:
    """Roofline prediction for a Triton / Liger provider at `shape`, from its interpreter count:
    bytes scaled as (counted / minimum) x minimum(shape), FLOPs as (counted dot FLOPs / useful)
    x useful(shape)."""
    r = _traffic_for(case, shape, traffic, prov)
    if r is None:
        return None
    byte_ratio = (r["loaded"] + r["stored"] + r["torch_bytes"]) / r["min_bytes"]
    nbytes = byte_ratio * case.min_bytes(shape)
    flops = 0.0
    if case.flops(shape):
        counted = r["dot_flops"] + r["torch_flops"]
        flops = counted / max(r["useful_flops"], 1) * case.flops(shape)
    return dict(
        pred_h100_ms=roofline.kernel_time(nbytes, flops) * 1e3,
        pred_bytes=nbytes,
        pred_flops=flops,
        counted_at=r["shape"],
    )


def targets(results: dict) -> list[dict]:
    out = []
    rows = results["rows"]
    dev = results["machine"]["device"]

    def add(name, value, limit, ok, why=""):
        out.append(
            dict(
                target=name,
                value=value,
                limit=limit,
                result=("PASS" if ok else "MISS") if ok is not None else "n/a",
                why=why,
            )
        )

    # 1. token_dependency traffic <= 1.05 x minimum (interpreter count at the Qwen vocabulary)
    tr = [r for r in results["traffic"].get("token_dependency", []) if r["provider"] == "triton"]
    tr = [r for r in tr if r["status"] == "ok"]
    if tr:
        r = max(tr, key=lambda r: _dims(r["shape"])[0].get("V", 0))
        ratio = (r["loaded"] + r["stored"] + r["torch_bytes"]) / r["min_bytes"]
        add(
            "token_dependency traffic / minimum",
            round(ratio, 4),
            "<= 1.05",
            ratio <= 1.05,
            f"counted at {r['shape']}",
        )
    else:
        add(
            "token_dependency traffic / minimum",
            None,
            "<= 1.05",
            None,
            "Triton kernel not counted (see traffic)",
        )
    # 2. torch impls' peak extra memory <= 10 % of naive at N=2048, V=152064
    for r in rows:
        d, _ = _dims(r["shape"])
        if (
            r["provider"] == "torch"
            and d.get("N") == 2048
            and d.get("V") == QWEN["V"]
            and r["status"] == "ok"
        ):
            if "mem_vs_naive" in r:
                how = (
                    "naive extrapolated linearly in N" if "naive_peak_bytes_extrapolated" in r else "measured"
                )
                naive = r.get("naive_peak_bytes_extrapolated") or r["peak_bytes"] / r["mem_vs_naive"]
                if r.get("out_bytes", 0) > 2**20:  # a returned gradient counts as extra memory too
                    excl = (r["peak_bytes"] - r["out_bytes"]) / (naive - r["out_bytes"])
                    how += (
                        f"; {excl:.3f} without the {r['out_bytes'] / 2**20:.0f} MiB it returns (the gradient)"
                    )
                add(
                    f"{r['case']} torch peak memory / naive at {r['shape']}",
                    round(r["mem_vs_naive"], 4),
                    "<= 0.10",
                    r["mem_vs_naive"] <= 0.10,
                    how,
                )
    # 3. fused VPPO step: peak extra memory independent of V up to one chunk
    vs = [
        r
        for r in rows
        if r["case"] == "vppo_step" and r["provider"] in ("torch", "triton") and r["status"] == "ok"
    ]
    for prov in ("torch", "triton"):
        pts = {}
        for r in vs:
            if r["provider"] == prov and "peak_bytes" in r:
                d, _ = _dims(r["shape"])
                # the weight gradient [V, H] is an output of either path, not a temporary
                pts.setdefault(r["tokens"], {})[d["V"]] = r["peak_bytes"] - r.get("out_bytes", 0)
        for n, byv in sorted(pts.items()):
            if len(byv) >= 2:
                lo, hi = byv[min(byv)], byv[max(byv)]
                add(
                    f"vppo_step {prov}: peak extra less gradients, V={max(byv)} minus V={min(byv)}, N={n}",
                    hi - lo,
                    f"<= one chunk ({CHUNK_BYTES >> 20} MiB)",
                    hi - lo <= CHUNK_BYTES,
                )
    # 4. no torch impl slower on CPU than the naive reference
    if dev == "cpu":
        naive = {(r["case"], r["shape"]): r for r in rows if r["provider"] == "naive" and "ms" in r}
        for r in rows:
            if r["provider"] == "torch" and "time_vs_naive" in r:
                n = naive[r["case"], r["shape"]]
                overlap = r["ms_q20"] <= n["ms_q80"] and n["ms_q20"] <= r["ms_q80"]
                add(
                    f"{r['case']} torch time / naive at {r['shape']} (CPU)",
                    round(r["time_vs_naive"], 3),
                    "<= 1.0",
                    r["time_vs_naive"] <= 1.0,
                    "q20-q80 ranges overlap: within this machine's noise"
                    if overlap
                    else "q20-q80 ranges disjoint",
                )
    return out


# ---- outputs ---------------------------------------------------------------------------------


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


def _mb(b) -> str:
    return "" if b is None else f"{b / 2**20:.1f}"


def _f(x, fmt="{:.2f}") -> str:
    return "" if x is None else fmt.format(x)


def table_rows(results: dict) -> list[list[str]]:
    out = []
    for r in results["rows"]:
        t = f"{r['ms']:.2f} ({r['ms_q20']:.2f}-{r['ms_q80']:.2f})" if "ms" in r else ""
        status = "" if r["status"] == "ok" else r["status"]
        if r["status"] == "ok" and r.get("note"):
            status = r["note"]
        out.append(
            [
                r["case"],
                r["shape"],
                r["provider"],
                t,
                _f(r.get("time_vs_naive")),
                _mb(r.get("peak_bytes")),
                _f(r.get("mem_vs_naive"), "{:.3f}"),
                _f(r.get("pred_h100_ms"), "{:.4g}"),
                _achieved_str(r),
                status[:90],
            ]
        )
    return out


HEAD = [
    "case",
    "shape",
    "provider",
    "ms median (q20-q80)",
    "x naive",
    "peak extra MiB",
    "x naive",
    "H100 pred. ms",
    "achieved (GPU)",
    "status",
]


def traffic_rows(results: dict) -> list[list[str]]:
    out = []
    for case, rows in results["traffic"].items():
        if not isinstance(rows, list):
            continue
        for r in rows:
            if r["status"] != "ok":
                out.append([case, r["shape"], r["provider"], "", "", "", "", "", r["status"][:90]])
                continue
            tot = r["loaded"] + r["stored"] + r["torch_bytes"]
            n = max(r["tokens"], 1)
            out.append(
                [
                    case,
                    r["shape"],
                    r["provider"],
                    f"{r['loaded'] / n:,.0f}",
                    f"{r['stored'] / n:,.0f}",
                    f"{r['torch_bytes'] / n:,.0f}",
                    f"{r['min_bytes'] / n:,.0f}",
                    f"{tot / r['min_bytes']:.3f}",
                    f"{r['dot_flops'] + r['torch_flops']:.3g}",
                ]
            )
    return out


THEAD = [
    "case",
    "counted at",
    "provider",
    "loaded B/token",
    "stored B/token",
    "torch-op B/token",
    "minimum B/token",
    "x minimum",
    "GEMM FLOPs",
]


def pred_rows(results: dict) -> list[list[str]]:
    out = []
    for p in results["predictions"]:
        out.append(
            [
                p["case"],
                p["shape"],
                _f(p.get("naive_ms"), "{:.4g}"),
                _f(p.get("torch_ms"), "{:.4g}"),
                _f(p.get("triton_ms"), "{:.4g}"),
                _f(p.get("liger_ms"), "{:.4g}"),
                _f(p.get("measured_triton_ms"), "{:.4g}"),
            ]
        )
    return out


PHEAD = [
    "case",
    "shape",
    "naive (pred.)",
    "torch impl (pred.)",
    "Triton (pred.)",
    "Liger (pred.)",
    "Triton measured",
]


def compile_rows(results: dict) -> list[list[str]]:
    out = []
    rep = results.get("compile", {})
    for r in rep.get("kernels", []):
        out.append(
            [
                r["kernel"],
                r["arch"],
                r["dtype"],
                r["shape"],
                str(r.get("num_warps", "")),
                str(r.get("num_stages", "")),
                str(r.get("registers", "")),
                str(r.get("spill_bytes", "")),
                str(r.get("shared_bytes", "")),
                str(r.get("widest_global_load", "")),
                str(r.get("tensor_core", "")),
                r.get("status", "")[:60],
            ]
        )
    return out


CHEAD = [
    "kernel",
    "arch",
    "dtype",
    "shape",
    "warps",
    "stages",
    "regs/thread",
    "spill B",
    "smem B",
    "widest ld.global",
    "tensor-core",
    "status",
]


def markdown(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    w = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = lambda r: "  ".join(c.ljust(w[i]) for i, c in enumerate(r))
    return "\n".join([fmt(head), fmt(["-" * x for x in w])] + [fmt(r) for r in rows])


def readme_table(results: dict) -> str:
    m = results["machine"]
    where = f"GPU: {m['gpu']}" if m["gpu"] else f"CPU only: {m['cpu']}, {m['cpu_count']} cores"
    if m.get("load_avg") is not None:
        where += f", load average {m['load_avg']} at the start"
    parts = [
        f"Produced by `make bench` on {m['date']} ({where}; torch {m['torch']}, triton {m['triton']}). "
        "Ratios are to the naive reference in the same run.",
        "",
    ]
    if not m["gpu"]:
        parts += [
            f"**No GPU on this machine**: {GPU_ONLY}; those cells are empty or read `unavailable`. "
            "CPU times are wall clock of the torch providers; CPU memory is live tensor bytes "
            "(bench/meters.py).",
            "",
        ]
    parts += ["#### Time and memory", "", markdown(HEAD, table_rows(results)), ""]
    parts += [
        "#### Traffic counted under the Triton interpreter (bytes requested per token)",
        "",
        markdown(THEAD, traffic_rows(results)),
        "",
    ]
    parts += [
        f"#### Roofline PREDICTIONS for one {roofline.H100['name']} "
        f"({roofline.H100['hbm_bytes_per_s'] / 1e12:.2f} TB/s HBM, "
        f"{roofline.H100['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s dense bf16), ms. "
        "Predictions, not measurements: eager PyTorch as one kernel per aten op (bytes and FLOPs "
        "counted with a TorchDispatchMode), Triton / Liger from the interpreter's counts.",
        "",
        markdown(PHEAD, pred_rows(results)),
        "",
    ]
    parts += [
        "#### GPU readiness: ahead-of-time compile (ptxas report)",
        "",
        markdown(CHEAD, compile_rows(results)),
        "",
    ]
    parts += [
        "#### Targets (reported, not asserted)",
        "",
        markdown(
            ["target", "value", "limit", "result", "how"],
            [[t["target"], str(t["value"]), t["limit"], t["result"], t["why"]] for t in results["targets"]],
        ),
        "",
    ]
    return "\n".join(parts)


def plots(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    cases = sorted({r["case"] for r in results["rows"]})
    for case in cases:
        rows = [r for r in results["rows"] if r["case"] == case and r["status"] == "ok"]
        shapes = list(dict.fromkeys(r["shape"] for r in rows))
        provs = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        for ax, key, title in (
            (axes[0], "time_vs_naive", "time / naive"),
            (axes[1], "mem_vs_naive", "peak extra memory / naive"),
        ):
            width = 0.8 / max(len(provs), 1)
            for i, p in enumerate(provs):
                ys = [
                    next(
                        (
                            r.get(key, 1.0 if p == "naive" else float("nan"))
                            for r in rows
                            if r["shape"] == s and r["provider"] == p
                        ),
                        float("nan"),
                    )
                    for s in shapes
                ]
                ax.bar([j + i * width for j in range(len(shapes))], ys, width, label=p)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
            ax.set_xticklabels(shapes, rotation=20, fontsize=7, ha="right")
            ax.set_yscale("log")
            ax.axhline(1.0, color="k", lw=0.5)
            ax.set_title(f"{case}: {title} (lower is better)", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        f = out / f"{case}.png"
        fig.savefig(f, dpi=90)
        plt.close(fig)
        files.append(str(f))
    return files


def _quiet() -> None:
    """The references validate their labels with a host sync: torch.compile breaks the graph
    there (expected) and says so at length on every case."""
    import logging

    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")


def run(
    case_names: list[str] | None = None,
    tiny: bool = False,
    out: str | Path = "bench/out",
    traffic: bool = True,
    compile_report: bool = True,
    compile_backend: str = "inductor",
    log=print,
) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    cases = load_cases(case_names)
    COMPILE_BACKEND[0] = compile_backend
    _quiet()
    results = dict(
        compile_backend=compile_backend,
        machine=machine(),
        tiny=tiny,
        gpu_only=None if device == "cuda" else GPU_ONLY,
        roofline=roofline.H100,
        rows=[],
        traffic={},
        compile={},
        predictions=[],
        targets=[],
    )
    log(f"bench on {device} ({results['machine']['gpu'] or results['machine']['cpu']})")
    for case in cases:
        results["rows"] += run_case(case, device, tiny, log)
    # The interpreter count and the ahead-of-time compile are independent subprocesses: run them
    # side by side once the timings are done (one core each).
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        tr = pool.submit(run_traffic, [c.name for c in cases], tiny, log) if traffic else None
        cr = pool.submit(run_compile_report, tiny, log) if compile_report else None
        results["traffic"] = tr.result() if tr else {}
        results["compile"] = cr.result() if cr else {}
    for case in cases:
        for shape in case.shapes(device, tiny):
            p = dict(case=case.name, shape=shape.key())
            for prov in ("naive", "torch"):
                r = next(
                    (
                        r
                        for r in results["rows"]
                        if r["case"] == case.name
                        and r["shape"] == shape.key()
                        and r["provider"] == prov
                        and "pred_h100_ms" in r
                    ),
                    None,
                )
                if r:
                    p[f"{prov}_ms"] = r["pred_h100_ms"]
            for prov in ("triton", "liger"):
                pr = predict(case, shape, results["traffic"], prov)
                if pr:
                    p[f"{prov}_ms"] = pr["pred_h100_ms"]
                    p[f"{prov}_detail"] = pr
            if device == "cuda":
                r = next(
                    (
                        r
                        for r in results["rows"]
                        if r["case"] == case.name
                        and r["shape"] == shape.key()
                        and r["provider"] == "triton"
                        and "ms" in r
                    ),
                    None,
                )
                if r:
                    p["measured_triton_ms"] = r["ms"]
            results["predictions"].append(p)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    render(results, out)
    log("\n" + text_table(HEAD, table_rows(results)))
    log(
        "\nTraffic counted under the Triton interpreter (bytes requested per token):\n"
        + text_table(THEAD, traffic_rows(results))
    )
    log(
        "\nRoofline PREDICTIONS for one H100 (ms; not measurements):\n"
        + text_table(PHEAD, pred_rows(results))
    )
    log("\nAhead-of-time compile report:\n" + text_table(CHEAD, compile_rows(results)))
    log(
        "\nTargets:\n"
        + text_table(
            ["target", "value", "limit", "result"],
            [[t["target"], str(t["value"]), t["limit"], t["result"]] for t in results["targets"]],
        )
    )
    if device == "cpu":
        log(f"\nNo GPU here: {GPU_ONLY}.")
    log(
        f"\nwrote {out}/results.json, {out}/README_table.md and {len(results['plots'])} plots "
        f"({results['wall_s']} s)"
    )
    return results


def render(results: dict, out: Path) -> None:
    """Targets, results.json, README_table.md and the plots from measured results (also used
    by `python -m bench --render-only` to redo the outputs without measuring again)."""
    results["targets"] = targets(results)
    results["plots"] = plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "README_table.md").write_text(readme_table(results))


def _achieved_str(r: dict) -> str:
    parts = []
    if "achieved_bw_frac" in r:
        parts.append(f"{100 * r['achieved_bw_frac']:.0f}% HBM")
    if "achieved_flops_frac" in r:
        parts.append(f"{100 * r['achieved_flops_frac']:.0f}% bf16 peak")
    return ", ".join(parts)


def _achieved(case: Case, shape: Shape, r: dict) -> None:
    """GPU only: achieved useful bandwidth (minimum bytes / time) and useful FLOP rate, as fractions
    of the H100 datasheet peaks (roofline.H100; on another GPU the fractions are of H100's)."""
    s = r["ms"] / 1e3
    r["achieved_bw_frac"] = case.min_bytes(shape) / s / roofline.H100["hbm_bytes_per_s"]
    if case.flops(shape):
        r["achieved_flops_frac"] = case.flops(shape) / s / roofline.H100["bf16_flops_per_s"]
