"""The registry of bench cases: one module bench/case_<name>.py per entry, each exporting CASES.

Apart from bench/cases.py (what a case is) so that the case files, which import that, are
never imported back by it.
"""

from __future__ import annotations

import importlib

from .cases import Case

CASE_MODULES = (
    "token_dependency",
    "token_dependency_linear",
    "topk_token_mask",
    "token_logprobs",
    "token_logprobs_linear",
    "vppo_step",
    "packing",  # no kernel cases: packed vs padded, python -m bench.case_packing (make bench runs it)
    "rollout",  # no kernel cases: hf vs vllm tokens/s, python -m bench.case_rollout (make bench runs it)
)


def load_cases(names: list[str] | None = None) -> list[Case]:
    """The cases named (a case name, or a module name for all of its cases), in registry order."""
    by_module = {m: importlib.import_module(f"bench.case_{m}").CASES for m in CASE_MODULES}
    cases = [c for cs in by_module.values() for c in cs]
    if not names:
        return cases
    known = {c.name for c in cases} | set(by_module)
    for n in names:
        if n not in known:
            raise ValueError(f"unknown bench case {n!r}; cases: {', '.join(sorted(known))}")
    wanted = {c.name for n in names for c in by_module.get(n, [])} | set(names)
    return [c for c in cases if c.name in wanted]
