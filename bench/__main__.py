"""`python -m bench` (what `make bench` runs): every case, every provider, ratios to the naive
reference; writes bench/out/results.json, bench/out/README_table.md and PNG plots.

    python -m bench                        # all cases, the shapes of this machine (CPU or GPU)
    python -m bench --cases token_dependency,topk_token_mask
    python -m bench --tiny --out /tmp/b    # one tiny shape per case (what tests/test_bench.py runs)
    python -m bench --splice README.md     # only copy bench/out/README_table.md into README.md
"""

from __future__ import annotations

import argparse
import os
import sys

# The harness times real kernels: the Triton interpreter is used only in the traffic-counting
# subprocess (bench.traffic sets it there), never here, whatever the caller's environment.
os.environ["TRITON_INTERPRET"] = "0"

import json  # noqa: E402
from pathlib import Path  # noqa: E402

from .harness import render, run  # noqa: E402
from .splice import splice


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--tiny", action="store_true", help="one tiny shape per case (smoke run)")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--no-traffic", action="store_true", help="skip the interpreter traffic count")
    ap.add_argument("--no-compile-report", action="store_true", help="skip the sm_80 / sm_90 compile report")
    ap.add_argument(
        "--splice", metavar="README", help="also (or, with --splice-only, only) splice the table into README"
    )
    ap.add_argument("--splice-only", action="store_true")
    ap.add_argument(
        "--render-only", action="store_true", help="redo targets, table and plots from OUT/results.json"
    )
    ap.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the compile provider (tests: eager)",
    )
    a = ap.parse_args(argv)
    if a.render_only:
        out = Path(a.out)
        render(json.loads((out / "results.json").read_text()), out)
    elif not a.splice_only:
        run(
            [c for c in a.cases.split(",") if c] or None,
            tiny=a.tiny,
            out=a.out,
            traffic=not a.no_traffic,
            compile_report=not a.no_compile_report,
            compile_backend=a.compile_backend,
        )
    if a.splice:
        try:
            splice(a.splice, f"{a.out}/README_table.md")
            print(f"spliced {a.out}/README_table.md into {a.splice}")
        except ValueError as e:  # no markers yet: the table is still in bench/out
            print(f"README not updated: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
