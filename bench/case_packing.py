"""Case packing: packed (padding-free, `vppo.packing`) vs padded passes over one micro-batch.

Not a kernel case (CASES is empty: the kernel harness has nothing to time here); it runs on its own:

    python -m bench.case_packing [--out DIR]      # JSON on stdout, DIR/packing.json

Two length distributions, both in one run:
  tiny     the shapes of the embedded tiny run (8 rows, prompts ~180-200 tokens, responses <= 64);
  7b       a ViRL39K-like 7B micro-batch (16 rows, prompts 300-1300 tokens, responses log-uniform
           30-2048 tokens), the prompts left-padded and the responses right-padded as the rollout is.
For each: the positions each layout computes (tokens), the FLOPs of a Qwen2.5-VL-7B forward over
them (2 x parameters per token + causal attention per row), and the CPU time of a forward of a
small random Qwen2.5-VL text model over the same rows (padded: the [b, L] batch with its mask;
packed: the (1, T) row with 4-channel position ids), reported as packed / padded ratios. The text
model stands in for the whole model (no image) so the CPU timing stays seconds long.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

CASES: list = []  # not a kernel case: see the module docstring

# Qwen2.5-VL-7B language model
Q7B = dict(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064)


def lengths(kind: str, seed: int = 0) -> tuple[list[int], list[int]]:
    """(prompt lengths, response lengths) of one micro-batch of the named distribution."""
    g = torch.Generator().manual_seed(seed)
    if kind == "tiny":
        p = torch.randint(180, 202, (8,), generator=g)
        r = torch.randint(8, 65, (8,), generator=g)
    elif kind == "7b":
        p = torch.randint(300, 1301, (16,), generator=g)
        r = torch.exp(torch.empty(16).uniform_(math.log(30), math.log(2048), generator=g)).long()
    else:
        raise ValueError(kind)
    return p.tolist(), r.tolist()


def forward_flops(seq_lens: list[int], m: dict = Q7B) -> float:
    """FLOPs of a forward of the 7B language model over rows of these lengths (each causal)."""
    h, f, layers = m["hidden"], m["intermediate"], m["layers"]
    kv = h * m["kv_heads"] // m["heads"]
    per_token = layers * 2 * (h * h * 2 + h * kv * 2 + 3 * h * f)  # q, o, k, v, gate/up/down
    attn = layers * 2 * 2 * h  # QK^T and PV per (query, key) pair
    return float(sum(per_token * n + attn * n * (n + 1) / 2 for n in seq_lens))


def counts(p: list[int], r: list[int]) -> dict:
    """Positions and FLOPs of the padded [b, max P + max R] layout and of the packed rows."""
    width = max(p) + max(r)
    valid = [a + b for a, b in zip(p, r)]
    padded_tokens, packed_tokens = len(p) * width, sum(valid)
    return {
        "rows": len(p),
        "padded_tokens": padded_tokens,
        "packed_tokens": packed_tokens,
        "pad_frac": 1 - packed_tokens / padded_tokens,
        "token_ratio": packed_tokens / padded_tokens,
        "flop_ratio": forward_flops(valid) / forward_flops([width] * len(p)),
    }


def small_model(hidden=64, layers=2, heads=4, kv_heads=2, vocab=512, attn="sdpa", dtype=torch.float32):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    q = hidden // heads // 8  # M-RoPE sections 2q + 3q + 3q = head_dim / 2 (7B: 16, 24, 24)
    text = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 2 // 8 * 8 or hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=8192, bos_token_id=None, eos_token_id=None, pad_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "mrope_section": [q, 3 * q // 2, 3 * q // 2]},
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=vocab - 1,
                           video_token_id=vocab - 2, vision_start_token_id=vocab - 3)  # fmt: skip
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen2_5_VLForConditionalGeneration(cfg).to(dtype).eval()


def layouts(p: list[int], r: list[int], vocab: int, device):
    """(padded kwargs, packed kwargs, (N,) padded flat index of the valid tokens) of text rows."""
    g = torch.Generator().manual_seed(1)
    P, R = max(p), max(r)
    ids = torch.randint(0, vocab - 8, (len(p), P + R), generator=g)
    col = torch.arange(P + R)[None, :]
    attn = ((col >= (P - torch.tensor(p))[:, None]) & (col < (P + torch.tensor(r))[:, None])).long()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)  # the padded forward's positions of the valid tokens
    padded = {"input_ids": ids, "attention_mask": attn, "position_ids": pos[None].expand(3, -1, -1)}
    keep = attn.bool()
    text = torch.cat([torch.arange(a + b) for a, b in zip(p, r)])[None]
    rope = pos[keep][None].expand(3, -1)
    packed = {"input_ids": ids[keep][None], "position_ids": torch.cat([text, rope])[:, None]}  # (4, 1, T)
    to = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    return to(padded), to(packed), keep.flatten().nonzero().squeeze(-1).to(device)


@torch.no_grad()
def time_pair(model, p, r, device="cpu", repeats=3) -> dict:
    """Forward seconds of both layouts (best of `repeats`) and the max |difference| of the hidden
    states at the valid tokens."""
    lm = model.model.language_model
    padded, packed, flat = layouts(p, r, model.config.text_config.vocab_size, device)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)
    out, secs = {}, {}
    for name, kw in (("padded", padded), ("packed", packed)):
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            h = lm(**{"attention_mask": None, **kw}, use_cache=False).last_hidden_state
            sync()
            best = min(best, time.perf_counter() - t0)
        secs[name] = best
        out[name] = h.flatten(0, 1)[flat] if name == "padded" else h[0]
    return {
        "padded_s": secs["padded"],
        "packed_s": secs["packed"],
        "time_ratio": secs["packed"] / secs["padded"],
        "max_abs_diff": float((out["packed"].float() - out["padded"].float()).abs().max()),
    }


def measure(kinds=("tiny", "7b"), device="cpu", model=None) -> dict:
    model = model or small_model()
    res = {}
    for kind in kinds:
        p, r = lengths(kind)
        res[kind] = {**counts(p, r), **time_pair(model.to(device), p, r, device)}
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.case_packing", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    res = measure()
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "packing.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
