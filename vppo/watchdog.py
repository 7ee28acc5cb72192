"""Finding hangs: stack dumps on demand (SIGUSR1) and when a phase overruns, plus phase timings.

    timer = PhaseTimer(watchdog_seconds=1800, nvtx=cfg.run.nvtx)   # also installs the SIGUSR1 dump
    with timer.phase("generate"):
        ...
    metrics.update({f"time_{k}": v for k, v in timer.last().items()})

- `kill -USR1 <pid>` prints the Python stack of every thread of that process (faulthandler, so
  it works while the main thread is stuck in C code, e.g. a collective that never returns).
- A monitor thread watches the open phases; when one has run longer than `watchdog_seconds`
  it writes "watchdog: phase 'generate' has run 1803 s (limit 1800 s)" and the stacks of all
  threads (faulthandler.dump_traceback, which needs no cooperation from the stuck thread), then
  again every further `watchdog_seconds` while it keeps running, and calls `on_timeout`.
  The run is not killed: a slow phase may still finish, and the dumps say where it waits.
- Per-phase wall times: `last()` (summed since the previous call: one step's worth when called
  once a step), `totals`, `counts`. `sync` (e.g. torch.cuda.synchronize) is called at the end
  of each phase so GPU work is attributed to the phase that queued it. With `nvtx=True` each
  phase is also an NVTX range (for Nsight Systems), when the nvtx package is installed.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

_registered: set[int] = set()


def install_stack_dump_signal(sig: int = signal.SIGUSR1, file: IO | None = None) -> None:
    """On `sig`, write the stack of every thread to `file` (default stderr) and carry on."""
    faulthandler.register(sig, file=file or sys.stderr, all_threads=True, chain=False)
    _registered.add(sig)


def dump_stacks(file: IO | None = None, header: str | None = None) -> None:
    """Write a header line and the stacks of all threads now."""
    f = file or sys.stderr
    if header:
        f.write(header.rstrip("\n") + "\n")
        f.flush()
    faulthandler.dump_traceback(file=f, all_threads=True)
    f.flush()


class PhaseTimer:
    """Named, nestable phases with wall-clock timings and a watchdog.

    watchdog_seconds: dump all stacks when a phase runs longer than this (None or 0 = off);
    file: where dumps go (a real file with a fileno; default stderr);
    on_timeout(name, elapsed): called from the monitor thread after each dump;
    sync: called at the end of each phase (e.g. torch.cuda.synchronize);
    nvtx: wrap each phase in an NVTX range;
    install_signal: also register the SIGUSR1 stack dump (main process default).
    """

    def __init__(
        self,
        watchdog_seconds: float | None = None,
        *,
        file: IO | None = None,
        on_timeout: Callable[[str, float], None] | None = None,
        sync: Callable[[], None] | None = None,
        nvtx: bool = False,
        install_signal: bool = True,
        poll_seconds: float | None = None,
    ):
        if watchdog_seconds is not None and watchdog_seconds < 0:
            raise ValueError(f"watchdog_seconds must be >= 0 or None, got {watchdog_seconds}")
        self.limit = watchdog_seconds or None
        self.file, self.on_timeout, self.sync = file, on_timeout, sync
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.timeouts: dict[str, int] = defaultdict(int)
        self._since_last: dict[str, float] = defaultdict(float)
        self._open: dict[int, tuple[str, float, float]] = {}  # id -> (name, start, next dump time)
        self._next_id = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._nvtx = None
        if nvtx:
            try:
                import nvtx as _nvtx  # optional, nvtx=True only

                self._nvtx = _nvtx
            except ImportError:
                pass
        if install_signal:
            install_stack_dump_signal(file=file)
        self._thread = None
        if self.limit:
            self._poll = poll_seconds or min(1.0, self.limit / 10)
            self._thread = threading.Thread(target=self._watch, name="vppo-watchdog", daemon=True)
            self._thread.start()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with self._lock:
            pid = self._next_id
            self._next_id += 1
            self._open[pid] = (name, t0, t0 + self.limit if self.limit else float("inf"))
        if self._nvtx is not None:
            self._nvtx.push_range(name)
        try:
            yield
        finally:
            try:
                if self.sync is not None:
                    self.sync()
            finally:
                if self._nvtx is not None:
                    self._nvtx.pop_range()
                dt = time.perf_counter() - t0
                with self._lock:
                    self._open.pop(pid, None)
                    self.totals[name] += dt
                    self.counts[name] += 1
                    self._since_last[name] += dt

    def last(self) -> dict[str, float]:
        """Seconds per phase since the previous call (then reset)."""
        with self._lock:
            out = dict(self._since_last)
            self._since_last.clear()
        return out

    def open_phases(self) -> list[tuple[str, float]]:
        """(name, seconds so far) of the phases running now, outermost first."""
        now = time.perf_counter()
        with self._lock:
            return [(n, now - t0) for n, t0, _ in self._open.values()]

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            now = time.perf_counter()
            fired = []
            with self._lock:
                for pid, (name, t0, due) in list(self._open.items()):
                    if now >= due:
                        self._open[pid] = (name, t0, due + self.limit)
                        self.timeouts[name] += 1
                        fired.append((name, now - t0))
            for name, elapsed in fired:
                dump_stacks(
                    self.file,
                    f"watchdog: phase {name!r} has run {elapsed:.0f} s (limit {self.limit:g} s); "
                    f"open phases {self.open_phases()}; stacks of all threads:",
                )
                if self.on_timeout is not None:
                    self.on_timeout(name, elapsed)

    def close(self) -> None:
        """Stop the monitor thread (phases still work, without the watchdog)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> PhaseTimer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
