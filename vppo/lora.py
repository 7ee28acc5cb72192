"""LoRA through PEFT (model.lora_rank > 0): the base weights frozen, low-rank adapters trained.

    apply_lora(hf, cfg.model)          # adapters into the HF model in place (vppo.model.load_policy)
    with adapters_off(hf): ...         # the base model: the reference policy of algo.kl_coef > 0
    merged_state(hf)                   # {name: W + scale * B @ A} under the base model's names (export)
    merged_tensors(hf)                 # the same, one tensor at a time, ZeRO-3 gathered (vLLM push)
    adapter_state(hf)                  # the adapter tensors only; save_adapter writes PEFT's layout

PEFT injects its layers into the Hugging Face model itself (`peft.inject_adapter_in_model`), with no
PeftModel wrapper: the rest of the loop keeps seeing the same model (`hf.model`, `hf.lm_head`,
`vppo.model.Policy(hf)`), DeepSpeed wraps and partitions it as before, and the lm_head stays the
`vppo.model.FusedLMHead` whose weight the fused kernels read (config.py refuses it as a target).

Targets: the Linear layers of the language model whose leaf name is in model.lora_target_modules
(the same names in every vppo.models family), and with model.lora_vision every Linear layer of the
family's vision tower (its names differ per family: Qwen2.5-VL qkv / proj / gate_proj..., Qwen3-VL
qkv / proj / linear_fc1...). The adapter of W (out, in) is B (out, r) @ A (r, in) scaled by
alpha / r; B starts at zero, so step 0 is the base model.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from vppo.distributed import gathered

ADAPTER = "default"  # PEFT's adapter name; one adapter per model
ADAPTER_DIR = "adapter"  # export/adapter/: the trained adapter beside the merged model


def enabled(hf: nn.Module) -> bool:
    """Whether apply_lora gave hf adapters (without importing PEFT: the rollout engine asks too)."""
    return getattr(hf, "vppo_lora_config", None) is not None


def _layers(hf: nn.Module) -> dict[str, nn.Module]:
    """{module name: PEFT LoRA layer} of a model with adapters (empty without)."""
    if not enabled(hf):
        return {}
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in hf.named_modules() if isinstance(m, LoraLayer)}


def target_names(hf: nn.Module, vision: nn.Module, targets: list[str], with_vision: bool) -> list[str]:
    """Full module names that get adapters (see the module docstring); ValueError naming a target
    leaf name that matches no Linear layer of the language model."""
    in_vision = {id(m) for m in vision.modules()}
    names, seen = [], set()
    for name, m in hf.named_modules():
        if not isinstance(m, nn.Linear) or name == "lm_head":
            continue
        if id(m) in in_vision:
            if with_vision:
                names.append(name)
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf in targets:
            names.append(name)
            seen.add(leaf)
    missing = [t for t in targets if t not in seen]
    if missing:
        raise ValueError(
            f"model.lora_target_modules: {missing} match no Linear layer of the language model "
            f"(its Linear leaf names: {sorted({n.rsplit('.', 1)[-1] for n in names} | seen)})"
        )
    return names


def apply_lora(hf: nn.Module, vision: nn.Module, m, seed: int) -> nn.Module:
    """Inject LoRA adapters (m = cfg.model: lora_rank, lora_alpha, lora_dropout, lora_target_modules,
    lora_vision) into hf in place; every other parameter is frozen. `vision`: the family's vision
    tower (`vppo.models.Family.vision_tower`). A's random start comes from `seed` alone, so every rank
    (and a worker that never seeded torch) builds the same adapters. Returns hf."""
    from peft import LoraConfig, inject_adapter_in_model

    names = target_names(hf, vision, list(m.lora_target_modules), m.lora_vision)
    conf = LoraConfig(
        r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=names, bias="none"
    )
    with torch.random.fork_rng(devices=[]):  # the caller's RNG stream is left as it was
        torch.manual_seed(seed)
        inject_adapter_in_model(conf, hf, adapter_name=ADAPTER)
    for n, p in hf.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    hf.vppo_lora_config = conf  # a plain attribute (not a module): what save_adapter writes
    return hf


@contextlib.contextmanager
def adapters_off(hf: nn.Module):
    """The base model inside the block: every LoRA layer computes W x alone (no second model)."""
    layers = list(_layers(hf).values())
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield hf
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def adapter_state(hf: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors {name: tensor} (names as in hf.state_dict(), detached CPU copies)."""
    return {k: v.detach().cpu().clone() for k, v in hf.state_dict().items() if ".lora_" in k}


def _delta(layer) -> torch.Tensor:
    """scale * B @ A of one layer (out, in), in float32."""
    a = layer.lora_A[ADAPTER].weight.float()  # (r, in)
    b = layer.lora_B[ADAPTER].weight.float()  # (out, r)
    return layer.scaling[ADAPTER] * (b @ a)


def _base_name(key: str) -> str:
    return key.replace(".base_layer.", ".")


def merged_state(hf: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapted weight replaced by W + scale * B @ A (CPU
    copies, the base dtype): what from_pretrained loads as a plain model. Under ZeRO-3 call it inside
    `vppo.distributed.gathered(list(hf.parameters()))`."""
    layers = _layers(hf)
    out = {}
    for k, v in hf.state_dict().items():
        if ".lora_" in k:
            continue
        mod, _, leaf = k.rpartition(".base_layer.")
        if mod in layers and leaf == "weight":
            v = (v.float() + _delta(layers[mod])).to(v.dtype)
        out[_base_name(k)] = v.detach().cpu().clone()
    return out


@torch.no_grad()
def merged_tensors(hf: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every base parameter with the adapters merged in, under the base model's
    names, gathering one layer at a time under ZeRO-3 (the rollout engine's weight push)."""
    layers = _layers(hf)
    for name, p in hf.named_parameters():
        if ".lora_" in name:
            continue
        mod, _, leaf = name.rpartition(".base_layer.")
        layer = layers.get(mod) if leaf == "weight" else None
        group = [p] if layer is None else [p, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
        with gathered(group):
            t = p.data.detach()
            t = (t.float() + _delta(layer)).to(t.dtype) if layer is not None else t.clone()
        yield _base_name(name), t


def save_adapter(hf: nn.Module, out: Path, base: str | None) -> None:
    """PEFT's layout in `out`: adapter_config.json + adapter_model.safetensors (keys
    base_model.model.<module>.lora_A.weight), loadable by `peft.PeftModel.from_pretrained(base, out)`.
    Under ZeRO-3 call it inside gathered(...)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {
        f"base_model.model.{k.replace(f'.{ADAPTER}.', '.')}": v.contiguous()
        for k, v in adapter_state(hf).items()
    }
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    conf = hf.vppo_lora_config.to_dict()
    conf.update(base_model_name_or_path=base, target_modules=sorted(conf["target_modules"]))
    (out / "adapter_config.json").write_text(json.dumps(conf, indent=2, default=str, sort_keys=True))
