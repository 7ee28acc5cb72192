"""The evaluation's report: the results.md tables (avg@n ± standard error, beside the paper's numbers
when the model is one of the paper's) and the files `python -m vppo.eval` writes to its output folder.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from vppo.benchmarks import PAPER_AVG, PAPER_BENCHMARKS, PAPER_RESULTS, TITLES


def paper_model(model_path: str) -> str | None:
    """'Qwen2.5-VL-7B' or 'VPPO-7B' when the path names one of the paper's models, else None."""
    name = re.sub(r"[^a-z0-9.]", "", str(model_path).lower())
    if "vppo7b" in name:
        return "VPPO-7B"
    if "qwen2.5vl7b" in name:
        return "Qwen2.5-VL-7B"
    return None


def _avg(summary: dict[str, dict]) -> tuple[float, float, list[str]]:
    """Mean over the paper benchmarks evaluated (all evaluated if none is a paper benchmark), its
    standard error (benchmarks independent), and the names averaged."""
    names = [k for k in summary if k in PAPER_BENCHMARKS] or list(summary)
    mean = sum(summary[k]["accuracy"] for k in names) / len(names)
    se = math.sqrt(sum(summary[k]["stderr"] ** 2 for k in names)) / len(names)
    return mean, se, names


GRADER_LINES = {
    "project": "Graded by the project's grader (vppo.reward: mathruler behind the training reward's "
    "normalisation; it credits a few answer forms the authors' harness does not, e.g. `B. 2` for B).",
    "released": "Graded exactly as the authors' harness (PAPO-Eval eval_utils.py: mathruler "
    "grade_answer on the last boxed content), --grader released.",
}


def markdown_report(
    summary: dict[str, dict], model_label: str, paper: str | None, grader: str | None = None
) -> str:
    """The results table (avg@n in %, ± standard error), the paper's rows when they apply, which
    grader graded, and a per-benchmark detail table."""
    order = [k for k in TITLES if k in summary] + [k for k in summary if k not in TITLES]
    n = next(iter(summary.values()))["samples"]
    mean, se, averaged = _avg(summary)
    head = "| model | " + " | ".join(TITLES.get(k, k) for k in order) + " | Avg |"
    lines = [f"## avg@{n} (%), ± standard error over problems", "", head, "|---" * (len(order) + 2) + "|"]
    cells = [f"{100 * summary[k]['accuracy']:.1f} ± {100 * summary[k]['stderr']:.1f}" for k in order]
    lines.append(f"| {model_label} | " + " | ".join(cells) + f" | {100 * mean:.1f} ± {100 * se:.1f} |")
    rows = [paper] if paper else []
    for name in rows:
        ref = PAPER_RESULTS[name]
        vals = [ref[k] for k in averaged if k in ref]
        avg = (
            PAPER_AVG[name]
            if len(vals) == len(PAPER_BENCHMARKS)
            else (sum(vals) / len(vals) if vals else None)
        )
        cells = [f"{ref[k]:.1f}" if k in ref else "–" for k in order]
        lines.append(
            f"| {name} (paper, Table 1) | " + " | ".join(cells) + (f" | {avg:.1f} |" if avg else " | – |")
        )
    if set(averaged) != set(PAPER_BENCHMARKS) and any(k in PAPER_BENCHMARKS for k in averaged):
        lines += [
            "",
            f"Avg is over the {len(averaged)} paper benchmarks evaluated here (the paper averages all 8).",
        ]
    if grader is not None:
        lines += ["", GRADER_LINES[grader]]
    lines += [
        "",
        "| benchmark | problems | n | avg@n (%) | s.e. (%) | no \\boxed (%) | grader failures | generated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in order:
        s = summary[k]
        g = s.get("grader", {})
        bad = sum(v for key, v in g.items() if any(w in key for w in ("timeout", "error", "crash")))
        lines.append(
            f"| {TITLES.get(k, k)} | {s['problems']} | {s['samples']} | {100 * s['accuracy']:.2f} | "
            f"{100 * s['stderr']:.2f} | {100 * s['no_box_rate']:.1f} | {bad:g} | {s['generated']} |"
        )
    agree = {k: s["math_verify_agreement"] for k, s in summary.items() if "math_verify_agreement" in s}
    if agree:
        lines += ["", "Boxed-answer grader vs math-verify on the same samples:", ""]
        lines += [
            f"- {TITLES.get(k, k)}: agree on {a['agree']}/{a['n']} ({100 * a['rate']:.1f} %); grader only "
            f"{a['ruler_only']}, math-verify only {a['verify_only']}"
            for k, a in agree.items()
        ]
    return "\n".join(lines) + "\n"


def write_outputs(out: Path, report: str, samples: dict, manifest: dict) -> None:
    """OUT/results.md (the report), OUT/samples.json (every response, its extracted answer and grade)
    and OUT/manifest.json (settings, provenance and results)."""
    (out / "results.md").write_text(report)
    (out / "samples.json").write_text(json.dumps(samples, indent=1, ensure_ascii=False))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False, default=str))
