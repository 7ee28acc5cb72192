"""Make PyPI's torchvision importable beside a CPU build of torch (the vLLM CPU environment).

PyPI's torchvision wheels are CUDA builds: beside torch+cpu their compiled ops do not load, and
`import torchvision` fails in torchvision/_meta_registrations.py, whose two
`@torch.library.register_fake("torchvision::nms" / "torchvision::qnms")` decorators need those ops
(`RuntimeError: operator torchvision::nms does not exist`). The Qwen2.5-VL processor imports
torchvision (its video processor) but uses only the Python image path. This rewrites the two
decorators so that they register only when the compiled ops are present (exactly what the file's
own `register_meta` helper already does for its other ops). Idempotent; `--check` only reports.

    python scripts/patch_torchvision.py [--check]     # run by the interpreter of the target env
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

OLD = '@torch.library.register_fake("torchvision::{op}")'
NEW = (
    "@(torch.library.register_fake if torchvision.extension._has_ops() else lambda *a, **k: lambda f: f)"
    '("torchvision::{op}")  # vppo: skipped without compiled ops'
)
OPS = ("nms", "qnms")


def main(argv: list[str]) -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        print("patch_torchvision: torchvision is not installed in", sys.prefix, file=sys.stderr)
        return 1
    path = Path(next(iter(spec.submodule_search_locations))) / "_meta_registrations.py"
    src = path.read_text()
    todo = [op for op in OPS if OLD.format(op=op) in src]
    if "--check" in argv:
        print(f"{path}: {'needs patching' if todo else 'patched or not needed'}")
        return 0
    for op in todo:
        src = src.replace(OLD.format(op=op), NEW.format(op=op))
    if todo:
        path.write_text(src)
    print(f"patch_torchvision: {path}: {'patched ' + ', '.join(todo) if todo else 'already patched'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
