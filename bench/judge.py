"""Judging: roofline predictions for the Triton / Liger providers from their interpreter
counts, and the targets (PASS / MISS, reported, not asserted) on the measured rows.
"""

from __future__ import annotations

from kernels._utils import CHUNK_BYTES  # the torch impls' bound on [rows, V] temporaries (issue 2)

from . import roofline
from .cases import QWEN, Case, Shape, shape_dims


def _traffic_for(case: Case, shape: Shape, traffic: dict, prov: str) -> dict | None:
    """The interpreter count to scale to `shape`: same V (and H) if counted, else the first."""
    rows = [r for r in traffic.get(case.name, []) if r["provider"] == prov and r["status"] == "ok"]
    if not rows:
        return None
    d, _ = shape_dims(shape.key())
    for r in rows:
        dr, _ = shape_dims(r["shape"])
        if dr.get("V") == d.get("V") and dr.get("H") == d.get("H"):
            return r
    return rows[0]


def predict(case: Case, shape: Shape, traffic: dict, prov: str = "triton") -> dict | None:
    """Roofline prediction for a Triton / Liger provider at `shape`, from its interpreter count:
    bytes scaled as (counted / minimum) x minimum(shape), FLOPs as (counted dot FLOPs / useful)
    x useful(shape)."""
    r = _traffic_for(case, shape, traffic, prov)
    if r is None:
        return None
    byte_ratio = (r["loaded"] + r["stored"] + r["torch_bytes"]) / r["min_bytes"]
    nbytes = byte_ratio * case.min_bytes(shape)
    flops = 0.0
    if case.flops(shape):
        counted = r["dot_flops"] + r["torch_flops"]
        flops = counted / max(r["useful_flops"], 1) * case.flops(shape)
    return dict(
        pred_h100_ms=roofline.kernel_time(nbytes, flops) * 1e3,
        pred_bytes=nbytes,
        pred_flops=flops,
        counted_at=r["shape"],
    )


def predictions(cases: list[Case], results: dict, device: str, tiny: bool) -> list[dict]:
    """One row per (case, shape): the roofline predictions of every provider (eager ones from
    their counted ops, Triton / Liger from the interpreter counts) and, on a GPU, the measured
    Triton time beside them."""
    out = []
    for case in cases:
        for shape in case.shapes(device, tiny):
            p = dict(case=case.name, shape=shape.key())
            for prov in ("naive", "torch"):
                r = next(
                    (
                        r
                        for r in results["rows"]
                        if r["case"] == case.name
                        and r["shape"] == shape.key()
                        and r["provider"] == prov
                        and "pred_h100_ms" in r
                    ),
                    None,
                )
                if r:
                    p[f"{prov}_ms"] = r["pred_h100_ms"]
            for prov in ("triton", "liger"):
                pr = predict(case, shape, results["traffic"], prov)
                if pr:
                    p[f"{prov}_ms"] = pr["pred_h100_ms"]
                    p[f"{prov}_detail"] = pr
            if device == "cuda":
                r = next(
                    (
                        r
                        for r in results["rows"]
                        if r["case"] == case.name
                        and r["shape"] == shape.key()
                        and r["provider"] == "triton"
                        and "ms" in r
                    ),
                    None,
                )
                if r:
                    p["measured_triton_ms"] = r["ms"]
            out.append(p)
    return out


def targets(results: dict) -> list[dict]:
    out = []
    rows = results["rows"]
    dev = results["machine"]["device"]

    def add(name, value, limit, ok, why=""):
        out.append(
            dict(
                target=name,
                value=value,
                limit=limit,
                result=("PASS" if ok else "MISS") if ok is not None else "n/a",
                why=why,
            )
        )

    # 1. token_dependency traffic <= 1.05 x minimum (interpreter count at the Qwen vocabulary)
    tr = [r for r in results["traffic"].get("token_dependency", []) if r["provider"] == "triton"]
    tr = [r for r in tr if r["status"] == "ok"]
    if tr:
        r = max(tr, key=lambda r: shape_dims(r["shape"])[0].get("V", 0))
        ratio = (r["loaded"] + r["stored"] + r["torch_bytes"]) / r["min_bytes"]
        add(
            "token_dependency traffic / minimum",
            round(ratio, 4),
            "<= 1.05",
            ratio <= 1.05,
            f"counted at {r['shape']}",
        )
    else:
        add(
            "token_dependency traffic / minimum",
            None,
            "<= 1.05",
            None,
            "Triton kernel not counted (see traffic)",
        )
    # 2. torch impls' peak extra memory <= 10 % of naive at N=2048, V=152064
    for r in rows:
        d, _ = shape_dims(r["shape"])
        if (
            r["provider"] == "torch"
            and d.get("N") == 2048
            and d.get("V") == QWEN["V"]
            and r["status"] == "ok"
        ):
            if "mem_vs_naive" in r:
                how = (
                    "naive extrapolated linearly in N" if "naive_peak_bytes_extrapolated" in r else "measured"
                )
                naive = r.get("naive_peak_bytes_extrapolated") or r["peak_bytes"] / r["mem_vs_naive"]
                if r.get("out_bytes", 0) > 2**20:  # a returned gradient counts as extra memory too
                    excl = (r["peak_bytes"] - r["out_bytes"]) / (naive - r["out_bytes"])
                    how += (
                        f"; {excl:.3f} without the {r['out_bytes'] / 2**20:.0f} MiB it returns (the gradient)"
                    )
                add(
                    f"{r['case']} torch peak memory / naive at {r['shape']}",
                    round(r["mem_vs_naive"], 4),
                    "<= 0.10",
                    r["mem_vs_naive"] <= 0.10,
                    how,
                )
    # 3. fused VPPO step: peak extra memory independent of V up to one chunk
    vs = [
        r
        for r in rows
        if r["case"] == "vppo_step" and r["provider"] in ("torch", "triton") and r["status"] == "ok"
    ]
    for prov in ("torch", "triton"):
        pts = {}
        for r in vs:
            if r["provider"] == prov and "peak_bytes" in r:
                d, _ = shape_dims(r["shape"])
                # the weight gradient [V, H] is an output of either path, not a temporary
                pts.setdefault(r["tokens"], {})[d["V"]] = r["peak_bytes"] - r.get("out_bytes", 0)
        for n, byv in sorted(pts.items()):
            if len(byv) >= 2:
                lo, hi = byv[min(byv)], byv[max(byv)]
                add(
                    f"vppo_step {prov}: peak extra less gradients, V={max(byv)} minus V={min(byv)}, N={n}",
                    hi - lo,
                    f"<= one chunk ({CHUNK_BYTES >> 20} MiB)",
                    hi - lo <= CHUNK_BYTES,
                )
    # 4. no torch impl slower on CPU than the naive reference
    if dev == "cpu":
        naive = {(r["case"], r["shape"]): r for r in rows if r["provider"] == "naive" and "ms" in r}
        for r in rows:
            if r["provider"] == "torch" and "time_vs_naive" in r:
                n = naive[r["case"], r["shape"]]
                overlap = r["ms_q20"] <= n["ms_q80"] and n["ms_q20"] <= r["ms_q80"]
                add(
                    f"{r['case']} torch time / naive at {r['shape']} (CPU)",
                    round(r["time_vs_naive"], 3),
                    "<= 1.0",
                    r["time_vs_naive"] <= 1.0,
                    "q20-q80 ranges overlap: within this machine's noise"
                    if overlap
                    else "q20-q80 ranges disjoint",
                )
    return out
