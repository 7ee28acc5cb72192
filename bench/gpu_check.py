"""The prepared GPU check (issue 17): one command, <= 8 minutes on one H200.

    python -m bench.gpu_check --out DIR        (or: make gpu-check)

Steps, each with its own time limit, results in DIR/gpu_check.json and DIR/README_table.md:
  kernel_tests   the kernel tests on CUDA (TRITON_INTERPRET=0)
  kernel_bench   the bench's Triton / Liger / naive / compile cases of the linear entry points at
                 the 7B lm_head shapes (`python -m bench --cases ...`)
  packing_cpu    packed vs padded forward on the CPU (bench.case_packing, tiny and 7B lengths)
  packing_gpu    packed vs padded forward of a Qwen2.5-VL-7B-shaped language model (random
                 weights, 2 layers, bf16) on the 7B length distribution, flash_attention_2 when
                 flash-attn is installed else sdpa
  qwen3_vl_gpu   a Qwen3-VL-8B-shaped model (random weights, 3 LLM and 3 vision layers, DeepStack
                 from each vision layer, bf16; vppo/models/qwen3_vl.py builds it) on image + text
                 rows whose images repeat as a group's do: packed vs padded forward at the response
                 positions, and the scoring pass (log-probs, entropy, exact KL, k3 with a perturbed
                 image) packed vs padded (`qwen3_vl_check`, which the tests run on a micro shape)
Without a GPU the CUDA steps are recorded as SKIPPED with the reason, and printed so.
Needs no network, deepspeed, liger or vllm (a missing Liger shows as its bench column's skip).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = [f"tests/test_{n}.py" for n in ("logprobs", "logprobs_linear", "dependency", "topk")]
BENCH_CASES = "token_logprobs_linear,token_dependency_linear"


def _sub(cmd: list[str], timeout: float, **env) -> dict:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **env})  # fmt: skip
        status = "ok" if p.returncode == 0 else "failed"
        tail = (p.stdout + p.stderr)[-2000:]
    except subprocess.TimeoutExpired:
        status, tail = "timeout", f"over {timeout} s"
    return {"status": status, "seconds": round(time.perf_counter() - t0, 1), "tail": tail}


def _packing_gpu() -> dict:
    from bench import case_packing as cp

    attn = "sdpa"
    try:
        import flash_attn  # noqa: F401

        attn = "flash_attention_2"
    except ImportError:
        pass
    m = cp.Q7B
    model = cp.small_model(m["hidden"], 2, m["heads"], m["kv_heads"], vocab=m["vocab"], attn=attn,
                           dtype=torch.bfloat16)  # fmt: skip
    res = cp.measure(kinds=("7b",), device="cuda", model=model)["7b"]
    return {"status": "ok", "attn": attn, **res}


# Qwen3-VL-8B-Instruct's shapes (its config.json), a few layers of each tower.
Q3_8B = dict(hidden=4096, intermediate=12288, layers=3, heads=32, kv_heads=8, vision_depth=3,
             vision_hidden=1152, vision_intermediate=4304, vision_heads=16, vocab=151936)  # fmt: skip
Q3_MICRO = dict(hidden=64, intermediate=128, layers=3, heads=2, kv_heads=1, vision_depth=2,
                vision_hidden=32, vision_intermediate=64, vision_heads=2, vocab=300)  # fmt: skip
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
            "<|image_pad|>", "<|video_pad|>")  # fmt: skip


class _Ids:
    """What a family's build_model reads of a tokenizer: the special tokens at the vocabulary's end."""

    def __init__(self, vocab: int):
        self.vocab, self.pad_token_id = vocab, vocab - len(SPECIALS)

    def __len__(self):
        return self.vocab

    def convert_tokens_to_ids(self, t: str) -> int:
        return self.vocab - len(SPECIALS) + SPECIALS.index(t)


def qwen3_vl_check(shape: dict = Q3_8B, device: str = "cuda", dtype=torch.bfloat16, grid: int = 16) -> dict:
    """Packed vs padded on a random Qwen3-VL of `shape`: 4 rows, two images of a (1, grid, grid)
    patch grid each shared by two rows, prompts and responses of different lengths. Returns the
    max |packed - padded| of the response hidden states and of the scoring pass's fields, and
    status ok when the log-probs agree within the dtype's tolerance (fp32 1e-4, bf16 0.1)."""
    from types import SimpleNamespace

    from vppo import loss, packing
    from vppo.model import FusedLMHead
    from vppo.models import Size, family
    from vppo.perturb import PerturbSpec, perturb_pixel_values
    from vppo.rollout import model_inputs, response_hidden
    from vppo.tokens import TokenIds
    from vppo.trajectory import Trajectory

    fam, tok = family("qwen3_vl"), _Ids(shape["vocab"])
    size = Size(**{k: v for k, v in shape.items() if k != "vocab"})
    hf = fam.build_model(size, tok).to(device=device, dtype=dtype).eval()
    FusedLMHead.replace(hf)
    g = torch.Generator().manual_seed(0)
    img_tokens = grid * grid // fam.merge**2
    prompts, resp = [12, 12, 30, 30], [9, 3, 17, 1]  # text tokens per prompt, response tokens per row
    P, R = max(prompts) + img_tokens + 2, max(resp)
    ids = torch.full((4, P + R), tok.pad_token_id)
    attn, mm = torch.zeros(4, P + R, dtype=torch.long), torch.zeros(4, P + R, dtype=torch.long)
    for i, (n, r) in enumerate(zip(prompts, resp)):
        text = torch.randint(0, tok.pad_token_id, (n,), generator=g)
        row = [tok.convert_tokens_to_ids("<|vision_start|>")] + [
            tok.convert_tokens_to_ids("<|image_pad|>")
        ] * img_tokens
        row = torch.tensor(row + [tok.convert_tokens_to_ids("<|vision_end|>")])
        ids[i, P - n - len(row) : P] = torch.cat([row, text])
        mm[i, P - n - len(row) + 1 : P - n - 1] = 1
        ids[i, P : P + r] = torch.randint(0, tok.pad_token_id, (r,), generator=g)
        attn[i, P - n - len(row) : P + r] = 1
    thw = torch.tensor([[1, grid, grid]])
    pix = [torch.randn(grid * grid, 3 * 2 * fam.patch**2, generator=g) for _ in range(2)]
    ip = SimpleNamespace(image_mean=[0.5] * 3, image_std=[0.5] * 3, patch_size=fam.patch,
                         temporal_patch_size=2, merge_size=fam.merge)  # fmt: skip
    masked = [
        perturb_pixel_values(x.clamp(-1, 1), thw, PerturbSpec(patch_size=fam.patch), 7, ip) for x in pix
    ]
    traj = Trajectory(
        input_ids=ids, attention_mask=attn, mm_token_type_ids=mm, prompt_len=P,
        response_mask=torch.arange(R)[None] < torch.tensor(resp)[:, None],
        pixel_values=[pix[i // 2].clamp(-1, 1).to(dtype) for i in range(4)],
        image_grid_thw=[thw] * 4, group=torch.tensor([0, 0, 1, 1]),
        masked_pixel_values=[masked[i // 2].to(dtype) for i in range(4)],
    )  # fmt: skip
    tids = TokenIds(vision=[tok.convert_tokens_to_ids(t) for t in SPECIALS[3:]], pad=tok.pad_token_id,
                    eos=[tok.convert_tokens_to_ids("<|im_end|>")],
                    vision_start=tok.convert_tokens_to_ids("<|vision_start|>"))  # fmt: skip
    res: dict = {
        "status": "ok",
        "dtype": str(dtype).removeprefix("torch."),
        "rows": 4,
        "image_tokens": img_tokens,
    }
    with torch.no_grad():
        inputs = model_inputs(traj, vision_ids=tids.vision, pad_id=tids.pad)
        padded = response_hidden(hf, inputs, P)[traj.response_mask.to(device)]
        packed = packing.packed_hidden(hf, packing.pack(hf, inputs, traj.response_mask, P))
        res["hidden_max_abs_diff"] = float((packed.float() - padded.float()).abs().max())
        out = {}
        for pk in (False, True):
            t0 = time.perf_counter()
            out[pk] = loss.score(hf, traj.select(range(4)), loss.LossOptions(impl="torch"), ids=tids, micro=4,
                                 dependency=True, packed=pk)  # fmt: skip
            res[f"score_{'packed' if pk else 'padded'}_s"] = round(time.perf_counter() - t0, 3)
    for k in ("old_logp", "entropy", "kl", "k3"):
        res[f"{k}_max_abs_diff"] = float((getattr(out[True], k) - getattr(out[False], k)).abs().max())
    tol = 1e-4 if dtype == torch.float32 else 0.1
    if not res["old_logp_max_abs_diff"] <= tol or not float(out[True].kl.abs().sum()) > 0:
        res["status"] = "failed"
    return res


def run(out: Path, cuda: bool | None = None) -> dict:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    skip = {"status": "SKIPPED", "reason": "no CUDA device"}
    py = sys.executable
    res: dict = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__}
    res["kernel_tests"] = (
        _sub([py, "-m", "pytest", "-q", "-x", *KERNEL_TESTS], 240, TRITON_INTERPRET="0") if cuda else skip
    )
    res["kernel_bench"] = (
        _sub(
            [
                py,
                "-m",
                "bench",
                "--cases",
                BENCH_CASES,
                "--out",
                str(out / "bench"),
                "--no-traffic",
                "--no-compile-report",
            ],
            150,
            TRITON_INTERPRET="0",
        )  # fmt: skip
        if cuda
        else skip
    )
    from bench import case_packing as cp

    t0 = time.perf_counter()
    res["packing_cpu"] = {"status": "ok", **cp.measure(device="cpu")}
    res["packing_cpu"]["seconds"] = round(time.perf_counter() - t0, 1)
    try:
        res["packing_gpu"] = _packing_gpu() if cuda else skip
    except Exception as e:  # reported, not raised: the other steps' results still count
        res["packing_gpu"] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:2000]}
    try:
        res["qwen3_vl_gpu"] = qwen3_vl_check() if cuda else skip
    except Exception as e:
        res["qwen3_vl_gpu"] = {"status": "failed", "reason": f"{type(e).__name__}: {e}"[:2000]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=1))
    (out / "README_table.md").write_text(table(res))
    return res


def table(res: dict) -> str:
    rows = ["| step | status | detail |", "|---|---|---|"]
    for k in ("kernel_tests", "kernel_bench", "packing_cpu", "packing_gpu", "qwen3_vl_gpu"):
        r = res[k]
        if r["status"] == "SKIPPED":
            detail = r["reason"]
        elif k == "qwen3_vl_gpu" and "old_logp_max_abs_diff" in r:
            detail = (f"{r['dtype']}: packed - padded max |diff| hidden {r['hidden_max_abs_diff']:.2g}, "
                      f"logp {r['old_logp_max_abs_diff']:.2g}, entropy {r['entropy_max_abs_diff']:.2g}, "
                      f"kl {r['kl_max_abs_diff']:.2g}, k3 {r['k3_max_abs_diff']:.2g}")  # fmt: skip
        elif k.startswith("packing") and r["status"] == "ok":
            src = {x: r[x] for x in ("tiny", "7b") if isinstance(r.get(x), dict)} or {"7b": r}
            detail = "; ".join(
                f"{x}: pad {v['pad_frac']:.0%}, tokens x{v['token_ratio']:.2f}, "
                f"FLOPs x{v['flop_ratio']:.2f}, "
                f"time x{v['time_ratio']:.2f}"
                for x, v in src.items()
            )
        else:
            detail = f"{r.get('seconds', '')} s"
        rows.append(f"| {k} | {r['status']} | {detail} |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/out/gpu_check")
    args = ap.parse_args(argv)
    res = run(Path(args.out))
    for k, v in res.items():
        if isinstance(v, dict):
            print(f"{k}: {v['status']}" + (f" ({v['reason']})" if "reason" in v else ""), flush=True)
    print(table(res))
    return 0 if all(v["status"] in ("ok", "SKIPPED") for v in res.values() if isinstance(v, dict)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
