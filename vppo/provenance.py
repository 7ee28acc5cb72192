"""What an evaluation's numbers depend on, for its manifest: hashes, versions, the prompt template.

- `model_hashes`: sha256 of a local model folder's config, tokenizer and weight files (memoised by
  size and mtime), and of them all;
- `problems_hash`, `sha256_file`: the problems' text, answers and image bytes; a source file's bytes;
- `grader_version`: the grader's declared version and a hash of its source (vppo.reward);
- `package_versions`: the packages that change a sample or a grade, Python, CUDA, the CPU (`machine`)
  and the git commit;
- `prompt_template`: the prompt suffix, a hash of the chat template and one rendered prompt.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import subprocess
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from vppo import reward
from vppo.bases import sha256_file  # one file hash for the shipped bases and the eval manifest
from vppo.data import PROMPT_SUFFIX, Problem, open_image, render_prompt


def model_hashes(path: str | os.PathLike, memo: str | os.PathLike | None = None) -> dict:
    """sha256 of every config, tokenizer and weight file of a local model folder, and of them all.

    `memo`: a JSON file remembering (size, mtime) -> sha256 per file, so a resumed evaluation of a
    15 GB checkpoint does not read it again; a file whose size or mtime changed is hashed anew."""
    root = Path(path)
    if not root.is_dir():
        return {"combined": None, "files": {}, "note": f"{path} is not a local folder"}
    known = {}
    if memo is not None and Path(memo).is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            known = json.loads(Path(memo).read_text())
    exts = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".py")
    files, seen = {}, {}
    for p in sorted(root.rglob("*")):
        if not (p.is_file() and p.suffix in exts):
            continue
        st, name = p.stat(), p.relative_to(root).as_posix()
        stamp = [str(p.resolve()), st.st_size, st.st_mtime_ns]
        hit = known.get(name)
        files[name] = hit["sha256"] if hit and hit.get("stamp") == stamp else sha256_file(p)
        seen[name] = {"stamp": stamp, "sha256": files[name]}
    if memo is not None:
        Path(memo).write_text(json.dumps(seen, indent=1))
    combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"combined": combined, "files": files}


def problems_hash(problems: Sequence[Problem]) -> str:
    """sha256 over every problem's text, answer and image bytes, in order (layout-independent)."""
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.uid, p.problem, p.answer]).encode())
        for src in p.images:
            if isinstance(src, bytes):
                h.update(src)
            elif isinstance(src, str):
                h.update(Path(src).read_bytes())
            else:
                h.update(open_image(src).tobytes())
    return h.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine() -> dict:
    """The CPU model and its widest vector ISA: CPU kernels differ by ISA, and with them the last
    bits of a build (the tiny base) or a sample."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and ":" in line:
                flags = set(line.split(":", 1)[1].split())
            if flags and model:
                break
    isa = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), None)
    return {"cpu": model, "isa": isa, "cpus": os.cpu_count()}


def package_versions() -> dict:
    names = (
        "torch",
        "transformers",
        "tokenizers",
        "mathruler",
        "math-verify",
        "sympy",
        "pillow",
        "numpy",
        "vppo",
    )
    out = {n: _version(n) for n in names}
    out["python"] = platform.python_version()
    out["machine"] = machine()
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    try:
        repo = Path(__file__).resolve().parents[1]
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        out["git_commit"] = head.stdout.strip() or None
        out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def prompt_template(processor, example: Problem | None, suffix: str | None = PROMPT_SUFFIX) -> dict:
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", "")
    return {
        "suffix": suffix,
        "chat_template_sha256": hashlib.sha256((template or "").encode()).hexdigest(),
        "example": render_prompt(example, processor, suffix) if example is not None else None,
    }


def grader_version() -> dict:
    """The grader's declared version (if any) and a hash of its source, so an edit shows."""
    src = Path(reward.__file__).read_bytes()
    return {
        "module": "vppo.reward (mathruler grade_answer behind the project's normalisation)",
        "version": str(getattr(reward, "GRADER_VERSION", getattr(reward, "__version__", "unversioned"))),
        "source_sha256": hashlib.sha256(src).hexdigest(),
        "mathruler": _version("mathruler"),
    }
