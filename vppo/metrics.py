"""The run's metrics: metrics.jsonl (one record per step), the trackers of run.loggers
(vppo.trackers: console, TensorBoard, W&B, SwanLab, MLflow), and a PNG of the curves.

`read_metrics` is also what `python -m vppo.compare` reads runs with.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from vppo import trackers as T

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
    """metrics.jsonl (+ the trackers of run.loggers, + curves.png) in the run folder, written by
    rank 0 only. Each record appended to metrics.jsonl goes to every tracker, at its "step".

    `loggers` is run.loggers (a bool is the old run.tensorboard flag); `config` the resolved config
    (a Config or its dict) the trackers record. They start at the first log() or truncate(): a
    resume calls truncate(step) first, so that they continue their runs from that step
    (vppo.trackers says how each does)."""

    CURVES = CURVES

    def __init__(
        self, run_dir: Path, enabled: bool, loggers: Sequence[str] | bool = (), config: object = None
    ):
        self.dir, self.enabled = Path(run_dir), enabled
        self.path = self.dir / "metrics.jsonl"
        if isinstance(loggers, bool):
            loggers = ["tensorboard"] if loggers else []
        self.loggers = list(loggers)
        self.config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config or {})
        self.trackers: list[T.Tracker] | None = None  # started by the first log() or truncate()

    def _start(self, resume_step: int | None) -> None:
        if self.enabled and self.trackers is None:
            self.trackers = T.start(self.loggers, self.dir, self.config, resume_step)

    def history(self) -> list[dict]:
        return read_metrics(self.path)

    def truncate(self, step: int) -> None:
        """Drop records after `step` (they belong to work a resumed run redoes); the trackers
        continue their runs from `step`."""
        if self.enabled and self.path.exists():
            keep = [r for r in self.history() if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        self._start(step)

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        self._start(None)
        values = T.scalars(rec)
        for t in self.trackers:
            t.log(rec["step"], values)

    def close(self) -> None:
        """Finish the tracker runs (W&B and SwanLab write their last records, MLflow marks it done)."""
        for t in self.trackers or []:
            t.close()
        self.trackers = []  # closed: later records go to metrics.jsonl only

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
