"""Experiment trackers (`run.loggers`): one small class per tracker behind one interface.

`vppo.metrics.Metrics`, the one writer of metrics.jsonl (rank 0 only), hands every record it
appends to each tracker of run.loggers: every numeric value (bools as 0/1) at the record's "step";
non-numeric values are left to metrics.jsonl. Each tracker also gets the resolved config.

    console      the config, then one line per record on stdout (through tqdm, so the progress
                 bar stays whole)
    tensorboard  <run>/tb (non-finite values skipped, as TensorBoard cannot draw them)
    wandb        Weights & Biases; offline files in <run>/wandb unless WANDB_MODE says otherwise
                 (`wandb sync <run>/wandb/offline-run-*` uploads them later)
    swanlab      SwanLab; offline files in <run>/swanlog unless SWANLAB_MODE says otherwise
                 (`swanlab sync <folder>`); swanlab 0.10 keeps its "local" mode only for the
                 unmaintained swanboard dashboard, so "offline" is the local store
    mlflow       MLflow through mlflow-skinny; a file store in <run>/mlruns unless
                 MLFLOW_TRACKING_URI names another (MLflow 3 keeps the file store in maintenance
                 mode and refuses it unless MLFLOW_ALLOW_FILE_STORE=true, which is set for that
                 default only; the full mlflow package's `mlflow ui` shows it)

Nothing leaves the machine unless an environment variable asks for it (WANDB_MODE=online,
SWANLAB_MODE=online, MLFLOW_TRACKING_URI=http://...). Projects / experiments are named "vppo"
unless WANDB_PROJECT, SWANLAB_PROJ_NAME or MLFLOW_EXPERIMENT_NAME say otherwise; runs are
named after the run folder.

A resumed run (from the checkpoint of step S) continues the same tracker run where the tracker
allows it, its id kept in <run>/trackers.json. The records the killed process wrote after step S
are redone by the resumed one; metrics.jsonl drops the old ones and keeps the new. The trackers:
  - wandb rewinds the run to step S (`resume_from="<id>?_step=S"`): the same as metrics.jsonl.
    Offline, each process writes its own offline-run folder and the later one carries the
    branch point, which the server applies at `wandb sync` (W&B marks rewind as beta).
  - tensorboard purges the events after step S (SummaryWriter's purge_step): as metrics.jsonl.
  - mlflow reopens the same run; its metric history cannot be cut, so the tracker skips the
    steps the run already holds (per key): no duplicates, the killed process's values kept.
  - swanlab resumes the same experiment online (SWANLAB_MODE=online) and itself drops steps at
    or below the last one it holds per key (no duplicates, first values kept); offline, each
    process writes its own folder under the same id, and `swanlab sync` drops those steps then.
  - console prints what the resumed process logs.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import ClassVar

log = logging.getLogger("vppo.trackers")

STATE_FILE = "trackers.json"  # per-tracker run ids, in the run folder


def scalars(rec: dict) -> dict[str, float]:
    """The values of a metrics record that trackers draw: numbers (bools as 0/1) but the step."""
    return {k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float))}


def flat_config(config: dict, prefix: str = "") -> dict[str, object]:
    """{"train.lr": 2e-4, ...} from the nested resolved config."""
    out: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flat_config(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class Tracker:
    """One tracker of a run. `resume_step` is the step of the checkpoint a resumed run continues
    from (None for a fresh run); `state` is what this tracker saved in trackers.json (an empty
    dict for a fresh run), and what it puts there is saved for the next resume."""

    name: ClassVar[str]
    module: ClassVar[str | None] = None  # the package it imports (None: nothing beyond the project)
    pip: ClassVar[str | None] = None  # what to pip install when it is missing

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None, state: dict):
        self.state = state

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Console(Tracker):
    name = "console"

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None, state: dict):
        super().__init__(run_dir, config, resume_step, state)
        import yaml
        from tqdm import tqdm  # writes above an open progress bar instead of through it

        self.write = tqdm.write
        self.write("resolved config:\n" + yaml.safe_dump(config, sort_keys=False, width=1000).rstrip())

    def log(self, step: int, values: dict[str, float]) -> None:
        self.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in values.items()))


class TensorBoard(Tracker):
    name, module, pip = "tensorboard", "tensorboard", "tensorboard"

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None, state: dict):
        super().__init__(run_dir, config, resume_step, state)
        from torch.utils.tensorboard import SummaryWriter

        # purge_step hides the events a killed process wrote after the checkpoint
        purge = None if resume_step is None else resume_step + 1
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=purge)
        text = json.dumps(config, indent=2).replace("\n", "\n    ")
        self.tb.add_text("config", "    " + text, global_step=resume_step or 0)  # markdown code block

    def log(self, step: int, values: dict[str, float]) -> None:
        for k, v in values.items():
            if math.isfinite(v):
                self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self) -> None:
        self.tb.close()


class Wandb(Tracker):
    name, module, pip = "wandb", "wandb", "wandb"

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None, state: dict):
        super().__init__(run_dir, config, resume_step, state)
        import wandb

        kw = dict(
            project=os.environ.get("WANDB_PROJECT") or "vppo", name=run_dir.name, dir=str(run_dir),
            mode=os.environ.get("WANDB_MODE") or "offline", config=config,
        )  # fmt: skip
        if resume_step is not None and state.get("id"):
            kw["resume_from"] = f"{state['id']}?_step={resume_step}"  # rewind: drop what came after
        self.run = wandb.init(**kw)
        state["id"] = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class SwanLab(Tracker):
    name, module, pip = "swanlab", "swanlab", "swanlab"

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None, state: dict):
        super().__init__(run_dir, config, resume_step, state)
        import swanlab

        kw = dict(
            project=None if os.environ.get("SWANLAB_PROJ_NAME") else "vppo", name=run_dir.name,
            log_dir=str(run_dir / "swanlog"), mode=os.environ.get("SWANLAB_MODE") or "offline",
            config=config, reinit=True,
        )  # fmt: skip
        if resume_step is not None and state.get("id"):
            kw.update(id=state["id"], resume="allow")
        self.run = swanlab.init(**kw)
        state["id"] = self.run.id

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow(Tracker):
    name, module, pip = "mlflow", "mlflow", "mlflow-skinny"

    def __init__(self, run_dir: Path, config: dict, resume_step: int | None, state: dict):
        super().__init__(run_dir, config, resume_step, state)
        import yaml
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses it otherwise
        self.client = c = MlflowClient(tracking_uri=uri)
        self.done: dict[str, int] = {}  # key -> the last step the run holds (a resumed run's)
        self.run_id = None
        if resume_step is not None and state.get("run_id") and state.get("tracking_uri") == uri:
            try:
                run = c.get_run(state["run_id"])
            except MlflowException as e:
                log.warning("mlflow: run %s not found at %s (%s): a new run", state["run_id"], uri, e)
            else:
                self.run_id = run.info.run_id
                for key in run.data.metrics:
                    self.done[key] = max(m.step for m in c.get_metric_history(self.run_id, key))
                c.update_run(self.run_id, status="RUNNING")
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "vppo"
            exp = c.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else c.create_experiment(name)
            self.run_id = c.create_run(exp_id, run_name=run_dir.name).info.run_id
            from mlflow.entities import Param

            params = [Param(k, json.dumps(v) if isinstance(v, list) else str(v))
                      for k, v in flat_config(config).items()]  # fmt: skip
            for i in range(0, len(params), 100):  # log_batch takes at most 100 params
                c.log_batch(self.run_id, params=params[i : i + 100])
        # the resolved config of this process (a resumed one may change e.g. train.total_steps)
        c.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        state.update(run_id=self.run_id, tracking_uri=uri)

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        batch = [Metric(k, v, ms, step) for k, v in values.items() if step > self.done.get(k, -1)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


TRACKERS: dict[str, type[Tracker]] = {t.name: t for t in (Console, TensorBoard, Wandb, SwanLab, MLflow)}
NAMES = tuple(TRACKERS)


def check(loggers: list[str]) -> None:
    """Raise ValueError naming each run.loggers entry that is unknown or whose package does not
    import, with the pip command; run before any model loads."""
    bad = []
    for name in loggers:
        t = TRACKERS.get(name)
        if t is None:
            raise ValueError(f"run.loggers: unknown logger {name!r} (choose from {list(NAMES)})")
        if t.module is None:
            continue
        try:
            importlib.import_module(t.module)
        except Exception as e:  # missing, or installed but broken: either way it cannot log
            bad.append((name, t.pip, f"{type(e).__name__}: {e}"))
    if bad:
        what = "; ".join(f"{n} needs `pip install {p}` ({err})" for n, p, err in bad)
        pips = " ".join(sorted({p for _, p, _ in bad}))
        raise ValueError(f"run.loggers: {what}. Install with `pip install {pips}` or `pip install "
                         f"'vppo[trackers]'`, or drop them from run.loggers")  # fmt: skip


def start(loggers: list[str], run_dir: Path, config: dict, resume_step: int | None) -> list[Tracker]:
    """The trackers of run.loggers, started (a resume continues the runs named in trackers.json)."""
    path = Path(run_dir) / STATE_FILE
    saved = json.loads(path.read_text()) if resume_step is not None and path.exists() else {}
    out, state = [], dict(saved)  # a resume keeps the ids of trackers left out this time
    for name in loggers:
        state[name] = dict(saved.get(name, {}))
        out.append(TRACKERS[name](Path(run_dir), config, resume_step, state[name]))
    state = {k: v for k, v in state.items() if v}
    if state:
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        os.replace(tmp, path)
    return out
