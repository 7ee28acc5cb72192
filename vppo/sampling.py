"""A training step's batch of responses: which prompts, sampled, graded and online-filtered.

`DataOrder` walks the training set in a seeded order per epoch (its position is checkpointed);
`sample_batch` draws this rank's prompts, samples n responses each (`vppo.rollout.generate`),
grades them with the boxed-answer grader, and, with DAPO's dynamic sampling on, drops groups whose
mean accuracy is <= low or >= high and samples more prompts until the batch is full.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from vppo.config import Config
from vppo.data import encode_prompts
from vppo.distributed import all_reduce, max_over_ranks, mean_over_ranks
from vppo.rollout import GenSettings, generate
from vppo.tokens import TokenIds
from vppo.trajectory import Trajectory, concat


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
class SampleInfo:
    """How a batch came to be: sampling rounds, groups kept and dropped, grader counters."""

    tries: int
    kept_groups: int
    dropped_groups: int
    grader: dict
    engine: dict = field(default_factory=dict)  # vllm engine only: engine_stats (all ranks)


def sample_batch(
    hf, processor, problems, order: DataOrder, cfg: Config, gen: GenSettings, grader, ids: TokenIds,
    rank: int, world: int, step: int, engine=None,
) -> tuple[Trajectory, SampleInfo]:  # fmt: skip
    """This rank's graded batch (rewards and answers filled) for training step `step`.

    Every rank draws the same global prompt indices and takes its own shard, so each group of n
    responses stays on one rank. Sampling is seeded per (seed, step, round, rank): a resumed run
    samples what the uninterrupted run would have.

    `engine`: a `vppo.vllm_engine.VLLMEngine` (rollout.engine=vllm) or None (hf generate on `hf`).
    The vllm engine gets `hf`'s weights before sampling and sleeps after it.
    """
    r = cfg.rollout
    push_s = engine.push(hf).seconds if engine is not None else 0.0
    t_gen, gen_tokens = 0.0, 0
    quota = r.rollout_batch_size // world
    kept: list[Trajectory] = []
    have, tries, dropped, stats = 0, 0, 0, {}
    while have < quota:
        if tries >= (r.filter_max_tries if r.online_filter else 1):
            raise RuntimeError(
                f"online filtering kept {have} of {quota} prompts after rollout.filter_max_tries="
                f"{r.filter_max_tries} rounds (groups with mean accuracy <= {r.filter_low} or >= "
                f"{r.filter_high} are dropped): the policy solves nearly all or none of the prompts; raise "
                "rollout.filter_max_tries, widen filter_low / filter_high, or turn rollout.online_filter off"
            )
        idx = order.take(quota * world)[rank::world]
        probs = [problems[i] for i in idx]
        seed = cfg.train.seed * 1_000_003 + step * 1009 + tries * 101 + rank
        torch.manual_seed(seed)
        inputs = encode_prompts(probs, processor, cfg.data.prompt_suffix)
        t0 = time.perf_counter()
        if engine is not None:
            traj = engine.generate(probs, inputs, r.n, gen, seed=seed, tokenizer=processor.tokenizer)
        else:
            traj = generate(
                hf, inputs, r.n, gen, eos_ids=ids.eos, pad_id=ids.pad, suppress_ids=ids.vision,
                vision_start_id=ids.vision_start, tokenizer=processor.tokenizer,
            )  # fmt: skip
        t_gen += time.perf_counter() - t0
        gen_tokens += int(traj.response_mask.sum())
        traj.answers = [probs[int(g)].answer for g in traj.group]
        scores, gstats = grader.grade(traj.texts, traj.answers)
        for k, v in gstats.as_dict().items():
            if isinstance(v, (int, float)):
                stats[k] = stats.get(k, 0) + v
        traj.rewards = torch.tensor(scores, dtype=torch.float32)
        keep_rows = list(range(len(traj)))
        if r.online_filter:
            acc = traj.rewards.view(-1, r.n).mean(-1)
            good = ((acc > r.filter_low) & (acc < r.filter_high)).nonzero().squeeze(-1).tolist()
            good = good[: quota - have]
            dropped += len(probs) - len(good)
            keep_rows = [g * r.n + j for g in good for j in range(r.n)]
        if keep_rows:
            kept.append(traj.select(keep_rows))
            have += len(keep_rows) // r.n
        tries += 1
    traj = concat(kept, ids.pad)
    traj.group = torch.arange(len(traj)) // r.n
    eng_stats = {}
    if engine is not None:
        engine.sleep()
        eng_stats = engine_stats(push_s, t_gen, gen_tokens)
    return traj, SampleInfo(tries, have, dropped, stats, eng_stats)


def engine_stats(push_s: float, gen_s: float, tokens: int, reduce=all_reduce) -> dict[str, float]:
    """The sampling engine's numbers of a step over all ranks: the slowest rank's weight push, and
    every rank's generated tokens over the slowest rank's generation time (the step waits for it)."""
    slowest = reduce(torch.tensor([push_s, gen_s], dtype=torch.float64), "max")
    total = reduce(torch.tensor([float(tokens)], dtype=torch.float64), "sum")
    return {
        "push_seconds": float(slowest[0]),
        "rollout_tokens_per_second": float(total[0] / max(slowest[1], 1e-9)),
    }


def sampling_engine(cfg: Config, processor, ids: TokenIds, rank: int = 0, world: int = 1):
    """The sampling engine of rollout.engine: None for hf (sample_batch generates on the policy),
    a colocated `vppo.vllm_engine.VLLMEngine` for vllm."""
    if cfg.rollout.engine == "hf":
        return None
    from vppo.vllm_engine import VLLMEngine

    return VLLMEngine.from_config(cfg, processor, ids, rank=rank, world=world)


def mismatch_stats(traj: Trajectory) -> dict:
    """Train/inference mismatch, after scoring: mean and max |sampler_logp - old_logp| over the
    response tokens of every rank's batch; {} when the engine returned no log-probs (hf) or the batch
    is unscored (the same on every rank). Every rank must call it: it all-reduces."""
    if traj.sampler_logp is None or traj.old_logp is None:
        return {}
    valid = traj.response_mask
    d = (traj.sampler_logp - traj.old_logp).abs()
    top = max_over_ranks(d, valid)  # -inf when no rank has a response token
    return {"logp_mismatch_mean": mean_over_ranks(d, valid), "logp_mismatch_max": max(top, 0.0)}
