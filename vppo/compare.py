"""Compare training runs: one PNG of their curves and a markdown table of their validations.

    python -m vppo.compare runs/tiny runs/tiny_grpo --labels VPPO GRPO --out runs/vppo_vs_grpo.png

Reads each run folder's metrics.jsonl (what vppo.train writes). The PNG has three panels, all against
the training step: val accuracy with its standard error, training reward (moving average over
`--smooth` steps), and the kept-token fraction / response length. The table (printed, and written
next to the PNG as .md) lists val accuracy +- stderr at every validated step and the gain over step 0.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vppo.metrics import read_metrics


def load_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a vppo.train run folder?")
    return read_metrics(path)


def val_points(records: list[dict]) -> list[tuple[int, float, float]]:
    """(step, accuracy, stderr) of every validation, in step order."""
    pts = {
        r["step"]: (r["val_accuracy"], r.get("val_stderr", float("nan")))
        for r in records
        if "val_accuracy" in r
    }
    return [(s, *pts[s]) for s in sorted(pts)]


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x - (xs[i - k] if i >= k else 0.0)
        out.append(acc / min(i + 1, k))
    return out


def markdown_table(runs: dict[str, list[dict]]) -> str:
    """Val accuracy (%) +- stderr per validated step, one row per run, and the gain over step 0."""
    steps = sorted({s for recs in runs.values() for s, _, _ in val_points(recs)})
    head = "| run | " + " | ".join(f"step {s}" for s in steps) + " | gain |"
    lines = [head, "|---" * (len(steps) + 2) + "|"]
    for label, recs in runs.items():
        pts = {s: (a, e) for s, a, e in val_points(recs)}
        cells = [f"{100 * pts[s][0]:.1f} ± {100 * pts[s][1]:.1f}" if s in pts else "" for s in steps]
        gain = ""
        if pts and min(pts) == 0 and max(pts) > 0:
            gain = f"{100 * (pts[max(pts)][0] - pts[0][0]):+.1f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {gain} |")
    return "\n".join(lines) + "\n"


def plot_runs(runs: dict[str, list[dict]], out: str | Path, smooth: int = 10) -> Path:
    import matplotlib  # heavy: ~0.4 s, the plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after use("Agg")

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for label, recs in runs.items():
        pts = val_points(recs)
        if pts:
            s, a, e = zip(*pts)
            axes[0].errorbar(
                s, [100 * x for x in a], yerr=[100 * x for x in e], marker="o", capsize=3, label=label
            )
        train = [r for r in recs if "reward" in r]
        if train:
            steps = [r["step"] for r in train]
            axes[1].plot(steps, _smooth([r["reward"] for r in train], smooth), label=label)
            axes[2].plot(steps, _smooth([r["response_len"] for r in train], smooth), label=label)
    axes[0].set_title("val accuracy (avg@8, %)")
    axes[1].set_title(f"train reward ({smooth}-step mean)")
    axes[2].set_title(f"response length ({smooth}-step mean)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="vppo.train run folders")
    ap.add_argument("--labels", nargs="+", help="one label per run (default: the folder names)")
    ap.add_argument("--out", default="compare.png", help="the PNG; the table goes next to it as .md")
    ap.add_argument("--smooth", type=int, default=10, help="moving-average window of the training curves")
    args = ap.parse_args(argv)
    labels = args.labels or [Path(r).name for r in args.runs]
    if len(labels) != len(args.runs):
        ap.error(f"--labels has {len(labels)} names for {len(args.runs)} runs")
    if args.smooth < 1:
        ap.error("--smooth must be >= 1")
    runs = {label: load_metrics(r) for label, r in zip(labels, args.runs)}
    out = plot_runs(runs, args.out, args.smooth)
    table = markdown_table(runs)
    out.with_suffix(".md").write_text(table)
    print(table, end="")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
