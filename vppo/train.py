"""VPPO training loop: `python -m vppo.train [--config FILE] [key.sub=value ...]`.

With no arguments it trains the embedded tiny default on the CPU (building the tiny base model
and the synthetic set first when they are missing). GRPO, DAPO and VPPO are configurations of
this one loop (configs/*.yaml). One training step carries one `vppo.trajectory.Trajectory`:

  1. sample this rank's prompts (each group of n stays on one rank), n responses each with the
     vision special tokens suppressed, graded by the boxed-answer grader; with online filtering
     (DAPO dynamic sampling) groups of mean accuracy <= low or >= high are dropped and more
     prompts sampled until the batch is full (`vppo.sampling`);
  2. VPPO only: perturb each response's image (`vppo.perturb`);
  3. the old policy's no-grad passes (`vppo.loss.score`): old log-probs and entropy from the clean
     pass; for VPPO also the exact KL and k3 between the clean and the perturbed pass, from one
     read of the lm_head weight; reference log-probs when algo.kl_coef > 0 (with LoRA, model.lora_rank
     > 0: the same model with its adapters off, `vppo.lora`);
  4. group advantages and, for VPPO, the top-k token mask (TGF) (`vppo.objective`, `vppo.loss`);
  5. mini-batch / micro-batch updates: trajectory shaping (TAS) per mini-batch, the fused loss
     from hidden states and the lm_head weight (the step never holds [N, V] logits), DeepSpeed
     backward and step, gradient clipping; a non-finite gradient norm skips the optimizer step
     and is logged.

Departures from the paper / the released code (docs/algorithm.md lists them all):
  - The perturbed image is made on the processor's pixel_values (each row is one 14x14 cell of
    the resized image), so it keeps the clean image's grid exactly; the released code perturbs
    the PIL image before the processor, with cells that line up with the vision patches only
    when the image is already a multiple of 28 pixels on each side.
  - Mini-batches are taken in rollout order (groups contiguous), not shuffled; train.balance_batch
    re-partitions rows across ranks by length (rollout: the whole batch first, as released).
  - "seq" loss averaging is normalised by the global number of sequences (the analogue of the
    released token normalisation); the paper does not specify a multi-GPU normalisation.
  - The entropy penalty can use the exact entropy (entropy_mode=exact), free from the kernel.
  - Sampling is seeded per (seed, step, rank), so a resumed run samples what the uninterrupted
    run would have.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from deepspeed import DeepSpeedEngine
from torch import nn
from tqdm import tqdm
from transformers import ProcessorMixin

from vppo import bases, distributed, lora, loss, objective, packing, spotlight
from vppo import data as vdata
from vppo.checkpoint import CheckpointManager, RunFolderError, apply_optimizer_config, open_run
from vppo.config import (
    Config,
    batch_numbers,
    check_engine,
    check_loggers,
    config_from_args,
    format_derived,
    to_yaml,
)  # fmt: skip
from vppo.distributed import all_reduce, barrier, init_distributed, is_main, zero3_partitioned
from vppo.evaluate import evaluate_problems
from vppo.export import export_hf
from vppo.metrics import Metrics
from vppo.model import build_engine, load_policy
from vppo.perturb import PerturbSpec, perturb_pixel_values, trajectory_seed
from vppo.reward import Grader
from vppo.rollout import GenSettings
from vppo.sampling import DataOrder, SampleInfo, mismatch_stats, sample_batch, sampling_engine
from vppo.tokens import TokenIds, token_ids
from vppo.trajectory import Trajectory
from vppo.watchdog import PhaseTimer

log = logging.getLogger("vppo.train")


@dataclass
class Run:
    """Everything a training run holds between steps, fixed at set-up but for `order`."""

    cfg: Config
    rank: int
    world: int
    processor: ProcessorMixin  # the Hugging Face processor of cfg.model.path
    train_set: vdata.ProblemSet
    val_problems: list[vdata.Problem] | None
    spot_problems: list[vdata.Problem]  # run.spotlight_problems: val problems with known visual tokens
    hf: nn.Module
    engine: DeepSpeedEngine  # around vppo.model.Policy(hf)
    ref: nn.Module | None  # frozen reference policy (algo.kl_coef > 0; None with LoRA: hf, adapters off)
    ids: TokenIds
    gen: GenSettings  # rollout sampling
    opts: loss.LossOptions  # the objective, temperature and kernel impl of every pass
    order: DataOrder
    grader: Grader
    ckpt: CheckpointManager
    metrics: Metrics
    timer: PhaseTimer
    total_steps: int
    start: int = 0
    sampler: object = None  # rollout.engine=vllm: the colocated vppo.vllm_engine.VLLMEngine


def setup(cfg: Config) -> Run:
    """Distributed init, data, model, DeepSpeed engine, and the resume point."""
    rank, world = init_distributed()
    batch_numbers(cfg, world)  # sizes that do not divide fail before anything is loaded
    check_loggers(cfg)  # and so does a tracker package (run.loggers) that does not import
    check_engine(cfg)  # vllm installed, tensor parallel size fits the heads
    start = open_run(
        cfg, rank, bases.resolve_defaults
    )  # never mixes two runs in one folder; writes config.yaml
    run_dir = Path(cfg.run.output_dir)
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
    load = partial(
        vdata.load_problems, format=d.format, problem_key=d.problem_key, answer_key=d.answer_key,
        image_key=d.image_key, image_dir=d.image_dir, processor=processor, max_prompt_length=d.max_prompt_len,
        suffix=d.prompt_suffix, strict=d.strict,
    )  # fmt: skip
    train_set = load(d.train, "train")
    val_problems = list(load(d.val, "val"))[: cfg.run.val_samples or None] if cfg.run.val_every else None
    spot = spotlight.validation_problems(val_problems or [], cfg.run.spotlight_problems, f"data.val={d.val}")
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
    lora_on = cfg.model.lora_rank > 0
    # a frozen copy of the initial policy, never wrapped by DeepSpeed; with LoRA none: the reference
    # is the same model with its adapters off (prepare)
    ref = load_policy(cfg).eval().requires_grad_(False) if cfg.algo.kl_coef > 0 and not lora_on else None
    r = cfg.rollout
    sync = torch.cuda.synchronize if torch.cuda.is_available() else None
    run = Run(
        cfg, rank, world, processor, train_set, val_problems, spot, hf, engine, ref,
        ids=token_ids(hf, processor),
        gen=GenSettings(r.temperature, r.top_p, r.top_k, r.max_response_len),
        opts=loss.LossOptions.from_config(cfg),
        order=DataOrder(len(train_set), cfg.train.seed, d.shuffle),
        grader=Grader(),
        ckpt=CheckpointManager(run_dir, cfg.run.keep_last, rank=rank, world_size=world, config=to_yaml(cfg),
                               trainable_only=lora_on),  # LoRA: adapters + their optimizer state only
        metrics=Metrics(run_dir, rank == 0, cfg.run.loggers, cfg),
        timer=PhaseTimer(watchdog_seconds=cfg.run.watchdog_seconds or None, nvtx=cfg.run.nvtx, sync=sync),
        total_steps=dv.total_steps,
        sampler=sampling_engine(cfg, processor, token_ids(hf, processor), rank, world),
    )  # fmt: skip
    if start.resume is not None:
        state = run.ckpt.load(start.resume, engine=engine)
        apply_optimizer_config(engine, cfg.train)  # the config's lr, not the checkpoint's
        run.start, run.order.pos = state["step"], state["data_pos"]
        run.metrics.truncate(run.start)
        start.log_to(run.metrics)  # rank 0: "resumed from ..."; an allowed config change, on record
    return run


def validate(run: Run, step: int) -> dict:
    """avg@val_n on the validation problems, through the evaluation's own code, and the spotlight
    diagnostic (run.spotlight_problems; samples drawn in <run>/spotlight/step_N/ by rank 0)."""
    r, out = run.cfg.rollout, Path(run.cfg.run.output_dir) / "spotlight"
    run.hf.eval()
    res = evaluate_problems(
        run.hf, run.processor, run.val_problems, samples=r.val_n, seed=run.cfg.train.seed, benchmark="val",
        gen=GenSettings(r.val_temperature, r.val_top_p, r.val_top_k, r.max_response_len),
        batch_size=max(1, run.cfg.train.logprob_micro_batch // r.val_n), suffix=run.cfg.data.prompt_suffix,
    )  # fmt: skip
    spot = run.spot_problems and spotlight.validation_metrics(
        run.hf, run.processor, run.ids, run.spot_problems, run.cfg.algo, step=step, seed=run.cfg.train.seed,
        suffix=run.cfg.data.prompt_suffix, max_new_tokens=r.max_response_len, out_dir=out if run.rank == 0
        else None,
    )  # fmt: skip
    return {"val_accuracy": res.accuracy, "val_stderr": res.stderr, **(spot or {})}


def prepare(run: Run, step: int) -> tuple[Trajectory, SampleInfo]:
    """Phases 1-4 of a step: sample and grade, perturb, score, advantages and the token mask."""
    cfg, timer, a = run.cfg, run.timer, run.cfg.algo
    vppo_on = a.name == "vppo"
    run.hf.eval()
    with timer.phase("generate"):
        traj, info = sample_batch(
            run.hf, run.processor, run.train_set, run.order, cfg, run.gen, run.grader, run.ids,
            run.rank, run.world, step, engine=run.sampler,
        )  # fmt: skip
    if vppo_on:
        with timer.phase("perturb"):
            spec, ip = PerturbSpec.from_config(a), run.processor.image_processor
            seeds = lambda i, g: [
                trajectory_seed(cfg.train.seed, step, run.rank, i, j) for j in range(len(g))
            ]  # noqa: E731
            traj.masked_pixel_values = [
                perturb_pixel_values(p, g, spec, seeds(i, g), ip) if len(g) else p
                for i, (p, g) in enumerate(zip(traj.pixel_values, traj.image_grid_thw))
            ]
    with timer.phase("score"):
        kw = dict(
            ids=run.ids, micro=cfg.train.logprob_micro_batch, **packing.pass_options(cfg.train, all_reduce)
        )
        if a.kl_coef > 0 and run.ref is None:  # LoRA: the reference is the base model, adapters off
            with lora.adapters_off(run.hf):
                traj.ref_logp = loss.score(run.hf, traj, run.opts, dependency=False, **kw).old_logp
        loss.score(run.hf, traj, run.opts, dependency=vppo_on, ref=run.ref, **kw)
    traj.advantages = objective.group_advantages(traj.rewards, cfg.rollout.n, eps=a.adv_eps)
    if vppo_on and a.topk_ratio < 1.0:
        tgf_seed = trajectory_seed(cfg.train.seed, step, run.rank, "tgf")  # token_select=random
        sel = objective.selection_stats(traj, a.token_select, tgf_seed)
        traj.token_mask = loss.tgf_token_mask(
            sel, traj.response_mask, a.topk_ratio, kind=a.dependency, impl=run.opts.impl
        )
    return traj, info


def shape(cfg: Config, mb: Trajectory) -> tuple[torch.Tensor, torch.Tensor]:
    """(A' = alpha * A, alpha) of one mini-batch: TAS (docs/algorithm.md section 3); alpha = 1 for
    GRPO / DAPO and with algo.shaping=none."""
    a, adv = cfg.algo, mb.advantages
    if mb.kl is None or a.shaping == "none":
        return adv, torch.ones_like(adv)
    scores = objective.trajectory_scores(objective.dependency_scores(mb, a.dependency), mb.response_mask)
    kw = {
        "released": {"micro_batch_size": cfg.train.micro_batch},  # per device, per micro-batch
        "global": {"reduce": all_reduce},
        "static": {"b_max": a.b_max if a.b_max is not None else 1.0, "reduce": all_reduce},
    }[a.shaping]
    valid = mb.response_mask.any(-1)
    return objective.shape_advantages(
        adv, scores, a.shaping, b_min=a.b_min, valid=valid, return_alpha=True, **kw
    )


def update(
    engine, traj: Trajectory, cfg: Config, opts: loss.LossOptions, ids: TokenIds, world: int
) -> list[dict]:
    """ppo_epochs passes of optimizer steps over one rank's scored batch; returns per-step stats."""
    t, micro, gas = cfg.train, cfg.train.micro_batch, engine.gradient_accumulation_steps()
    per_step = cfg.train.global_batch * cfg.rollout.n // world
    u = 0 if opts.objective.loss_agg == "token" else 1  # the loss's unit: tokens (0) or sequences (1)
    steps = []
    if t.balance_batch == "rollout":  # as released: the whole batch by length, then mini-batches in order
        traj = packing.balance(traj, world, ids.pad, cfg.rollout.n)
    for _ in range(cfg.train.ppo_epochs):
        for m0 in range(0, len(traj), per_step):
            mb = traj.select(range(m0, m0 + per_step))
            if t.balance_batch == "minibatch":  # the same global mini-batch, its rows re-partitioned
                mb = packing.balance(mb, world, ids.pad, cfg.rollout.n)
            adv, alpha = shape(cfg, mb)
            # the normalisers of this optimizer step over all ranks: tokens, sequences
            counts = lambda m: torch.stack([m.sum(), m.any(-1).sum()]).double()  # noqa: E731
            totals = [int(x) for x in all_reduce(counts(mb.response_mask))]
            micro_stats, step_loss = [], 0.0
            parts = packing.micro_batches(mb, micro, **packing.pass_options(t, all_reduce))
            for k, idx in enumerate(parts):
                part = mb.select(idx)
                # DeepSpeed divides by the accumulation steps even with scale_wrt_gas=False (0.19's
                # output hook), so the loss carries a factor gas that its documented division removes:
                # the gradients sum to the global token mean whatever the micro-batch size; the
                # entropy term is a token mean even with loss_agg=seq (tscale counts tokens)
                n = [int(x) for x in counts(part.response_mask)]
                scale = objective.loss_scale(n[u], totals[u], world) * gas
                tscale = objective.loss_scale(n[0], totals[0], world) * gas
                fn = partial(
                    loss.vppo_loss_linear, labels=part.responses, old_logp=part.old_logp,
                    advantages=adv[idx], token_mask=part.token_mask,
                    response_mask=part.response_mask, opts=opts, ref_logp=part.ref_logp, loss_scale=scale,
                    sampler_logp=part.sampler_logp, token_scale=tscale,  # sampler_logp: for algo.tis_cap
                )  # fmt: skip
                packing.set_boundary(engine, k, len(parts), t.max_tokens_per_micro)
                inputs = packing.update_inputs(engine.module.hf, part, ids, t.packing)  # padded or packed
                out, stats = engine(inputs, part.prompt_len, fn)
                engine.backward(out)
                engine.step()
                step_loss += float(out.detach()) / gas
                micro_stats.append(stats)
            guard = engine.vppo_guard
            steps.append(
                {
                    # global means over every micro-batch and rank (vppo.objective.STAT_MEAN_OVER)
                    **objective.step_stats(micro_stats, opts.objective.loss_agg, all_reduce),
                    # the loss of the whole global mini-batch (the micro losses are pre-scaled)
                    "loss": float(all_reduce(torch.tensor([step_loss], dtype=torch.float64))[0]) / world,
                    "grad_norm": guard.last_norm,
                    "lr": guard.last_lr,
                    "skipped": guard.last_skipped,
                    "alpha_mean": distributed.mean_over_ranks(alpha),  # over the trajectories of all ranks
                    "pad_frac_update": packing.pad_fraction(mb, t.packing, all_reduce),
                }
            )
    return steps


def train_step(run: Run, step: int) -> dict:
    """One training step; returns its metrics record."""
    t0 = time.perf_counter()
    traj, info = prepare(run, step)
    run.hf.train()
    with run.timer.phase("update"):
        steps = update(run.engine, traj, run.cfg, run.opts, run.ids, run.world)
    dt = time.perf_counter() - t0
    # every statistic over the whole rollout batch of all ranks: sequence or token means
    valid, mean = traj.response_mask, distributed.mean_over_ranks
    # each rank samples, filters and grades its own share: rounds are averaged, drops and failures summed
    tries, dropped, timeouts, errors = all_reduce(torch.tensor([
        info.tries, info.dropped_groups, info.grader.get("grader/timeouts", 0),
        info.grader.get("grader/errors", 0) + info.grader.get("grader/crashes", 0),
    ], dtype=torch.float64)).tolist()  # fmt: skip
    rec = {
        "step": step,
        "reward": mean(traj.rewards),
        "response_len": mean(valid.sum(-1)),
        "entropy": mean(traj.entropy, valid),
        "kept_frac": mean(traj.token_mask, valid) if traj.token_mask is not None else 1.0,
        "pad_frac_score": packing.pad_fraction(traj, run.cfg.train.packing, all_reduce),
        "tries": int(tries) // run.world if tries % run.world == 0 else tries / run.world,  # mean over ranks
        "dropped_groups": int(dropped),
        "skipped_steps": sum(s["skipped"] for s in steps),
        "grader_timeouts": int(timeouts),
        "grader_errors": int(errors),
        "step_seconds": dt,
        "tokens_per_second": float(all_reduce(valid.sum().reshape(1))[0]) / dt,
        **{f"time_{k}": v for k, v in run.timer.last().items()},
        **info.engine,  # vllm engine: push time, rollout tokens/s; and |logp_vllm - logp_old|:
        **mismatch_stats(traj),
    }
    if traj.kl is not None:
        dep = objective.dependency_scores(traj, run.cfg.algo.dependency)
        rec.update(dep_mean=mean(dep, valid), dep_max=distributed.max_over_ranks(dep, valid),
                   kl_mean=mean(traj.kl, valid))  # fmt: skip
    for k in steps[0]:  # the mean over the optimizer steps; kept_frac is the whole batch's above
        if k not in ("skipped", "kept_frac"):
            rec[k] = sum(s[k] for s in steps) / len(steps)
    if rec["skipped_steps"] and run.rank == 0:
        log.warning(
            "step %d: non-finite gradient norm, %d optimizer step(s) skipped", step, rec["skipped_steps"]
        )
    return rec


def train(cfg: Config) -> dict:
    """The whole run; returns the last step's metrics."""
    run = setup(cfg)
    cfg, rank = run.cfg, run.rank
    val_on = bool(cfg.run.val_every and run.val_problems)
    # under ZeRO-3 every forward gathers the weights from all ranks: all ranks validate (rank 0 logs)
    val_here = rank == 0 or zero3_partitioned(run.hf.parameters())
    if val_here and run.start == 0 and val_on:
        rec = {"step": 0, **validate(run, 0)}
        run.metrics.log(rec)
        if rank == 0:
            print(f"step 0: val accuracy {rec['val_accuracy']:.3f} +- {rec['val_stderr']:.3f}", flush=True)
    last: dict = {}
    bar = tqdm(total=run.total_steps, initial=run.start, desc="train", disable=rank != 0, dynamic_ncols=True)
    for step in range(run.start + 1, run.total_steps + 1):
        rec = train_step(run, step)
        if val_on and step % cfg.run.val_every == 0 and val_here:
            with run.timer.phase("validate"):
                rec.update(validate(run, step))
        barrier()
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
    run.metrics.close()
    if cfg.run.export_hf:
        export_hf(
            run.engine, run.processor, Path(cfg.run.output_dir) / "export", rank, cfg.data.prompt_suffix
        )
    if run.sampler is not None:  # vLLM: shut down before the process groups go (vllm_engine.close)
        run.sampler.close()
    return last


def main(argv: list[str] | None = None) -> int | None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config_from_args(argv, prog="python -m vppo.train", description=__doc__.split("\n\n")[0])
    try:
        last = train(cfg)
    except RunFolderError as e:  # refused at start-up, the folder untouched: the message, not a traceback
        print(f"python -m vppo.train: error: {e}", file=sys.stderr, flush=True)
        return 2
    if last and is_main():
        print(json.dumps(last), flush=True)
    if dist.is_initialized():  # leave together: a rank exiting mid-collective aborts the others
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
