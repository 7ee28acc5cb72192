"""VPPO training loop: `python -m vppo.train [--config FILE] [key.sub=value ...]`.

With no arguments it trains the embedded tiny default on the CPU (building the tiny base model
and the synthetic set first when they are missing). GRPO, DAPO and VPPO are configurations of
this one loop (configs/*.yaml). One training step:

  1. sample a rollout batch of prompts (this rank's shard; each group of n stays on one rank)
     and generate n responses each (`vppo.rollout.generate`, vision special tokens suppressed);
  2. grade them with the boxed-answer grader (process pool, hard time limit per answer);
  3. online filtering (DAPO dynamic sampling), when on: drop groups whose mean accuracy is
     <= low or >= high and sample more prompts until the batch is full (bounded tries);
  4. VPPO only: the old policy's no-grad passes on the clean and the perturbed image feed
     `kernels.token_dependency_linear` on the response positions: old log-probs, exact KL, k3,
     entropy (GRPO / DAPO need only the clean pass and `kernels.token_logprobs_linear`);
  5. group advantages, trajectory shaping (TAS) and the top-k token mask (TGF) from vppo/;
  6. mini-batch / micro-batch updates through the fused loss (hidden states + lm_head weight:
     the step never holds [N, V] logits), DeepSpeed backward and step, gradient clipping; a
     non-finite gradient norm skips the optimizer step and is logged.

Departures from the paper / the released code (vppo.md):
  - The perturbed image is made on the processor's pixel_values (each row is one 14x14 cell of
    the resized image), so it keeps the clean image's grid exactly; the released code perturbs
    the PIL image before the processor, which is the same cells for patch blackening.
  - Mini-batches are taken in rollout order (groups contiguous), not shuffled.
  - "seq" loss averaging is normalised by the global number of sequences (the analogue of the
    released token normalisation); the paper does not specify a multi-GPU normalisation.
  - The entropy penalty can use the exact entropy (entropy_mode=exact), free from the kernel.
  - Sampling is seeded per (seed, step, rank), so a resumed run samples what the uninterrupted
    run would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import kernels
from vppo import objective
from vppo.checkpoint import CheckpointManager
from vppo.config import Config, batch_numbers, config_from_args, deepspeed_config, save_resolved
from vppo.loss import vppo_loss_linear
from vppo.rollout import GenSettings, Rollout, generate, model_inputs, response_hidden, zero3_partitioned

log = logging.getLogger("vppo.train")


# ---------------------------------------------------------------------------------------------
# The model pieces DeepSpeed sees.


class FusedLMHead(nn.Linear):
    """The lm_head, which can also return the VPPO loss of given labels without building logits.

    Called as a module, so ZeRO-3 gathers its weight for the call and routes its gradient
    (outside its own forward the partitioned weight is an empty tensor). Without labels it is
    the plain linear layer that `generate` uses. State-dict keys are unchanged (lm_head.weight).
    """

    @classmethod
    def replace(cls, model: nn.Module) -> None:
        old = model.lm_head
        head = cls(old.in_features, old.out_features, bias=False, device="meta")
        head.weight = old.weight  # the same Parameter: tied embeddings stay tied
        model.lm_head = head

    def forward(self, hidden, labels=None, **loss_kw):
        if labels is None:
            return super().forward(hidden)
        return vppo_loss_linear(hidden, self.weight, labels, **loss_kw)


class Policy(nn.Module):
    """What DeepSpeed wraps: forward(micro-batch) -> (loss, stats) through the fused loss."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, inputs: dict, prompt_len: int, labels, **loss_kw):
        hidden = response_hidden(self.hf, inputs, prompt_len)  # (b, R, H)
        return self.hf.lm_head(hidden, labels, **loss_kw)


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


# ---------------------------------------------------------------------------------------------
# Distributed helpers.


def init_distributed() -> tuple[int, int]:
    """(rank, world size); a single process gets a one-rank gloo group so the code is the same."""
    import deepspeed

    if "RANK" not in os.environ:
        import socket

        with socket.socket() as sock:  # a free loopback port for the one-rank group
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
    if not torch.cuda.is_available():
        # On CPU, DeepSpeed's comm backend JIT-compiles a shared-memory all-reduce op the first time a
        # process group is made (40-80 s on a fresh 2-core machine, every rank); gloo is enough here.
        # deepspeed.ops caches its compatibility table as one module-level dict, so the edit holds.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t
    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    t = t.clone()
    dist.all_reduce(t, op=ops[op])
    return t


# ---------------------------------------------------------------------------------------------
# Scoring: the old policy's no-grad passes.


@dataclass
class Scored:
    """Per-token statistics of a rollout from the old policy, [B, R] float32 each."""

    old_logp: torch.Tensor
    entropy: torch.Tensor
    kl: torch.Tensor | None = None
    k3: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None  # the frozen reference policy's, when algo.kl_coef > 0


def _gathered(params: list):
    """Context giving the full parameters (ZeRO-3 partitions them outside their module's forward)."""
    import contextlib

    if zero3_partitioned(params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return contextlib.nullcontext()


@torch.no_grad()
def score(
    hf, ro: Rollout, *, dependency: bool, micro: int, temperature: float, impl: str, ids, ref=None
) -> Scored:
    """Old log-probs of `ro` (with dependency=True also the clean-vs-perturbed token statistics
    from one read of the lm_head weight, and with a reference model its log-probs)."""
    b, r = ro.response_mask.shape
    out: dict[str, torch.Tensor] = {}
    for s in range(0, b, micro):
        part = ro.select(range(s, min(s + micro, b)))
        valid = part.response_mask
        inputs = model_inputs(part, vision_ids=ids.vision, pad_id=ids.pad)
        h = response_hidden(hf, inputs, ro.prompt_len)
        rows = valid.to(h.device)
        h, y = h[rows], part.responses.to(h.device)[rows]  # (N, H), (N,): response positions only
        with _gathered([hf.lm_head.weight]):
            w = hf.lm_head.weight
            if dependency:
                masked = model_inputs(part, masked=True, vision_ids=ids.vision, pad_id=ids.pad)
                hm = response_hidden(hf, masked, ro.prompt_len)[rows]
                st = kernels.token_dependency_linear(h, hm, w, y, temperature=temperature, impl=impl)
                vals = {"old_logp": st.logp_clean, "entropy": st.entropy, "kl": st.kl, "k3": st.k3}
            else:
                logp, ent = kernels.token_logprobs_linear(h, w, y, temperature=temperature, impl=impl)
                vals = {"old_logp": logp, "entropy": ent}
        if ref is not None:
            hr = response_hidden(ref, inputs, ro.prompt_len)[rows]
            vals["ref_logp"] = kernels.token_logprobs_linear(
                hr, ref.lm_head.weight, y, temperature=temperature, impl=impl
            )[0]
        for k, v in vals.items():
            out.setdefault(k, torch.zeros(b, r))[s : s + len(part)][valid] = v.float().cpu()
    return Scored(out["old_logp"], out["entropy"], out.get("kl"), out.get("k3"), out.get("ref_logp"))


# ---------------------------------------------------------------------------------------------
# The update.


@dataclass
class UpdateBatch:
    """What one rank's optimizer steps consume: a scored, shaped rollout."""

    ro: Rollout
    old_logp: torch.Tensor  # (B, R)
    advantages: torch.Tensor  # (B,) GRPO advantages (before shaping)
    dep_scores: torch.Tensor | None  # (B, R) token dependency (None: GRPO / DAPO)
    token_mask: torch.Tensor | None  # (B, R) TGF mask (None: every valid token)
    ref_logp: torch.Tensor | None = None  # (B, R) reference log-probs (algo.kl_coef > 0)


def loss_config(cfg: Config) -> objective.LossConfig:
    a = cfg.algo
    return objective.LossConfig(
        clip_low=a.clip_low,
        clip_high=a.clip_high,
        dual_clip=a.dual_clip,
        entropy_coef=a.entropy_coef,
        entropy_mode=a.entropy_mode,
        loss_agg=a.loss_agg,
        kl_coef=a.kl_coef,
    )


def shaped_advantages(cfg: Config, ub: UpdateBatch, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' = alpha * A, alpha) for the rows of one mini-batch (vppo.md section 3)."""
    adv = ub.advantages[rows]
    a = cfg.algo
    if ub.dep_scores is None or a.shaping == "none":
        return adv, torch.ones_like(adv)
    scores = objective.trajectory_scores(ub.dep_scores[rows], ub.ro.response_mask[rows])
    kw = {"b_min": a.b_min, "valid": ub.ro.response_mask[rows].any(-1)}
    if a.shaping == "released":
        kw["micro_batch_size"] = cfg.train.micro_batch
    elif a.shaping == "global":
        kw["reduce"] = all_reduce
    else:
        kw["b_max"] = a.b_max if a.b_max is not None else 1.0
        kw["reduce"] = all_reduce
    alpha = objective.trajectory_alphas(scores, a.shaping, **kw)
    return adv * alpha, alpha


def update(engine, cfg: Config, ub: UpdateBatch, world: int, ids) -> list[dict]:
    """ppo_epochs passes of optimizer steps over one rank's batch; returns per-step stats."""
    lcfg, micro = loss_config(cfg), cfg.train.micro_batch
    gas = engine.gradient_accumulation_steps()
    per_step = cfg.train.global_batch * cfg.rollout.n // world
    steps = []
    for _ in range(cfg.train.ppo_epochs):
        for m0 in range(0, len(ub.ro), per_step):
            rows = slice(m0, m0 + per_step)
            adv, alpha = shaped_advantages(cfg, ub, rows)
            rmask = ub.ro.response_mask[rows]
            # global normaliser of this optimizer step: tokens (or sequences) over all ranks
            unit = rmask.sum() if lcfg.loss_agg == "token" else rmask.any(-1).sum()
            total = float(all_reduce(unit.double().reshape(1))[0])
            agg, step_loss = [], 0.0
            for s in range(0, per_step, micro):
                idx = list(range(m0 + s, m0 + s + micro))
                part = ub.ro.select(idx)
                pm = part.response_mask
                here = pm.sum() if lcfg.loss_agg == "token" else pm.any(-1).sum()
                scale = float(here) * world / total if total > 0 else 0.0
                loss, stats = engine(
                    model_inputs(part, vision_ids=ids.vision, pad_id=ids.pad),
                    part.prompt_len,
                    part.responses,
                    old_logp=ub.old_logp[idx],
                    advantages=adv[s : s + micro],
                    token_mask=None if ub.token_mask is None else ub.token_mask[idx],
                    response_mask=pm,
                    ref_logp=None if ub.ref_logp is None else ub.ref_logp[idx],
                    cfg=lcfg,
                    temperature=cfg.rollout.temperature,
                    loss_scale=scale * gas,
                    impl=cfg.train.impl,
                )
                # DeepSpeed divides by the accumulation steps even with scale_wrt_gas=False (0.19's
                # output hook), so the loss carries a factor gas that its documented division removes:
                # the gradients sum to the global token mean whatever the micro-batch size
                engine.backward(loss)
                engine.step()
                step_loss += float(loss.detach()) / gas
                agg.append(stats)
            guard = engine.vppo_guard
            steps.append(
                {
                    **{k: sum(a[k] for a in agg) / len(agg) for k in agg[0]},
                    # the loss of the whole global mini-batch (the micro losses are pre-scaled)
                    "loss": float(all_reduce(torch.tensor([step_loss], dtype=torch.float64))[0]) / world,
                    "grad_norm": guard.last_norm,
                    "lr": guard.last_lr,
                    "skipped": guard.last_skipped,
                    "alpha_mean": float(alpha.mean()),
                }
            )
    return steps


# ---------------------------------------------------------------------------------------------
# Rollout with grading and online filtering.


@dataclass
class Ids:
    vision: list[int]
    pad: int
    eos: list[int]
    vision_start: int


@dataclass
class DataOrder:
    """A seeded permutation per epoch; `pos` counts prompts consumed (saved in checkpoints)."""

    n: int
    seed: int
    shuffle: bool
    pos: int = 0

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            epoch, i = divmod(self.pos, self.n)
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
                perm = torch.randperm(self.n, generator=g).tolist()
            else:
                perm = list(range(self.n))
            out.append(perm[i])
            self.pos += 1
        return out


@dataclass
class StepRollout:
    ro: Rollout
    rewards: torch.Tensor  # (B,)
    answers: list[str]
    tries: int
    kept_groups: int
    dropped_groups: int
    grader: dict = field(default_factory=dict)


def _cat_rollouts(parts: list[Rollout], pad_id: int) -> Rollout:
    """Concatenate rollouts of different prompt / response widths (re-padding both sides)."""
    if len(parts) == 1:
        return parts[0]
    p = max(r.prompt_len for r in parts)
    rr = max(r.response_mask.shape[1] for r in parts)

    def pad(r: Rollout, t, fill):
        left, right = p - r.prompt_len, rr - r.response_mask.shape[1]
        return torch.cat([t.new_full((len(r), left), fill), t, t.new_full((len(r), right), fill)], 1)

    g0 = 0
    groups = []
    for r in parts:
        groups.append(r.group + g0)
        g0 += int(r.group.max()) + 1 if len(r) else 0
    return Rollout(
        input_ids=torch.cat([pad(r, r.input_ids, pad_id) for r in parts]),
        attention_mask=torch.cat([pad(r, r.attention_mask, 0) for r in parts]),
        mm_token_type_ids=torch.cat([pad(r, r.mm_token_type_ids, 0) for r in parts]),
        prompt_len=p,
        response_mask=torch.cat(
            [
                torch.cat(
                    [r.response_mask, r.response_mask.new_zeros(len(r), rr - r.response_mask.shape[1])], 1
                )
                for r in parts
            ]
        ),
        pixel_values=[x for r in parts for x in r.pixel_values],
        image_grid_thw=[x for r in parts for x in r.image_grid_thw],
        group=torch.cat(groups),
        texts=[t for r in parts for t in r.texts],
    )


def sample_rollout(
    hf, processor, problems, order: DataOrder, cfg: Config, grader, ids: Ids, rank: int, world: int, step: int
) -> StepRollout:
    """This rank's rollout batch, graded, online-filtered when enabled."""
    from vppo.data import encode_prompts

    r = cfg.rollout
    quota = r.rollout_batch_size // world
    gen = GenSettings(r.temperature, r.top_p, r.top_k, r.max_response_len)
    kept: list[Rollout] = []
    kept_rewards, kept_answers = [], []
    have, tries, dropped, stats = 0, 0, 0, {}
    while have < quota:
        if tries >= (r.filter_max_tries if r.online_filter else 1):
            raise RuntimeError(
                f"online filtering kept {have} of {quota} prompts after rollout.filter_max_tries="
                f"{r.filter_max_tries} rounds (groups with mean accuracy <= {r.filter_low} or >= "
                f"{r.filter_high} are dropped): the policy solves nearly all or none of the prompts; raise "
                "rollout.filter_max_tries, widen filter_low / filter_high, or turn rollout.online_filter off"
            )
        # every rank draws the same global indices and takes its own shard of them
        idx = order.take(quota * world)[rank::world]
        probs = [problems[i] for i in idx]
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * 1009 + tries * 101 + rank)
        ro = generate(
            hf,
            encode_prompts(probs, processor, cfg.data.prompt_suffix),
            r.n,
            gen,
            eos_ids=ids.eos,
            pad_id=ids.pad,
            suppress_ids=ids.vision,
            vision_start_id=ids.vision_start,
            tokenizer=processor.tokenizer,
        )
        answers = [probs[int(g)].answer for g in ro.group]
        scores, gstats = grader.grade(ro.texts, answers)
        for k, v in gstats.as_dict().items():
            if isinstance(v, (int, float)):
                stats[k] = stats.get(k, 0) + v
        rewards = torch.tensor(scores, dtype=torch.float32)
        keep_rows = list(range(len(ro)))
        if r.online_filter:
            acc = rewards.view(-1, r.n).mean(-1)
            good = ((acc > r.filter_low) & (acc < r.filter_high)).nonzero().squeeze(-1).tolist()
            good = good[: quota - have]
            dropped += len(probs) - len(good)
            keep_rows = [g * r.n + j for g in good for j in range(r.n)]
        if keep_rows:
            kept.append(ro.select(keep_rows))
            kept_rewards.append(rewards[keep_rows])
            kept_answers += [answers[i] for i in keep_rows]
            have += len(keep_rows) // r.n
        tries += 1
    ro = _cat_rollouts(kept, ids.pad)
    ro.group = torch.arange(len(ro)) // r.n
    return StepRollout(ro, torch.cat(kept_rewards), kept_answers, tries, have, dropped, stats)


# ---------------------------------------------------------------------------------------------
# Logging.


class Metrics:
    """metrics.jsonl (+ TensorBoard, + a PNG of the main curves) on rank 0."""

    CURVES = ("reward", "val_accuracy", "response_len", "kept_frac", "alpha_mean", "entropy", "grad_norm")

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.dir, self.enabled = run_dir, enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception as e:  # tensorboard missing or broken: keep the JSON log
                log.warning("TensorBoard disabled: %s", e)

    def history(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().splitlines()
        out = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError as e:
                if i == len(lines):  # a write cut short by a crash: the step is redone on resume
                    log.warning("%s: dropping the torn last line %d (%s)", self.path, i, e)
                    break
                raise ValueError(f"{self.path}: line {i} is not valid JSON ({e})") from e
        return out

    def truncate(self, step: int) -> None:
        """Drop records after `step` (they belong to work a resumed run redoes)."""
        if self.enabled and self.path.exists():
            keep = [r for r in self.history() if r.get("step", 0) <= step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.tb.add_scalar(k, v, rec["step"])
            self.tb.flush()

    def plot(self) -> None:
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        hist = self.history()
        keys = [k for k in self.CURVES if any(k in r for r in hist)]
        if not keys:
            return
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
        for ax, k in zip(axes if len(keys) > 1 else [axes], keys):
            pts = [(r["step"], r[k]) for r in hist if k in r]
            ax.plot(*zip(*pts), marker="." if k == "val_accuracy" else None)
            ax.set_title(k)
            ax.set_xlabel("step")
        fig.tight_layout()
        tmp = self.dir / "curves.tmp.png"
        fig.savefig(tmp, dpi=80)
        plt.close(fig)
        os.replace(tmp, self.dir / "curves.png")


# ---------------------------------------------------------------------------------------------
# Set-up.


def resolve_defaults(cfg: Config) -> None:
    """Fill model.path / data.train / data.val with the tiny base and the synthetic set."""
    if cfg.model.path is None or cfg.data.train is None or cfg.data.val is None:
        from vppo.synth import ensure_synth_data
        from vppo.tiny import ensure_tiny_model

        synth = ensure_synth_data()
        if cfg.model.path is None:
            cfg.model.path = str(ensure_tiny_model())
        if cfg.data.train is None:
            cfg.data.train = str(synth / "train.parquet")
        if cfg.data.val is None:
            cfg.data.val = str(synth / "val.parquet")


def load_policy(cfg: Config):
    from transformers import AutoModelForImageTextToText

    from vppo.config import resolve_attn_impl

    dtype = getattr(torch, cfg.model.dtype)
    hf = AutoModelForImageTextToText.from_pretrained(
        cfg.model.path,
        dtype=dtype,
        attn_implementation=resolve_attn_impl(cfg.model.attn_impl),
        local_files_only=True,
    )
    if cfg.model.liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl

        apply_liger_kernel_to_qwen2_5_vl(model=hf, fused_linear_cross_entropy=False, cross_entropy=False)
    if cfg.model.gradient_checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.model.freeze_vision:
        for p in hf.model.visual.parameters():
            p.requires_grad_(False)
    FusedLMHead.replace(hf)
    if torch.cuda.is_available():
        hf.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return hf


def build_engine(cfg: Config, hf, world: int):
    import deepspeed

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
    engine.vppo_guard = opt  # the step's gradient norm and whether it was skipped
    return engine


def export_hf(engine, processor, out: Path, rank: int, suffix: str | None) -> None:
    """The policy in Hugging Face format (gathers ZeRO-3 shards), written atomically by rank 0, with
    the prompt suffix it was trained on (vppo.data.PROMPT_FILE, read by vppo.eval)."""
    import shutil

    from vppo.data import save_prompt_suffix

    hf = engine.module.hf
    with _gathered(list(hf.parameters())):
        if rank == 0:
            from vppo.eval import eos_ids_of

            tmp = out.with_name(out.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            # generate() of the export stops where training's rollouts stopped (the tokenizer's and
            # the chat template's EOS too, not only the base generation config's)
            hf.generation_config.eos_token_id = eos_ids_of(hf, processor.tokenizer)
            state = {k: v.detach().cpu().clone() for k, v in hf.state_dict().items()}
            hf.save_pretrained(tmp, state_dict=state)
            processor.save_pretrained(tmp)
            save_prompt_suffix(tmp, suffix)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
    if dist.is_initialized():
        dist.barrier()


# ---------------------------------------------------------------------------------------------
# The loop.


@dataclass
class Run:
    """Everything a training run holds between steps."""

    cfg: Config
    rank: int
    world: int
    processor: object
    train_set: object
    val_problems: list | None
    hf: nn.Module
    engine: object
    ids: Ids
    order: DataOrder
    grader: object
    ckpt: CheckpointManager
    metrics: Metrics
    timer: object
    total_steps: int
    start: int = 0
    ref: nn.Module | None = None  # frozen reference policy (algo.kl_coef > 0)


def setup(cfg: Config) -> Run:
    """Distributed init, data, model, DeepSpeed engine, and the resume point."""
    from vppo import data as vdata
    from vppo.config import format_derived
    from vppo.eval import eos_ids_of
    from vppo.reward import Grader
    from vppo.watchdog import PhaseTimer

    rank, world = init_distributed()
    batch_numbers(cfg, world)  # sizes that do not divide fail before anything is loaded
    resolve_defaults(cfg)
    run_dir = Path(cfg.run.output_dir)
    if rank == 0:
        save_resolved(cfg, run_dir)
    torch.manual_seed(cfg.train.seed)

    d = cfg.data
    processor = vdata.load_processor(cfg.model.path, d.min_pixels, d.max_pixels)
    if (Path(cfg.model.path) / vdata.PROMPT_FILE).is_file():
        learned = vdata.load_prompt_suffix(cfg.model.path)
        if learned != d.prompt_suffix and rank == 0:
            log.warning(
                "data.prompt_suffix=%r differs from the suffix %s was trained with (%r, in %s)",
                d.prompt_suffix, cfg.model.path, learned, vdata.PROMPT_FILE,
            )  # fmt: skip

    def load(src, split):
        return vdata.load_problems(
            src, split, problem_key=d.problem_key, answer_key=d.answer_key, image_key=d.image_key,
            image_dir=d.image_dir, processor=processor, max_prompt_length=d.max_prompt_len,
            suffix=d.prompt_suffix, strict=d.strict,
        )  # fmt: skip

    train_set = load(d.train, "train")
    val_problems = list(load(d.val, "val"))[: cfg.run.val_samples or None] if cfg.run.val_every else None
    dv = batch_numbers(cfg, world, len(train_set))
    if rank == 0:
        st = train_set.stats
        print(format_derived(dv, cfg), flush=True)
        print(
            f"train problems: {len(train_set)} (dropped: {st.broken} broken, {st.overlong} longer than "
            f"data.max_prompt_len={d.max_prompt_len} tokens after image expansion)",
            flush=True,
        )

    hf = load_policy(cfg)
    engine = build_engine(cfg, hf, world)
    ref = None
    if cfg.algo.kl_coef > 0:  # a frozen copy of the initial policy, never wrapped by DeepSpeed
        ref = load_policy(cfg).eval().requires_grad_(False)
    tok = processor.tokenizer
    eos = eos_ids_of(hf, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    ids = Ids(vdata.vision_token_ids(processor), pad, eos, tok.convert_tokens_to_ids("<|vision_start|>"))
    sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    run = Run(
        cfg, rank, world, processor, train_set, val_problems, hf, engine, ids,
        order=DataOrder(len(train_set), cfg.train.seed, d.shuffle),
        grader=Grader(),
        ckpt=CheckpointManager(run_dir, cfg.run.keep_last, rank=rank, world_size=world),
        metrics=Metrics(run_dir, rank == 0, cfg.run.tensorboard),
        timer=PhaseTimer(watchdog_seconds=cfg.run.watchdog_seconds or None, nvtx=cfg.run.nvtx, sync=sync),
        total_steps=dv.total_steps,
        ref=ref,
    )  # fmt: skip
    resume = run.ckpt.resolve_resume(cfg.run.resume)
    if resume is not None:
        state = run.ckpt.load(resume, engine=engine)
        run.start, run.order.pos = state["step"], state["data_pos"]
        run.metrics.truncate(run.start)
        if rank == 0:
            print(f"resumed from {resume} at step {run.start}", flush=True)
    return run


def validate(run: Run) -> dict:
    """avg@val_n on the validation problems, through the evaluation's own code."""
    from vppo.eval import evaluate_problems

    r = run.cfg.rollout
    run.hf.eval()
    res = evaluate_problems(
        run.hf,
        run.processor,
        run.val_problems,
        samples=r.val_n,
        gen=GenSettings(r.val_temperature, r.val_top_p, r.val_top_k, r.max_response_len),
        seed=run.cfg.train.seed,
        benchmark="val",
        batch_size=max(1, run.cfg.train.logprob_micro_batch // r.val_n),
        suffix=run.cfg.data.prompt_suffix,
    )
    return {"val_accuracy": res.accuracy, "val_stderr": res.stderr}


def prepare(run: Run, step: int) -> tuple[StepRollout, Scored, UpdateBatch]:
    """Phases 1-5 of a step: sample, grade, filter, score (clean and perturbed), advantages, mask."""
    from vppo.perturb import PerturbSpec, perturb_pixel_values, trajectory_seed

    cfg, timer = run.cfg, run.timer
    vppo_on = cfg.algo.name == "vppo"
    run.hf.eval()
    with timer.phase("generate"):
        sr = sample_rollout(
            run.hf,
            run.processor,
            run.train_set,
            run.order,
            cfg,
            run.grader,
            run.ids,
            run.rank,
            run.world,
            step,
        )
    ro = sr.ro
    if vppo_on:
        with timer.phase("perturb"):
            spec = PerturbSpec.from_config(cfg.algo)
            seeds = lambda i, g: [
                trajectory_seed(cfg.train.seed, step, run.rank, i, j) for j in range(len(g))
            ]  # noqa: E731
            ro.masked_pixel_values = [
                perturb_pixel_values(p, g, spec, seeds(i, g), run.processor.image_processor) if len(g) else p
                for i, (p, g) in enumerate(zip(ro.pixel_values, ro.image_grid_thw))
            ]
    with timer.phase("score"):
        sc = score(
            run.hf, ro, dependency=vppo_on, micro=cfg.train.logprob_micro_batch,
            temperature=cfg.rollout.temperature, impl=cfg.train.impl, ids=run.ids, ref=run.ref,
        )  # fmt: skip
    adv = objective.group_advantages(sr.rewards, cfg.rollout.n, eps=cfg.algo.adv_eps)
    dep = token_mask = None
    if vppo_on:
        dep = objective.dependency_scores(sc, cfg.algo.dependency)
        if cfg.algo.topk_ratio < 1.0:
            token_mask = kernels.topk_token_mask(
                dep, ro.response_mask, cfg.algo.topk_ratio, impl=cfg.train.impl
            )
    return sr, sc, UpdateBatch(ro, sc.old_logp, adv, dep, token_mask, sc.ref_logp)


def train_step(run: Run, step: int) -> dict:
    """One training step; returns its metrics record."""
    t0 = time.perf_counter()
    sr, sc, ub = prepare(run, step)
    run.hf.train()
    with run.timer.phase("update"):
        steps = update(run.engine, run.cfg, ub, run.world, run.ids)
    dt = time.perf_counter() - t0
    valid = ub.ro.response_mask
    rec = {
        "step": step,
        "reward": float(all_reduce(sr.rewards.sum().reshape(1))[0]) / (len(sr.rewards) * run.world),
        "response_len": float(valid.sum(-1).float().mean()),
        "entropy": float(sc.entropy[valid].mean()),
        "kept_frac": float(ub.token_mask[valid].float().mean()) if ub.token_mask is not None else 1.0,
        "tries": sr.tries,
        "dropped_groups": sr.dropped_groups,
        "skipped_steps": sum(s["skipped"] for s in steps),
        "grader_timeouts": sr.grader.get("grader/timeouts", 0),
        "grader_errors": sr.grader.get("grader/errors", 0) + sr.grader.get("grader/crashes", 0),
        "step_seconds": dt,
        "tokens_per_second": float(valid.sum()) * run.world / dt,
        **{f"time_{k}": v for k, v in run.timer.last().items()},
    }
    if ub.dep_scores is not None:
        rec["dep_mean"] = float(ub.dep_scores[valid].mean())
        rec["dep_max"] = float(ub.dep_scores[valid].max())
        rec["kl_mean"] = float(sc.kl[valid].mean())
    for k in steps[0]:
        if k != "skipped":
            rec[k] = sum(s[k] for s in steps) / len(steps)
    if rec["skipped_steps"] and run.rank == 0:
        log.warning(
            "step %d: non-finite gradient norm, %d optimizer step(s) skipped", step, rec["skipped_steps"]
        )
    return rec


def train(cfg: Config) -> dict:
    """The whole run; returns the last step's metrics."""
    from tqdm import tqdm

    run = setup(cfg)
    cfg, rank = run.cfg, run.rank
    val_on = bool(cfg.run.val_every and run.val_problems)
    # under ZeRO-3 every forward gathers the weights from all ranks: all ranks validate (rank 0 logs)
    val_here = rank == 0 or zero3_partitioned(run.hf.parameters())
    if val_here and run.start == 0 and val_on:
        rec = {"step": 0, **validate(run)}
        run.metrics.log(rec)
        if rank == 0:
            print(f"step 0: val accuracy {rec['val_accuracy']:.3f} +- {rec['val_stderr']:.3f}", flush=True)
    last: dict = {}
    bar = tqdm(total=run.total_steps, initial=run.start, desc="train", disable=rank != 0, dynamic_ncols=True)
    for step in range(run.start + 1, run.total_steps + 1):
        rec = train_step(run, step)
        if val_on and step % cfg.run.val_every == 0 and val_here:
            with run.timer.phase("validate"):
                rec.update(validate(run))
        if dist.is_initialized():
            dist.barrier()
        run.metrics.log(rec)
        last = rec
        bar.update(1)
        post = {"reward": f"{rec['reward']:.3f}"}
        if "val_accuracy" in rec:
            post["val"] = f"{rec['val_accuracy']:.3f}"
        bar.set_postfix(post)
        if step % cfg.run.plot_every == 0 or step == run.total_steps:  # a redraw costs ~0.5 s on a CPU
            run.metrics.plot()
        if (cfg.run.save_every and step % cfg.run.save_every == 0) or step == run.total_steps:
            with run.timer.phase("checkpoint"):
                run.ckpt.save(step, engine=run.engine, state={"step": step, "data_pos": run.order.pos})
    bar.close()
    run.grader.close()
    run.timer.close()
    if cfg.run.export_hf:
        export_hf(
            run.engine, run.processor, Path(cfg.run.output_dir) / "export", rank, cfg.data.prompt_suffix
        )
    return last


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config_from_args(argv, prog="python -m vppo.train", description=__doc__.split("\n\n")[0])
    last = train(cfg)
    if last and (not dist.is_initialized() or dist.get_rank() == 0):
        print(json.dumps(last), flush=True)
    if dist.is_initialized():  # leave together: a rank exiting mid-collective aborts the others
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
