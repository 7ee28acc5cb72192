"""The prepared GPU check (issue 17): one command, <= 8 minutes on one H200.

    python -m bench.gpu_check --out DIR        (or: make gpu-check)

Steps, each with its own time limit, results in DIR/gpu_check.json and DIR/README_table.md:
  kernel_tests   the kernel tests on CUDA (TRITON_INTERPRET=0)
  kernel_bench   the bench's Triton / Liger / naive / compile cases of the linear entry points at
                 the 7B lm_head shapes (`python -m bench --cases ...`)
  packing_cpu    packed vs padded forward on the CPU (bench.case_packing, tiny and 7B lengths)
  packing_gpu    packed vs padded forward of a Qwen2.5-VL-7B-shaped language model (random
                 weights, 2 layers, bf16) on the 7B length distribution, flash_attention_2 when
                 flash-attn is installed else sdpa
Without a GPU the CUDA steps are recorded as SKIPPED with the reason, and printed so.
Needs no network, deepspeed, liger or vllm (a missing Liger shows as its bench column's skip).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = [f"tests/test_{n}.py" for n in ("logprobs", "logprobs_linear", "dependency", "topk")]
BENCH_CASES = "token_logprobs_linear,token_dependency_linear"


def _sub(cmd: list[str], timeout: float, **env) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **env})  # fmt: skip
        status = "ok" if p.returncode == 0 else "failed"
        tail = (p.stdout + p.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        status, tail = "timeout", f"over {timeout} s"
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1), "tail": tail}


def _packing_gpu() -> dict:
    from bench import case_packing as cp

    attn = "sdpa"
    try:
        import flash_attn  # noqa: F401

        attn = "flash_attention_2"
    except ImportError:
        pass
    m = cp.Q7B
    model = cp.small_model(m["hidden"], 2, m["heads"], m["kv_heads"], vocab=m["vocab"], attn=attn,
                           dtype=torch.bfloat16)  # fmt: skip
    res = cp.measure(kinds=("7b",), device="cuda", model=model)["7b"]
    return {"status": "ok", "attn": attn, **res}


def run(out: Path, cuda: bool | None = None) -> dict:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    skip = {"status": "SKIPPED", "reason": "no CUDA device"}
    py = sys.executable
    res: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    res["kernel_tests"] = (
        _sub([py, "-m", "pytest", "-q", "-x", *KERNEL_TESTS], 240, TRITON_INTERPRET="0") if cuda else skip
    )
    res["kernel_bench"] = (
        _sub(
            [
                py,
                "-m",
                "bench",
                "--cases",
                BENCH_CASES,
                "--out",
                str(out / "bench"),
                "--no-traffic",
                "--no-compile-report",
            ],
            150,
            TRITON_INTERPRET="0",
        )  # fmt: skip
        if cuda
        else skip
    )
    from bench import case_packing as cp

    t0 = time.perf_counter()
    res["packing_cpu"] = {"status": "ok", **cp.measure(device="cpu")}
    res["packing_cpu"]["seconds"] = round(time.perf_counter() - t0, 1)
    try:
        res["packing_gpu"] = _packing_gpu() if cuda else skip
    except Exception as e:  # reported, not raised: the other steps' results still count
        res["packing_gpu"] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:2000]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    (out / "README_table.md").write_text(table(res))
    return res


def table(res: dict) -> str:
    rows = ["| step | status | detail |", "|---|---|---|"]
    for k in ("kernel_tests", "kernel_bench", "packing_cpu", "packing_gpu"):
        r = res[k]
        if r["status"] == "SKIPPED":
            detail = r["reason"]
        elif k.startswith("packing") and r["status"] == "ok":
            src = {x: r[x] for x in ("tiny", "7b") if isinstance(r.get(x), dict)} or {"7b": r}
            detail = "; ".join(
                f"{x}: pad {v['pad_frac']:.0%}, tokens x{v['token_ratio']:.2f}, "
                f"FLOPs x{v['flop_ratio']:.2f}, "
                f"time x{v['time_ratio']:.2f}"
                for x, v in src.items()
            )
        else:
            detail = f"{r.get('seconds', '')} s"
        rows.append(f"| {k} | {r['status']} | {detail} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/gpu_check")
    args = ap.parse_args(argv)
    res = run(Path(args.out))
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"{k}: {v['status']}" + (f" ({v['reason']})" if "reason" in v else ""), flush=True)
    print(table(res))
    return 0 if all(v["status"] in ("ok", "SKIPPED") for v in res.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
