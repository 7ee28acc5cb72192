"""Atomic checkpoints with retention, for a plain torch model or a DeepSpeed engine.

    ckpt = CheckpointManager(run_dir, keep_last=2)                 # rank / barrier for multi-process
    ckpt.save(step, model=model, optimizer=opt, state={"data_pos": 96, "metrics": hist})
    ckpt.save(step, engine=engine, state={...})                    # DeepSpeed: collective
    path = ckpt.resolve_resume("auto")                             # newest complete, or None
    state = ckpt.load(path, model=model, optimizer=opt)            # restores the RNG states too

Layout: run_dir/checkpoints/step-00000020/ holds model.pt + optimizer.pt (or engine/, written by
engine.save_checkpoint), trainer_state.pt (the caller's state: step counters, data-order position,
metrics history), rng-rank{r}.pt (python / numpy / torch / cuda RNG of each rank), config.yaml (the
run's config, when the manager is given one) and meta.json, written last. A save goes into
run_dir/checkpoints/.tmp-step-00000020, every file is fsynced, then the folder is renamed into place
(atomic on POSIX) and the parent directory fsynced. A crash or an error at any point leaves the
previous checkpoints untouched; only after the new one is complete are the ones beyond keep_last
deleted (by listing the disk, so the limit holds across restarts). Leftover .tmp-* folders are never
taken for checkpoints and are removed by the next save. Free space is checked before anything is
written.

Files are written with torch.save and read back with weights_only=False: load only checkpoints
this code wrote.

The run folder at start-up (open_run, before anything loads): a resume is refused when a
run-defining key differs from the checkpoint's config.yaml (vppo.config.RUN_DEFINING) unless
run.allow_config_change; run.resume=never into a folder holding a run is refused unless
run.overwrite; an unwritable folder fails there, not at the first save.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step-"
_NAME_RE = re.compile(rf"^{PREFIX}(\d+)$")
META = "meta.json"
log = logging.getLogger("vppo.checkpoint")


class InsufficientSpaceError(OSError):
    """Not enough free disk space for the next checkpoint."""


# ---------------------------------------------------------------------------------------------
# RNG states.


def rng_state() -> dict:
    """The RNG states of python, numpy, torch (CPU) and every CUDA device."""
    s = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


# ---------------------------------------------------------------------------------------------
# Durable writes.


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return  # not supported on this platform / filesystem
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _state_bytes(obj: Any) -> int:
    """Bytes of the tensors inside a (nested) state dict."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def _disk_full(e: BaseException) -> bool:
    """torch.save on a full disk: OSError ENOSPC, or a RuntimeError from the zip writer."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    msg = str(e)
    return isinstance(e, RuntimeError) and any(
        k in msg for k in ("unexpected pos", "iostream error", "No space left")
    )


def _default_barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


class CheckpointManager:
    """Saves, lists, prunes and loads the checkpoints of one run folder.

    run_dir: the run folder (checkpoints go to run_dir/checkpoints);
    keep_last: complete checkpoints kept after each save (>= 1);
    rank, world_size, barrier: for multi-process runs (barrier defaults to torch.distributed's
        when initialised); rank 0 creates, renames and prunes, every rank writes its RNG state
        and, for DeepSpeed, its shards;
    free_margin: extra fraction of the expected size that must be free (0.1 = 10 %);
    min_free_bytes: overrides the expected size when set;
    config: the run's resolved config (YAML text), written into every checkpoint as config.yaml: what
        a resume of that checkpoint compares the new config with (open_run);
    trainable_only: a DeepSpeed engine's checkpoint holds the parameters that train and their
        optimizer state only (LoRA: the adapters; the frozen base is reloaded from model.path).
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        keep_last: int = 2,
        *,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] | None = None,
        free_margin: float = 0.1,
        min_free_bytes: int | None = None,
        config: str | None = None,
        trainable_only: bool = False,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        self.barrier = barrier or _default_barrier
        self.free_margin, self.min_free_bytes = free_margin, min_free_bytes
        self.config = config
        self.trainable_only = trainable_only

    # -- listing ----------------------------------------------------------------------------------

    @staticmethod
    def is_complete(path: str | os.PathLike) -> bool:
        p = Path(path)
        if not (_NAME_RE.match(p.name) and (p / META).is_file()):
            return False
        try:
            return bool(json.loads((p / META).read_text()).get("complete"))
        except (OSError, ValueError):
            return False

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if p.is_dir() and self.is_complete(p)]
        return sorted(found, key=lambda p: int(_NAME_RE.match(p.name).group(1)))

    def latest(self) -> Path | None:
        cks = self.list()
        return cks[-1] if cks else None

    def resolve_resume(self, resume: str) -> Path | None:
        """run.resume -> the checkpoint to load: "auto" (newest complete or None), "never" (None),
        or a path (a checkpoint folder, or a run folder whose newest checkpoint is taken)."""
        if resume == "never":
            return None
        if resume == "auto":
            for p in reversed(self.list()):
                problem = self.verify(p)
                if problem is None:
                    return p
                log.warning("checkpoint %s is damaged (%s); falling back to the previous one", p, problem)
            if self.list():
                raise ValueError(f"run.resume=auto: every checkpoint in {self.dir} is damaged (see warnings)")
            return None
        p = Path(resume)
        if self.is_complete(p):
            return p
        other = CheckpointManager(p.parent if p.name == "checkpoints" else p).latest()
        if other is None:
            raise ValueError(f"run.resume: no complete checkpoint at {resume}")
        return other

    @staticmethod
    def verify(path: str | os.PathLike) -> str | None:
        """None when every file meta.json lists is there with its recorded size (manifests written
        before sizes were recorded: present), else what is wrong, naming the file."""
        p = Path(path)
        meta = json.loads((p / META).read_text())
        sizes = meta.get("sizes") or dict.fromkeys(meta.get("files", []))
        for name, size in sizes.items():
            f = p / name
            if not f.is_file():
                return f"{f} is missing"
            if size is not None and f.stat().st_size != size:
                return f"{f} has {f.stat().st_size} bytes, {size} recorded at save"
        return None

    @staticmethod
    def step_of(path: str | os.PathLike) -> int:
        m = _NAME_RE.match(Path(path).name)
        if m is None:
            raise ValueError(f"not a checkpoint folder: {path}")
        return int(m.group(1))

    # -- saving -----------------------------------------------------------------------------------

    def expected_bytes(self, model: Any = None, optimizer: Any = None, engine: Any = None) -> int:
        """What the next checkpoint will need: the size of the newest one, else an estimate from
        the state dicts (DeepSpeed: parameters x 16 bytes, bf16 weights plus fp32 Adam states)."""
        if self.min_free_bytes is not None:
            return self.min_free_bytes
        last = self.latest()
        if last is not None:
            return _dir_bytes(last)
        n = 0
        if engine is not None:
            n += 16 * sum(
                p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                for p in engine.module.parameters()
                if p.requires_grad or not self.trainable_only
            )
        if model is not None:
            n += _state_bytes(model if isinstance(model, dict) else model.state_dict())
        if optimizer is not None:
            n += _state_bytes(optimizer.state_dict())
        return n

    def check_free_space(self, need: int) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.dir).free
        need = int(need * (1 + self.free_margin))
        if free < need:
            raise InsufficientSpaceError(
                errno.ENOSPC,
                f"not enough free space for a checkpoint in {self.dir}: need about {need / 2**30:.2f} GiB "
                f"(newest checkpoint or state size + {self.free_margin:.0%}), {free / 2**30:.2f} GiB free; "
                "free some space or lower run.keep_last",
            )

    def save(
        self,
        step: int,
        *,
        model: torch.nn.Module | dict | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        engine: Any = None,
        state: dict | None = None,
        save_fn: Callable[[Path], None] | None = None,
    ) -> Path:
        """Write checkpoint `step` atomically and prune to keep_last; returns its folder.

        model: a module (its state_dict is saved) or a state dict; optimizer: saved by rank 0;
        engine: a DeepSpeed engine, saved with engine.save_checkpoint (collective: call on
        every rank); state: the caller's picklable dict (counters, data position, metrics);
        save_fn(tmp_dir): any extra writer (called on every rank).
        """
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        name = f"{PREFIX}{step:08d}"
        final, tmp = self.dir / name, self.dir / f".tmp-{name}"
        self.check_free_space(self.expected_bytes(model, optimizer, engine))
        t0 = time.perf_counter()
        if self.rank == 0:
            self._remove_stale_tmp()
            tmp.mkdir(parents=True)
        self.barrier()
        try:
            if engine is not None:
                engine.save_checkpoint(
                    str(tmp / "engine"), tag="state", save_latest=False,
                    exclude_frozen_parameters=self.trainable_only,
                )  # fmt: skip
            if save_fn is not None:
                save_fn(tmp)
            _save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
            if self.rank == 0:
                if model is not None:
                    _save(model if isinstance(model, dict) else model.state_dict(), tmp / "model.pt")
                if optimizer is not None:
                    _save(optimizer.state_dict(), tmp / "optimizer.pt")
                _save({"step": step, **(state or {})}, tmp / "trainer_state.pt")
                if self.config is not None:
                    (tmp / CONFIG).write_text(self.config)  # fsynced with the rest below
        except BaseException as e:
            # No barrier here: with several ranks, one failing rank leaves the others waiting in the
            # next collective; the run stops either way and the previous checkpoint is intact.
            if self.rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            if _disk_full(e):
                need, free = self.expected_bytes(model, optimizer, engine), shutil.disk_usage(self.dir).free
                raise InsufficientSpaceError(
                    errno.ENOSPC,
                    f"disk full while writing checkpoint {name} in {self.dir}: need about "
                    f"{need / 2**30:.2f} GiB, {free / 2**30:.2f} GiB free ({e}); the previous checkpoint "
                    "is intact; free some space or lower run.keep_last",
                ) from e
            raise
        self.barrier()
        if self.rank == 0:
            try:
                for p in tmp.rglob("*"):  # files other writers made (DeepSpeed, save_fn) too
                    if p.is_file():
                        _fsync_file(p)
                files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
                meta = {
                    "complete": True,
                    "step": step,
                    "time": time.time(),
                    "world_size": self.world_size,
                    "kind": "deepspeed" if engine is not None else "torch",
                    "files": files,
                    "sizes": {f: (tmp / f).stat().st_size for f in files},
                    "bytes": _dir_bytes(tmp),
                }
                with open(tmp / META, "w") as f:
                    json.dump(meta, f, indent=1)
                    f.flush()
                    os.fsync(f.fileno())
                _fsync_dir(tmp)
                if final.exists():  # the same step saved again: move the old one out of the way first
                    old = self.dir / f".tmp-old-{name}"
                    shutil.rmtree(old, ignore_errors=True)
                    os.rename(final, old)
                    os.rename(tmp, final)
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    os.rename(tmp, final)
                _fsync_dir(self.dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            self._prune()
        self.barrier()
        self.last_save_seconds = time.perf_counter() - t0
        return final

    def _remove_stale_tmp(self) -> None:
        for p in self.dir.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    def _prune(self) -> None:
        for p in self.list()[: -self.keep_last]:
            # Rename first so a crash mid-delete never leaves a half-deleted "complete" checkpoint.
            doomed = self.dir / f".tmp-del-{p.name}"
            os.rename(p, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # -- loading ----------------------------------------------------------------------------------

    def load(
        self,
        path: str | os.PathLike | None = None,
        *,
        model: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        engine: Any = None,
        load_fn: Callable[[Path], None] | None = None,
        restore_rng: bool = True,
        map_location: str | torch.device = "cpu",
        strict: bool = True,
    ) -> dict:
        """Load a complete checkpoint (default: the newest) into model / optimizer / engine, restore
        this rank's RNG states, and return the caller's state dict (with "step")."""
        path = Path(path) if path is not None else self.latest()
        if path is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.dir}")
        if not self.is_complete(path):
            raise ValueError(f"{path} is not a complete checkpoint (no {META} with complete=true)")
        problem = self.verify(path)
        if problem is not None:
            raise ValueError(f"damaged checkpoint {path}: {problem}")
        if engine is not None:
            # trainable_only: the frozen weights are absent from the file, kept as loaded
            engine.load_checkpoint(
                str(path / "engine"), tag="state", load_module_strict=not self.trainable_only
            )
        if model is not None:
            model.load_state_dict(torch.load(path / "model.pt", map_location=map_location), strict=strict)
        if optimizer is not None:
            optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=map_location))
        if load_fn is not None:
            load_fn(path)
        state = torch.load(path / "trainer_state.pt", map_location=map_location, weights_only=False)
        if restore_rng:
            rng = path / f"rng-rank{self.rank}.pt"
            if not rng.is_file():
                raise ValueError(
                    f"{path} has no RNG state for rank {self.rank} (saved with world size "
                    f"{json.loads((path / META).read_text()).get('world_size')}); pass restore_rng=False"
                )
            set_rng_state(torch.load(rng, weights_only=False))
        return state


# ---------------------------------------------------------------------------------------------
# The run folder at start-up: resume only the same run, never mix two (vppo.train.setup).

CONFIG = "config.yaml"  # the run folder's resolved config; each checkpoint holds its own copy too
# what vppo.train writes into a run folder (run.overwrite deletes these and nothing else)
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "export", "tb", "curves.png", "spotlight")
# one line per start of the run: its step, the packages, machine and commit, and the base it loaded
# (model.path with the sha256 of its files): what the run ran on, and how a resume recognises its
# base after the folder it was loaded from is gone
PROVENANCE = "provenance.jsonl"


class RunFolderError(ValueError):
    """A start that would mix two runs in one folder, or a folder the run cannot write; refused
    before anything loads, with nothing in the folder changed."""


@dataclass
class RunStart:
    """What open_run decided: the checkpoint to resume (None: step 0), its step, the run-defining
    changes let through by run.allow_config_change ({key: (old, new)}) and where the old config was
    kept."""

    resume: Path | None = None
    step: int = 0
    changes: dict = field(default_factory=dict)
    previous_config: str | None = None

    def log_to(self, metrics) -> None:
        """After metrics.truncate(step) of a resume, where metrics are written (rank 0): says where it
        resumed, and logs the change record at the resume step (one: a record an earlier try at this
        same resume left behind is replaced)."""
        if not metrics.enabled or self.resume is None:
            return
        print(f"resumed from {self.resume} at step {self.step}", flush=True)
        hist = metrics.history()
        keep = [r for r in hist if not (r.get("step") == self.step and "config_change" in r)]
        if len(keep) != len(hist):
            metrics.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        if self.changes:
            change = {k: [old, new] for k, (old, new) in self.changes.items()}
            metrics.log({"step": self.step, "config_change": change, "previous_config": self.previous_config})


def apply_optimizer_config(engine: Any, t: Any) -> None:
    """train.lr / betas / weight_decay (t = cfg.train) into a resumed engine's optimizer and warm-up
    schedule: loading a checkpoint restores the values it was saved with, which would silently outlive
    a change let through by run.allow_config_change (a no-op when nothing changed)."""
    opt, sched = engine.vppo_guard, engine.lr_scheduler  # vppo.model.build_engine's
    for g in opt.param_groups:
        g.update(betas=tuple(t.betas), weight_decay=t.weight_decay, initial_lr=t.lr)
    if sched is not None:
        sched.base_lrs = [t.lr] * len(opt.param_groups)
        for g, lam in zip(opt.param_groups, sched.lr_lambdas):
            g["lr"] = t.lr * lam(sched.last_epoch)  # what the schedule's next step would have set


def run_outputs(run_dir: str | os.PathLike) -> list[str]:
    """The RUN_OUTPUTS present in run_dir (metrics.jsonl only when it has a record, checkpoints only
    when it has a step folder), with what they hold."""
    d, out = Path(run_dir), []
    if not d.is_dir():
        return out
    steps = sorted(p.name for p in (d / "checkpoints").glob(f"{PREFIX}*") if p.is_dir())
    if steps:
        out.append(f"checkpoints/ ({', '.join(steps)})")
    m = d / "metrics.jsonl"
    if m.is_file() and m.stat().st_size:
        from vppo.metrics import read_metrics

        got = sorted({r.get("step") for r in read_metrics(m) if isinstance(r.get("step"), int)})
        out.append(f"metrics.jsonl (steps {got[0]}-{got[-1]})" if got else "metrics.jsonl")
    out += [f"{n}/" if (d / n).is_dir() else n for n in RUN_OUTPUTS[2:] if (d / n).exists()]
    return out


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _fmt(v: Any) -> str:
    return "null" if v is None else repr(v) if isinstance(v, str) else str(v)


def plan_start(cfg, *, unfilled_ok: bool = False) -> RunStart:
    """Read-only: what a start of `cfg` in run.output_dir does with what is there; RunFolderError when
    it would mix runs. The rules:

    - run.resume=never: a folder holding a run (checkpoints, metrics records or an export) is
      refused unless run.overwrite=true (then open_run deletes them and the run starts clean);
    - a resume (auto: the newest good checkpoint; or a checkpoint path) compares the config that
      checkpoint was trained with (its config.yaml; the run folder's for checkpoints written before
      they held one) against cfg: a changed run-defining key (vppo.config.RUN_DEFINING) is refused,
      naming every key, unless run.allow_config_change=true; train.total_steps may grow, not fall
      below the checkpoint's step;
    - auto with no checkpoint: outputs of the same config are a start that never reached its first
      checkpoint (its records are redone: open_run drops them); of another config, refused as with
      never.
    """
    from vppo.config import config_changes

    u = cfg.run
    run_dir = Path(u.output_dir)
    outputs = run_outputs(run_dir)
    # a run's results; TensorBoard logs, curves and samples alone are what a start that failed left
    held = any(o.startswith(RUN_OUTPUTS[:3]) for o in outputs)
    new_folder = "a new run.output_dir"
    if u.resume == "never" or (u.resume != "auto" and held and not _same_folder(u.resume, run_dir)):
        if held and not u.overwrite:
            raise RunFolderError(
                f"run.output_dir={u.output_dir} holds a run ({'; '.join(outputs)}) and run.resume={u.resume} "
                f"would start another one in it, mixing the two. Use {new_folder}, run.resume=auto to "
                "continue that run, or run.overwrite=true (with run.resume=never) to delete it and start "
                "clean. Nothing was changed."
            )
        if u.resume == "never":
            return RunStart()
    ckpt = CheckpointManager(run_dir).resolve_resume(u.resume)
    if ckpt is None:
        saved = _read_config(run_dir / CONFIG)
        changes = config_changes(saved, cfg, unfilled_ok=unfilled_ok) if saved is not None else {}
        changes = _drop_same_bytes(changes, run_dir)
        if held and (saved is None or changes):
            why = "no config.yaml" if saved is None else "a different config: " + ", ".join(changes)
            raise RunFolderError(
                f"run.output_dir={u.output_dir} holds a run with no checkpoint to resume and {why} "
                f"({'; '.join(outputs)}). Use {new_folder}, or run.resume=never run.overwrite=true to delete "
                "it and start clean. Nothing was changed."
            )
        return RunStart()
    step = CheckpointManager.step_of(ckpt)
    saved = _read_config(ckpt / CONFIG)
    source = ckpt / CONFIG
    if saved is None:  # a checkpoint written before checkpoints held their config
        source = ckpt.parent.parent / CONFIG
        saved = _read_config(source)
    if saved is None:
        if not u.allow_config_change:
            raise RunFolderError(
                f"resuming {ckpt}: neither it nor its run folder has a {CONFIG} to compare the new config "
                f"with. Use {new_folder} to start a new run, or run.allow_config_change=true to resume it "
                "with this config. Nothing was changed."
            )
        log.warning("resuming %s with no saved config to compare (run.allow_config_change=true)", ckpt)
        return RunStart(ckpt, step)
    t = cfg.train.total_steps
    if t is not None and t < step:
        raise RunFolderError(
            f"train.total_steps={t} is below the step of the checkpoint it would resume ({ckpt}, step "
            f"{step}): set train.total_steps >= {step}, or use {new_folder}. Nothing was changed."
        )
    changes = _drop_same_bytes(config_changes(saved, cfg, unfilled_ok=unfilled_ok), run_dir)
    kept = f"config.step-{step:08d}.yaml"
    if changes and not u.allow_config_change:
        lines = "\n".join(f"  {k}: {_fmt(old)} -> {_fmt(new)}" for k, (old, new) in changes.items())
        raise RunFolderError(
            f"run.output_dir={u.output_dir}: resuming {ckpt.name} (step {step}) with a config that changes "
            f"what the run is; {source} has (old -> new):\n{lines}\n"
            f"To train with these values, start a new run ({new_folder}, or run.resume=never "
            "run.overwrite=true to replace this one); to continue this run with them, add "
            f"run.allow_config_change=true (the change is logged in metrics.jsonl at step {step} and the "
            f"old config kept as {kept}). Nothing was changed."
        )
    return RunStart(ckpt, step, changes, kept if changes else None)


# Path keys whose change is no change when both paths hold the same bytes: another checkout's copy of
# a shipped base (its SHA256SUMS, checked when it loads) or another cache's copy of the same data file.
SAME_BYTES_KEYS = ("model.path", "data.train", "data.val")


def _drop_same_bytes(changes: dict[str, tuple[Any, Any]], run_dir: Path) -> dict[str, tuple[Any, Any]]:
    """changes without the SAME_BYTES_KEYS whose old and new path hold the same bytes: a model folder
    by its shipped SHA256SUMS when both exist, by the sha256 the run recorded for the old one
    (PROVENANCE) when it is gone; a data file by its sha256 when both exist. Anything else stays a
    change."""
    from vppo.bases import SUMS, sha256_file

    def same(key: str, old: Any, new: Any) -> bool:
        if not (isinstance(old, str) and isinstance(new, str)):
            return False
        a, b = Path(old).expanduser(), Path(new).expanduser()
        if key == "model.path" and not a.exists() and b.is_dir():
            from vppo.provenance import model_hashes

            recorded = _recorded_base(run_dir, old)
            return recorded is not None and recorded == model_hashes(b)["combined"]
        if a.is_dir() and b.is_dir():
            return (
                (a / SUMS).is_file()
                and (b / SUMS).is_file()
                and (a / SUMS).read_bytes() == (b / SUMS).read_bytes()
            )
        if a.is_file() and b.is_file():
            return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)
        return False

    kept = {k: v for k, v in changes.items() if not (k in SAME_BYTES_KEYS and same(k, *v))}
    for k in changes.keys() - kept.keys():
        log.info("resume: %s moved (%s -> %s), same bytes: not a change", k, *changes[k])
    return kept


def _same_folder(resume: str, run_dir: Path) -> bool:
    """Whether the checkpoint path run.resume names lies in run_dir."""
    try:
        here, there = run_dir.resolve(), Path(resume).resolve()
        return there == here or here in there.parents
    except OSError:
        return False


def check_writable(run_dir: Path, rank: int = 0) -> None:
    """The run folder and its checkpoints/ exist (made here) and take a file; else RunFolderError
    naming the folder (at start-up, not at the first save after hours of steps)."""
    for d in (run_dir, run_dir / "checkpoints"):
        try:
            d.mkdir(parents=True, exist_ok=True)
            probe = d / f".write-test-rank{rank}-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise RunFolderError(
                f"cannot write to {d} ({e.strerror or e}): the run needs it for its config, metrics and "
                "checkpoints; pick a writable run.output_dir"
            ) from None


def open_run(cfg, rank: int, fill_defaults: Callable[[Any], None] | None = None) -> RunStart:
    """Start-up of a run folder, before anything loads: plan_start (before and after fill_defaults
    fills the tiny base / synthetic set into cfg), a writable folder, then on rank 0 the writes:
    run.overwrite deletes the old run's outputs (saying which), a start without a checkpoint drops
    records of an attempt that never reached one, an allowed config change keeps the old config as
    config.step-N.yaml, and config.yaml gets cfg. Every rank reads the same folder before any write."""
    from vppo.config import save_resolved

    plan_start(cfg, unfilled_ok=True)  # refuse what it can before building the tiny base
    if fill_defaults is not None:
        fill_defaults(cfg)
    start = plan_start(cfg)
    run_dir = Path(cfg.run.output_dir)
    check_writable(run_dir, rank)  # every rank writes its own part of a checkpoint
    if rank == 0:  # what a crash in the middle of an earlier deletion below left behind
        for p in run_dir.glob(".deleting-*"):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    if rank == 0 and start.resume is None:
        outputs = run_outputs(run_dir)
        names = [n for n in RUN_OUTPUTS if (run_dir / n).exists()]
        if cfg.run.overwrite:
            names += [p.name for p in run_dir.glob("config.step-*.yaml")]
            names += [PROVENANCE] if (run_dir / PROVENANCE).exists() else []
        else:  # auto, no checkpoint, same config (or only these): a start that died before its first save
            names = [n for n in ("metrics.jsonl", "tb", "curves.png", "spotlight") if n in names]
        for n in names:
            doomed = run_dir / f".deleting-{n}"  # renamed first: a crash mid-delete leaves no half run
            os.rename(run_dir / n, doomed)
            shutil.rmtree(doomed) if doomed.is_dir() else doomed.unlink()
        if names:
            why = (
                "run.overwrite=true" if cfg.run.overwrite else "no checkpoint to resume, the steps are redone"
            )
            print(
                f"{why}: deleted {', '.join(names)} in {run_dir} (it held {'; '.join(outputs)})", flush=True
            )
    if rank == 0 and start.changes:
        old = start.resume / CONFIG  # the config the checkpoint was trained with
        shutil.copyfile(old if old.is_file() else run_dir / CONFIG, run_dir / start.previous_config)
        lines = ", ".join(f"{k}: {_fmt(a)} -> {_fmt(b)}" for k, (a, b) in start.changes.items())
        log.warning("run.allow_config_change=true: resuming step %d with %s (old config kept as %s)",
                    start.step, lines, start.previous_config)  # fmt: skip
    if rank == 0:
        save_resolved(cfg, run_dir)
        record_start(run_dir, cfg.model.path, start.step)
    return start


def record_start(run_dir: Path, model_path: str | None, step: int) -> dict:
    """Append this start's line to run_dir/PROVENANCE (see there); the model folder's hashes are
    remembered by size and mtime in run_dir/.model_hashes.json, so a resume does not read it again."""
    from vppo.provenance import model_hashes, package_versions

    base = {"path": model_path, "sha256": None}
    if model_path is not None:
        base["sha256"] = model_hashes(model_path, memo=run_dir / ".model_hashes.json")["combined"]
    line = {"step": step, "time": time.time(), "base": base, "packages": package_versions()}
    with open(run_dir / PROVENANCE, "a") as f:
        f.write(json.dumps(line) + "\n")
    return line


def _recorded_base(run_dir: Path, model_path: str) -> str | None:
    """The sha256 the newest start of the run in run_dir recorded for the base at model_path."""
    found = None
    with contextlib.suppress(OSError):
        for row in (run_dir / PROVENANCE).read_text().splitlines():
            with contextlib.suppress(ValueError, AttributeError):
                base = json.loads(row).get("base") or {}
                if base.get("path") == model_path and base.get("sha256"):
                    found = base["sha256"]
    return found
