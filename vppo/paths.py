"""Where cached artifacts live (the synthetic data set and the tiny model).

The root is `$VPPO_CACHE` when set, else `<repo>/.cache/vppo` (gitignored). Every artifact sits in a
sub-folder named by a hash of its inputs, so a changed config builds a new one next to the old.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def cache_dir() -> Path:
    """The cache root: `$VPPO_CACHE` or `<repo>/.cache/vppo` (not created here)."""
    env = os.environ.get("VPPO_CACHE")
    return Path(env).expanduser().resolve() if env else REPO_ROOT / ".cache" / "vppo"


def synth_root() -> Path:
    return cache_dir() / "synth"


def tiny_root() -> Path:
    return cache_dir() / "tiny"


@contextlib.contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """An exclusive file lock at `path` (created), so concurrent processes build an artifact once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
