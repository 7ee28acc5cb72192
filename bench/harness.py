"""The bench harness: runs every case's providers on its shapes and reports ratios to the naive
reference taken in the same run. It only sequences the three steps, each in its own module:

- bench.measure: time, peak extra memory and counted bytes / FLOPs per (case, shape, provider),
  ratios to the naive reference, and in subprocesses the interpreter traffic (bench.traffic)
  and the ahead-of-time GPU compile report (bench.gpu_compile);
- bench.judge: the roofline predictions (bench.roofline) and the targets (PASS / MISS);
- bench.report: a table on stdout, bench/out/README_table.md and PNG plots; render() below
  also writes bench/out/results.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import roofline
from .cases import COMPILE_BACKEND
from .judge import predictions, targets
from .measure import machine, quiet_compile_logs, run_case, run_compile_report, run_traffic
from .registry import load_cases
from .report import GPU_ONLY, plots, readme_table, summary


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
    quiet_compile_logs()
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
    results["predictions"] += predictions(cases, results, device, tiny)
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    render(results, out)
    summary(results, out, log)
    return results


def render(results: dict, out: Path) -> None:
    """Targets, results.json, README_table.md and the plots from measured results (also used
    by `python -m bench --render-only` to redo the outputs without measuring again)."""
    results["targets"] = targets(results)
    results["plots"] = plots(results, out)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "README_table.md").write_text(readme_table(results))
