"""The run's metrics: metrics.jsonl (one record per step), TensorBoard, and a PNG of the curves.

`read_metrics` is also what `python -m vppo.compare` reads runs with.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

log = logging.getLogger("vppo.metrics")

# spot_k3_rprec: the spotlight diagnostic at validation (run.spotlight_problems)
CURVES = ("reward", "val_accuracy", "spot_k3_rprec", "response_len", "kept_frac", "alpha_mean", "entropy",
          "grad_norm")  # fmt: skip


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl ([] when it does not exist). A torn last line (a write cut
    short by a crash; a resumed run redoes that step) is dropped with a warning; a bad line
    anywhere else is an error naming it."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except ValueError as e:
            if i == len(lines):
                log.warning("%s: dropping the torn last line %d (%s)", path, i, e)
                break
            raise ValueError(f"{path}: line {i} is not valid JSON ({e})") from e
    return out


class Metrics:
    """metrics.jsonl (+ TensorBoard, + curves.png) in the run folder, written by rank 0 only."""

    CURVES = CURVES

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.dir, self.enabled = Path(run_dir), enabled
        self.path = self.dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: tensorboard may be absent

                self.tb = SummaryWriter(str(self.dir / "tb"))
            except Exception as e:  # tensorboard missing or broken: keep the JSON log
                log.warning("TensorBoard disabled: %s", e)

    def history(self) -> list[dict]:
        return read_metrics(self.path)

    def truncate(self, step: int) -> None:
        """Drop records after `step` (they belong to work a resumed run redoes)."""
        if self.enabled and self.path.exists():
            keep = [r for r in self.history() if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, rec["step"])
            self.tb.flush()

    def plot(self) -> None:
        """curves.png: one panel per curve of CURVES present, written atomically."""
        if not self.enabled:
            return
        import matplotlib  # heavy (~1 s): only when a plot is due

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = self.history()
        keys = [k for k in self.CURVES if any(k in r for r in hist)]
        if not keys:
            return
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
        for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
            pts = [(r["step"], r[k]) for r in hist if k in r]
            ax.plot(*zip(*pts), marker="." if k in ("val_accuracy", "spot_k3_rprec") else None)
            ax.set_title(k)
            ax.set_xlabel("step")
        fig.tight_layout()
        tmp = self.dir / "curves.tmp.png"
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        os.replace(tmp, self.dir / "curves.png")
