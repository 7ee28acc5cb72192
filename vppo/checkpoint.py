"""Atomic checkpoints with retention, for a plain torch model or a DeepSpeed engine.

    ckpt = CheckpointManager(run_dir, keep_last=2)                 # rank / barrier for multi-process
    ckpt.save(step, model=model, optimizer=opt, state={"data_pos": 96, "metrics": hist})
    ckpt.save(step, engine=engine, state={...})                    # DeepSpeed: collective
    path = ckpt.resolve_resume("auto")                             # newest complete, or None
    state = ckpt.load(path, model=model, optimizer=opt)            # restores the RNG states too

Layout: run_dir/checkpoints/step-00000020/ holds model.pt + optimizer.pt (or engine/, written by
engine.save_checkpoint), trainer_state.pt (the caller's state: step counters, data-order
position, metrics history), rng-rank{r}.pt (python / numpy / torch / cuda RNG of each rank) and
meta.json, written last. A save goes into run_dir/checkpoints/.tmp-step-00000020, every file is
fsynced, then the folder is renamed into place (atomic on POSIX) and the parent directory
fsynced. A crash or an error at any point leaves the previous checkpoints untouched; only after
the new one is complete are the ones beyond keep_last deleted (by listing the disk, so the
limit holds across restarts). Leftover .tmp-* folders are never taken for checkpoints and are
removed by the next save. Free space is checked before anything is written.

Files are written with torch.save and read back with weights_only=False: load only checkpoints
this code wrote.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import time
from collections.abc import Callable
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
    min_free_bytes: overrides the expected size when set.
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
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        self.barrier = barrier or _default_barrier
        self.free_margin, self.min_free_bytes = free_margin, min_free_bytes

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
                p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters()
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
                engine.save_checkpoint(str(tmp / "engine"), tag="state", save_latest=False)
            if save_fn is not None:
                save_fn(tmp)
            _save(rng_state(), tmp / f"rng-rank{self.rank}.pt")
            if self.rank == 0:
                if model is not None:
                    _save(model if isinstance(model, dict) else model.state_dict(), tmp / "model.pt")
                if optimizer is not None:
                    _save(optimizer.state_dict(), tmp / "optimizer.pt")
                _save({"step": step, **(state or {})}, tmp / "trainer_state.pt")
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
            engine.load_checkpoint(str(path / "engine"), tag="state")
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
