"""Case lora: full-weight vs LoRA training state, computed at the 7B / 8B shapes and measured on the
tiny base.

Not a kernel case (CASES is empty); it runs on its own:

    python -m bench.case_lora [--out DIR] [--rank 8]     # a table, DIR/lora.json

For Qwen2.5-VL-7B and Qwen3-VL-8B (built on the meta device from their published config.json sizes,
so no weights are read: 8.29 B and 8.77 B parameters) it counts, for full training and for LoRA of
rank r on the default targets (vppo.lora: the language model's attention and MLP projections, the
vision tower frozen): trainable parameters, and the bytes of what training holds, under the
mixed-precision layout of the 7B configs (bf16 weights and gradients, fp32 master copy and AdamW's two
fp32 moments for each trainable parameter: 2 + 2 + 4 + 8 bytes per trainable parameter, 2 per frozen
one). Then an ESTIMATE of what fits on one 80 GB GPU: the rollout engine takes
rollout.gpu_memory_utilization (0.5) of it, the weights and optimizer state come off the rest, and
what is left bounds the tokens of one micro-batch under gradient checkpointing (each layer keeps its
bf16 input, 2 h bytes a token, and the layer being recomputed holds about (12 h + 3 i) x 2 bytes a
token: q, k, v, o, two norms, the MLP's three intermediates; the fused lm_head adds no [N, V]
logits). The estimate leaves out the CUDA context, allocator fragmentation and the vision tower's
activations (a few GB together), so treat its token counts as upper bounds.

On the tiny base (bases/tiny) it measures the same quantities on a real model: trainable parameters,
gradient bytes after one backward, AdamW state bytes after one step (torch's own tensors).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

CASES: list = []  # not a kernel case: see the module docstring

GPU_BYTES = 80e9
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # vppo.config default
SHAPES = {  # the published config.json sizes (text, vision) of each model
    "Qwen2.5-VL-7B": (
        "Qwen2_5_VL",
        dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
             intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
        dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
             patch_size=14, spatial_merge_size=2, fullatt_block_indexes=[7, 15, 23, 31], window_size=112),
    ),
    "Qwen3-VL-8B": (
        "Qwen3VL",
        dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
             head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False),
        dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
             patch_size=16, spatial_merge_size=2, deepstack_visual_indexes=[8, 16, 24]),
    ),
}  # fmt: skip
# the released sequence lengths: max prompt + max response of each recipe (configs/vppo_7b.yaml, vppo_8b.yaml)
SEQ = {"Qwen2.5-VL-7B": 4096 + 2048, "Qwen3-VL-8B": 4096 + 8192}


def meta_model(name: str) -> nn.Module:
    import transformers

    prefix, text, vision = SHAPES[name]
    cfg = getattr(transformers, f"{prefix}Config")(
        text_config=text, vision_config=vision, tie_word_embeddings=False
    )
    with torch.device("meta"):
        return getattr(transformers, f"{prefix}ForConditionalGeneration")(cfg)


def lora_params(model: nn.Module, rank: int) -> int:
    """r * (in + out) for every targeted Linear of the language model (not the vision tower, not lm_head)."""
    n = 0
    for name, mod in model.named_modules():
        if (
            isinstance(mod, nn.Linear)
            and name.rsplit(".", 1)[-1] in TARGETS
            and ".visual." not in f".{name}."
        ):
            n += rank * (mod.in_features + mod.out_features)
    return n


def state_bytes(total: int, trainable: int, frozen_base: bool) -> dict[str, float]:
    """Bytes of weights, gradients and optimizer state (bf16 weights / grads, fp32 master + 2 moments)."""
    weights = 2 * total + (2 * trainable if frozen_base else 0)  # LoRA: the adapters on top of the base
    return {"weights": weights, "grads": 2 * trainable, "optimizer": (4 + 8) * trainable}


def fit_estimate(name: str, model: nn.Module, states: dict[str, float], util: float = 0.5) -> dict:
    t = model.config.get_text_config()
    h, i, layers = t.hidden_size, t.intermediate_size, t.num_hidden_layers
    per_token = 2 * h * layers + (12 * h + 3 * i) * 2  # checkpointed layer inputs + one recomputed layer
    left = GPU_BYTES * (1 - util) - sum(states.values())
    return {
        "trainer_share_bytes": GPU_BYTES * (1 - util),
        "left_for_activations_bytes": left,
        "activation_bytes_per_token": per_token,
        "max_micro_tokens": max(0, int(left // per_token)),
        "released_sequence": SEQ[name],
    }


def computed(rank: int) -> dict:
    out = {}
    for name in SHAPES:
        m = meta_model(name)
        total = sum(p.numel() for p in m.parameters())
        lora = lora_params(m, rank)
        rows = {}
        for mode, trainable, frozen in (("full", total, False), (f"lora r={rank}", lora, True)):
            st = state_bytes(total, trainable, frozen)
            rows[mode] = {"params": total, "trainable": trainable, **st, "fit": fit_estimate(name, m, st)}
        out[name] = rows
    return out


def measured(rank: int) -> dict:
    """Trainable parameters, gradient and AdamW-state bytes of one real step on the tiny base (a
    text-only batch, so the vision tower gets no gradient and no optimizer state in full training)."""
    from types import SimpleNamespace

    from transformers import AutoModelForImageTextToText

    from vppo.bases import shipped_base
    from vppo.lora import apply_lora
    from vppo.models import family_of

    out = {}
    for mode in ("full", f"lora r={rank}"):
        hf = AutoModelForImageTextToText.from_pretrained(shipped_base("default"), dtype=torch.float32)
        if mode != "full":
            m = SimpleNamespace(lora_rank=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                lora_target_modules=list(TARGETS), lora_vision=False)  # fmt: skip
            apply_lora(hf, family_of(hf).vision_tower(hf), m, seed=0)
        params = [p for p in hf.parameters() if p.requires_grad]
        ids = torch.randint(0, hf.config.get_text_config().vocab_size, (2, 16))
        hf(input_ids=ids).logits.float().pow(2).mean().backward()
        opt = torch.optim.AdamW(params, lr=1e-4)
        opt.step()
        state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
        out[mode] = {
            "params": sum(p.numel() for p in hf.parameters()),
            "trainable": sum(p.numel() for p in params),
            "grad_bytes": sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None),
            "optimizer_bytes": state,
        }
    return out


def table(res: dict) -> str:
    gb = lambda b: f"{b / 1e9:.1f}"  # noqa: E731
    cols = (
        "model",
        "mode",
        "trainable",
        "weights GB",
        "grads GB",
        "optimizer GB",
        "left of 40 GB",
        "max tokens a micro",
    )
    head = "| " + " | ".join(cols) + " |"
    lines = [head, "|---|---|---|---|---|---|---|---|"]
    for name, rows in res["computed"].items():
        for mode, r in rows.items():
            f = r["fit"]
            share = 100 * r["trainable"] / r["params"]
            lines.append(
                f"| {name} | {mode} | {r['trainable'] / 1e6:,.1f} M ({share:.2f} %) | {gb(r['weights'])} "
                f"| {gb(r['grads'])} | {gb(r['optimizer'])} | {gb(f['left_for_activations_bytes'])} "
                f"| {f['max_micro_tokens']:,} (a released row: {f['released_sequence']:,}) |"
            )
    lines += [
        "",
        "| tiny base (measured) | trainable | grad bytes | AdamW state bytes |",
        "|---|---|---|---|",
    ]
    for mode, r in res["measured"].items():
        cells = [
            mode,
            f"{r['trainable']:,} of {r['params']:,}",
            f"{r['grad_bytes']:,}",
            f"{r['optimizer_bytes']:,}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="write DIR/lora.json")
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args(argv)
    res = {"rank": args.rank, "computed": computed(args.rank), "measured": measured(args.rank)}
    print(table(res))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "lora.json").write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
