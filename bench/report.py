"""Reporting: the tables (stdout and markdown), bench/out/README_table.md's text and the PNG
plots, from the results that bench.measure filled in and bench.judge judged.
"""

from __future__ import annotations

from pathlib import Path

from . import roofline
from .cases import PROVIDERS

GPU_ONLY = (
    "Triton time and memory, Liger time and memory, achieved bandwidth / FLOP rate as a fraction "
    "of peak, and the measured side of the roofline comparison need a GPU"
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


def _achieved_str(r: dict) -> str:
    parts = []
    if "achieved_bw_frac" in r:
        parts.append(f"{100 * r['achieved_bw_frac']:.0f}% HBM")
    if "achieved_flops_frac" in r:
        parts.append(f"{100 * r['achieved_flops_frac']:.0f}% bf16 peak")
    return ", ".join(parts)


def summary(results: dict, out: Path, log=print) -> None:
    """The tables on stdout (log), after the outputs were written."""
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
    if results["machine"]["device"] == "cpu":
        log(f"\nNo GPU here: {GPU_ONLY}.")
    log(
        f"\nwrote {out}/results.json, {out}/README_table.md and {len(results['plots'])} plots "
        f"({results['wall_s']} s)"
    )
