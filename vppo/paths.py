"""Where cached artifacts live (the synthetic data set and the tiny model).

The root is `$VPPO_CACHE` when set, else `<repo>/.cache/vppo` (gitignored). Every artifact sits in a
sub-folder named by a hash of its inputs, so a changed config builds a new one next to the old.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def artifact_key(inputs: dict) -> str:
    """A short stable hash of an artifact's inputs (JSON-serialisable), naming its cache folder."""
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def build_once(target: Path, build: Callable[[Path], None], marker: str) -> Path:
    """Build into `target` unless `target/marker` exists; atomic (temp folder + rename) and locked.

    `build(tmp_dir)` writes the artifact, `marker` last. Concurrent callers wait for the first one.
    """
    if (target / marker).exists():
        return target
    with build_lock(target.parent / f".{target.name}.lock"):
        if (target / marker).exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            if not (tmp / marker).exists():
                raise RuntimeError(f"build of {target} did not write {marker}")
            if target.exists():  # an interrupted earlier build
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
