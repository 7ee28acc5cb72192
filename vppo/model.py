"""The model pieces DeepSpeed sees: the fused lm_head, the policy module, the guarded optimizer,
and how a policy is loaded and wrapped in a DeepSpeed engine."""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import deepspeed
import torch
from torch import nn
from transformers import AutoModelForImageTextToText

from vppo.config import Config, deepspeed_config, resolve_attn_impl
from vppo.distributed import all_reduce
from vppo.lora import apply_lora
from vppo.models import family_of
from vppo.packing import Packed, packed_hidden
from vppo.rollout import response_hidden


class FusedLMHead(nn.Linear):
    """The lm_head, which can also hand its weight to a fused function instead of building logits.

    `head(hidden)` is the plain linear layer that `generate` uses; `head(hidden, fn)` returns
    `fn(hidden, weight)` (the scoring pass and the loss of `vppo.loss`), so the [N, V] logits never
    exist. Called as a module either way, so ZeRO-3 gathers the weight for the call and routes its
    gradient (outside its own forward the partitioned weight is an empty tensor). State-dict keys
    are unchanged (lm_head.weight).
    """

    @classmethod
    def replace(cls, model: nn.Module) -> None:
        old = model.lm_head
        head = cls(old.in_features, old.out_features, bias=False, device="meta")
        head.weight = old.weight  # the same Parameter: tied embeddings stay tied
        model.lm_head = head

    def forward(self, hidden, fn: Callable | None = None):
        if fn is None:
            return super().forward(hidden)
        return fn(hidden, self.weight)


class Policy(nn.Module):
    """What DeepSpeed wraps: forward(inputs, prompt_len, fn) -> fn(response hidden states, weight);
    inputs a `vppo.rollout.model_inputs` dict ((b, R, H) hidden states) or a `vppo.packing.Packed`
    ((N, H) rows at the valid response positions)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, inputs: dict, prompt_len: int, fn: Callable):
        if isinstance(inputs, Packed):
            return self.hf.lm_head(packed_hidden(self.hf, inputs), fn)  # (N, H)
        hidden = response_hidden(self.hf, inputs, prompt_len)  # (b, R, H)
        return self.hf.lm_head(hidden, fn)


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that clips by the global gradient norm and skips a step whose norm is not finite.

    DeepSpeed (ZeRO 0-3, fp32 or bf16) calls step() with this rank's gradients: the full ones
    under ZeRO-0, a partition under ZeRO-1/2/3 (`partitioned=True`: the squared norms are summed
    over ranks). Clipping lives here, not in DeepSpeed, so the pre-clip norm is known and a
    non-finite one skips the step on every rank together, leaving weights and moments untouched.
    """

    def __init__(self, params, *, max_norm: float | None = None, partitioned: bool = False, **kw):
        super().__init__(params, **kw)
        self.max_norm, self.partitioned = max_norm, partitioned
        self.skipped, self.last_skipped, self.last_norm, self.last_lr = 0, False, float("nan"), float("nan")

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        sq = torch.zeros(1, dtype=torch.float64)
        for gr in grads:
            sq += gr.detach().double().pow(2).sum().cpu()
        if self.partitioned:
            sq = all_reduce(sq)
        norm = float(sq.sqrt())
        self.last_norm, self.last_lr = norm, self.param_groups[0]["lr"]
        self.last_skipped = not math.isfinite(norm)
        if self.last_skipped:
            self.skipped += 1
            for g in self.param_groups:
                for p in g["params"]:
                    p.grad = None
            return None
        if self.max_norm and norm > self.max_norm:
            for gr in grads:
                gr.mul_(self.max_norm / (norm + 1e-6))
        return super().step(closure)


def _tensors(x) -> list[torch.Tensor]:
    """Every tensor in a (nested) model output, tuple, list or dict."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    return [t for v in x for t in _tensors(v)] if isinstance(x, (list, tuple)) else []


def vision_in_every_pass(hf: nn.Module) -> None:
    """Make every forward of hf's base model run the vision tower first, on every rank, so that
    ranks whose batches differ in images still make the same collective calls:

    - a batch with images: their features are computed before the base model's forward (and handed
      to it as `mm_encoder_outputs`, which is what it would compute from `pixel_values` itself), so
      the tower runs before the embeddings on every path (generate's prefill, scoring, the update);
    - a batch without images (a text-only problem): the tower runs on the family's `dummy_image`
      and 0 x the sum of its outputs is added to the hidden states, which leaves them as they are
      and gives every vision parameter a gradient (zero).

    Without it, under DeepSpeed ZeRO-3 a rank without an image skips the tower's parameter gathers
    and under ZeRO-2 its gradient reductions, while the other ranks wait in them: the run fails or
    hangs. A decoding step after the prefill (a filled cache) runs no tower on any rank."""
    fam, base = family_of(hf), hf.model
    pending: list[torch.Tensor] = []

    def before(module, args, kwargs):
        if args or kwargs.get("pixel_values_videos") is not None:
            return None  # positional calls and videos: not a path of this project
        cache = kwargs.get("past_key_values")
        prefill = cache is None or cache.get_seq_length() == 0
        pix, enc = kwargs.get("pixel_values"), kwargs.get("mm_encoder_outputs")
        if pix is not None and not (enc or {}).get("image"):
            grid = kwargs["image_grid_thw"]
            feats = module.get_image_features(pix, grid, return_dict=True)
            kwargs = {**kwargs, "pixel_values": None, "mm_encoder_outputs": {**(enc or {}), "image": feats}}
        elif pix is None and not (enc or {}).get("image") and prefill:
            feats = module.get_image_features(*fam.dummy_image(hf), return_dict=True)
            pending.append(sum(t.float().sum() for t in _tensors(feats)) * 0.0)
        return args, kwargs

    def after(module, args, kwargs, out):
        if pending:
            zero = pending.pop()
            out.last_hidden_state = out.last_hidden_state + zero.to(out.last_hidden_state.dtype)
        return out

    base.register_forward_pre_hook(before, with_kwargs=True)
    base.register_forward_hook(after, with_kwargs=True)


def load_policy(cfg: Config) -> nn.Module:
    """The Hugging Face model of cfg.model (local files only), its lm_head a FusedLMHead; the
    family-specific pieces (Liger patch, vision tower) from its `vppo.models` family; with
    model.lora_rank > 0 PEFT's LoRA adapters injected in place, the only trainable parameters
    (`vppo.lora`)."""
    hf = AutoModelForImageTextToText.from_pretrained(
        cfg.model.path,
        dtype=getattr(torch, cfg.model.dtype),
        attn_implementation=resolve_attn_impl(cfg.model.attn_impl),
        local_files_only=True,
    )
    fam = family_of(hf)  # vppo.config.check_sources refused an unsupported model_type before this load
    if cfg.model.liger:
        fam.apply_liger(hf)
    if cfg.model.gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.lora_rank:  # adapters only: every base weight frozen, the vision tower's too
        apply_lora(hf, fam.vision_tower(hf), cfg.model, seed=cfg.train.seed)
    elif cfg.model.freeze_vision:
        for p in fam.vision_tower(hf).parameters():
            p.requires_grad_(False)
    FusedLMHead.replace(hf)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one process: left as it is (bitwise)
        vision_in_every_pass(hf)
    if torch.cuda.is_available():
        hf.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return hf


def build_engine(cfg: Config, hf: nn.Module, world: int):
    """The DeepSpeed engine around Policy(hf) with GuardedAdamW and the warm-up schedule;
    `engine.vppo_guard` is the optimizer (the last step's gradient norm, lr, and whether skipped)."""
    policy = Policy(hf)
    t = cfg.train
    params = [p for p in policy.parameters() if p.requires_grad]
    ds = deepspeed_config(cfg, world)
    ds["gradient_clipping"] = 0.0  # clipped by GuardedAdamW, which also skips non-finite norms
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    opt = GuardedAdamW(
        params,
        lr=t.lr,
        betas=tuple(t.betas),
        weight_decay=t.weight_decay,
        max_norm=t.grad_clip,
        partitioned=stage > 0,
    )
    # linear warm-up over train.warmup_steps optimizer steps, then constant (the released recipe
    # uses none); DeepSpeed steps the schedule at every optimizer step
    warm = max(t.warmup_steps, 0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warm) if warm else 1.0)
    engine, *_ = deepspeed.initialize(model=policy, optimizer=opt, lr_scheduler=sched, config=ds)
    engine.vppo_guard = opt
    return engine
