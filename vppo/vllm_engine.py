"""The vLLM sampling engine (`rollout.engine=vllm`): colocated, one per rank, in the trainer process.

    eng = VLLMEngine.from_config(cfg, processor, ids, rank=rank, world=world)
    eng.push(hf)                                   # the training weights, before every rollout
    traj = eng.generate(problems, inputs, n, gen)  # a vppo.trajectory.Trajectory, as rollout.generate

What the loop relies on, kept identical to `vppo.rollout.generate` (the hf engine):
- the prompt token ids are those of the processor call the scoring passes use (`inputs`, left pad
  stripped); vLLM re-runs the image processor with the same min/max pixels, and every request's
  prompt as vLLM expanded it is checked against ours token for token (so the image grid and the
  number of image tokens agree), a mismatch is an error;
- the vision special tokens are never sampled (`allowed_token_ids`: the vocabulary without them),
  generation stops at the same EOS ids, the response mask is `rollout.response_mask_from` of the
  same tokens, and the layout (prompt left-padded to P, response right-padded to R) is the same;
- top_k (0 = off) and repetition_penalty=1.0 are passed explicitly, so the checkpoint's
  generation_config.json defaults never apply (Qwen2.5-VL-7B-Instruct ships 1.05 and top_k 1);
- the n samples of a prompt are one request with n outputs, kept consecutive (a group);
- the sampled tokens' log-probs come back as `Trajectory.sampler_logp` (raw log-probs, i.e. of
  softmax(logits); they equal the trainer's old log-probs at temperature 1, the only temperature at
  which they are recorded).

The engine runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a weight push hands vLLM's
`reload_weights` an iterator over the training model's tensors without copying them through a
socket: ZeRO-2 yields the full weights as they are, ZeRO-3 gathers one parameter at a time (never
the whole model twice). After a push the prefix cache and the multimodal encoder cache are reset
(an image seen before the push must be encoded again). Sleep mode (level 1) between rollouts where
the platform has it (CUDA); on the CPU vLLM has none, which is said once in the log.

Seeds: on a GPU each request carries its own seed (drawn from the loop's per-step seed), so a resumed
run samples what the uninterrupted one would; vLLM's CPU sampler rejects per-request seeds, so on the
CPU only the engine seed (`train.seed + rank`) is set.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch

from vppo import lora
from vppo.distributed import gathered, zero3_partitioned
from vppo.models import family_of_checkpoint
from vppo.rollout import GenSettings, response_mask_from, split_images
from vppo.tokens import TokenIds
from vppo.trajectory import Trajectory

log = logging.getLogger("vppo.vllm_engine")

INSTALL_HINT = (
    "rollout.engine=vllm needs the vllm package: on a GPU `pip install -e '.[vllm]'`, on this CPU "
    "`make vllm-env` (then run with .venv-vllm/bin/python)"
)


class _VLLMNoise(logging.Filter):
    """Drops two of vLLM's own messages, matched exactly, that report nothing wrong (issue 26 item 9):

    - "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it."
      (vllm/v1/worker/cpu_worker.py): the in-process CPU worker replaces torch.set_num_threads with a
      no-op that says this, and vLLM's own prompt renderer then calls it twice around every
      multimodal prompt (set_default_torch_num_threads in vllm/renderers/base.py), ~2 lines a prompt.
      The call is skipped; the thread count stays the one OMP_NUM_THREADS set. No call of ours.
    - "<Layer>: Failed to load weights" (vllm/model_executor/model_loader/reload/layerwise.py) for the
      layers in DERIVED: they hold only buffers vLLM computes itself (the image mean / std of the
      fused input normalisation, the rotary cos / sin caches), which no checkpoint has, and vLLM puts
      its own tensors back. Any other layer's message stays: it would be a weight the push missed.
    """

    THREADS = "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding"
    DERIVED = frozenset({"FusedMMInputNorm", "RotaryEmbedding", "MRotaryEmbedding"})

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg.startswith(self.THREADS):
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        return not (msg == "%s: Failed to load weights" and args and args[0] in self.DERIVED)


_NOISY_LOGGERS = ("vllm.v1.worker.cpu_worker", "vllm.model_executor.model_loader.reload.layerwise")


def quiet_vllm() -> None:
    """Attach _VLLMNoise to the two vLLM loggers that emit those messages (once per process)."""
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        if not any(isinstance(f, _VLLMNoise) for f in lg.filters):
            lg.addFilter(_VLLMNoise())


def _cpu_defaults() -> None:
    """vLLM's CPU backend: a small KV cache and OpenMP on every core (it binds one by default)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{max(0, (os.cpu_count() or 1) - 1)}")


def flat_logprobs(logprobs, tokens) -> list[float]:
    """The sampled tokens' log-probs out of vLLM's per-position {token id: Logprob} dicts."""
    return [float(lp[t].logprob) for lp, t in zip(logprobs, tokens)]


def collapse_runs(ids: list[int], token: int) -> list[int]:
    """`ids` with every run of `token` shortened to one: the processor's expanded image slots back to
    the single placeholder vLLM expands itself (it would expand each of an expanded run again)."""
    return [t for j, t in enumerate(ids) if t != token or j == 0 or ids[j - 1] != token]


@dataclass
class PushStats:
    seconds: float = 0.0
    tensors: int = 0
    numel: int = 0


class VLLMEngine:
    """One vLLM engine holding a copy of the policy; see the module docstring."""

    def __init__(
        self,
        model_path: str,
        processor,
        ids: TokenIds,
        *,
        dtype: str = "float32",
        max_model_len: int | None = 1024,
        max_images: int = 1,
        seed: int = 0,
        gpu_memory_utilization: float = 0.5,
        tensor_parallel_size: int = 1,
        sleep: bool = True,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        world: int = 1,
    ):
        try:
            import vllm  # noqa: F401
        except ImportError as e:
            raise ImportError(INSTALL_HINT) from e
        from vllm import LLM
        from vllm.platforms import current_platform

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: pushes share tensors
        quiet_vllm()
        self.on_cpu = current_platform.is_cpu()
        if self.on_cpu:
            _cpu_defaults()
        self.sleep_mode = bool(sleep) and current_platform.is_sleep_mode_available()
        if sleep and not self.sleep_mode:
            log.info(
                "vLLM sleep mode is not available on %s: the engine stays awake", current_platform.device_name
            )
        self.ids, self.processor = ids, processor
        fam = family_of_checkpoint(model_path)  # what vLLM needs of the model family
        self.image_pad = processor.tokenizer.convert_tokens_to_ids(fam.image_pad_token)
        vocab = len(processor.tokenizer)
        banned = set(ids.vision)
        self.allowed = [i for i in range(vocab) if i not in banned]
        kw = dict(
            model=str(model_path), dtype=dtype, seed=seed,
            limit_mm_per_prompt={"image": max_images, "video": 0}, tensor_parallel_size=tensor_parallel_size,
            enable_prefix_caching=True, logprobs_mode="raw_logprobs",
        )  # fmt: skip
        kw.update(fam.vllm_options(min_pixels, max_pixels))
        if max_model_len is not None:  # None: the model's own limit
            kw["max_model_len"] = max_model_len
        if self.on_cpu:
            kw["enforce_eager"] = True
        else:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
            kw["enable_sleep_mode"] = self.sleep_mode
            if world > 1:  # one engine per trainer rank, inside the torchrun processes
                kw["distributed_executor_backend"] = "external_launcher"
        t0 = time.perf_counter()
        self.llm = LLM(**kw)
        self.start_seconds = time.perf_counter() - t0
        self.asleep = False
        self.last_push = PushStats()

    @classmethod
    def from_config(cls, cfg, processor, ids: TokenIds, *, rank: int = 0, world: int = 1) -> VLLMEngine:
        r, d = cfg.rollout, cfg.data
        return cls(
            cfg.model.path, processor, ids, dtype=cfg.model.dtype,
            max_model_len=d.max_prompt_len + r.max_response_len, seed=cfg.train.seed + rank,
            gpu_memory_utilization=r.gpu_memory_utilization, tensor_parallel_size=r.tensor_parallel_size,
            sleep=r.vllm_sleep, min_pixels=d.min_pixels, max_pixels=d.max_pixels, world=world,
        )  # fmt: skip

    def close(self) -> None:
        """Shut the engine down while the process groups are alive (after the run's last collective).

        In-process, vLLM's engine shutdown destroys its own groups and then the default process group
        it shares with the trainer (vllm/distributed/parallel_state.py, cleanup_dist_env_and_memory).
        Left to its exit-time finalizer, it ran after the trainer had destroyed the default group and
        ended every run with `ValueError: Invalid process group specified`. Idempotent."""
        if getattr(self, "llm", None) is None:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()  # every rank is past its last collective before the groups go
        self.llm.llm_engine.engine_core.shutdown()  # detaches vLLM's finalizer, so it runs once
        self.llm = None

    # -- phases ------------------------------------------------------------------------------------
    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        """Level 1: weights to host memory, KV cache dropped (the next push overwrites the weights)."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    @torch.no_grad()
    def push(self, model) -> PushStats:
        """Load `model`'s weights (the HF policy the trainer updates) into the engine."""
        self.wake()
        params = list(model.named_parameters())
        z3 = zero3_partitioned(p for _, p in params)
        stats = PushStats()

        def weights():
            if lora.enabled(model):
                # LoRA: the merged W + scale * B @ A under the base names, every rollout, rather than
                # vLLM's own LoRA adapters: the engine then samples from exactly the weights the
                # trainer scores, so |logp_vllm - logp_old| keeps measuring the two engines and not a
                # separate LoRA kernel path (vLLM's LoRA also leaves the vision tower out); the cost
                # is a full-weight push per rollout, as without LoRA
                for name, t in lora.merged_tensors(model):
                    stats.tensors += 1
                    stats.numel += t.numel()
                    yield name, t
                return
            for name, p in params:
                if z3:
                    with gathered([p]):
                        t = p.data.detach().clone()  # the gathered copy lives only for this parameter
                else:
                    t = p.data.detach()
                stats.tensors += 1
                stats.numel += t.numel()
                yield name, t

        t0 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights()})
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()
        stats.seconds = time.perf_counter() - t0
        self.last_push = stats
        return stats

    # -- sampling ----------------------------------------------------------------------------------
    def sampling_params(self, n: int, gen: GenSettings, seed: int | None = None):
        from vllm import SamplingParams

        return SamplingParams(
            n=n,
            temperature=gen.temperature,
            top_p=gen.top_p,
            top_k=gen.top_k if gen.top_k and gen.top_k > 0 else 0,  # 0 = off in vLLM >= 0.32 (was -1)
            min_p=0.0,
            repetition_penalty=1.0,  # explicit: never the checkpoint's generation_config.json
            presence_penalty=0.0,
            frequency_penalty=0.0,
            max_tokens=gen.max_new_tokens,
            stop_token_ids=list(self.ids.eos),
            ignore_eos=False,
            allowed_token_ids=self.allowed,
            logprobs=0,
            detokenize=False,
            skip_special_tokens=True,
            seed=None if self.on_cpu else seed,
        )

    @torch.no_grad()
    def generate(self, problems, inputs: dict, n: int, gen: GenSettings, *,
                 seed: int | list[int] | None = None, tokenizer=None) -> Trajectory:  # fmt: skip
        """n responses per prompt of `inputs` (`vppo.data.encode_prompts(problems, ...)`, left padded).
        seed: one per call (each prompt's drawn from it) or one per prompt; GPU only (see above)."""
        self.wake()
        ids_all, attn_all = inputs["input_ids"], inputs["attention_mask"]
        if len(problems) != ids_all.shape[0]:
            raise ValueError(f"{len(problems)} problems but {ids_all.shape[0]} prompt rows")
        prompts = []
        for i, p in enumerate(problems):
            row = ids_all[i][attn_all[i].bool()].tolist()
            req = {"prompt_token_ids": collapse_runs(row, self.image_pad), "expanded": row}
            imgs = p.pil_images()
            if imgs:
                req["multi_modal_data"] = {"image": imgs if len(imgs) > 1 else imgs[0]}
            prompts.append(req)
        seeds = [None] * len(prompts)
        if isinstance(seed, (list, tuple)):
            if len(seed) != len(prompts):
                raise ValueError(f"{len(seed)} seeds for {len(prompts)} prompts")
            seeds = [None] * len(prompts) if self.on_cpu else [int(x) % (2**31 - 1) for x in seed]
        elif seed is not None and not self.on_cpu:
            g = torch.Generator().manual_seed(seed)
            seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=g).tolist()
        params = [self.sampling_params(n, gen, s) for s in seeds]
        expanded = [req.pop("expanded") for req in prompts]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        rows, lps = [], []
        for i, (want, o) in enumerate(zip(expanded, outs)):
            if list(o.prompt_token_ids) != want:
                raise RuntimeError(
                    f"vLLM expanded prompt {i} to {len(o.prompt_token_ids)} tokens, the processor to "
                    f"{len(want)}: the image grids differ (check data.min_pixels / "
                    "max_pixels against the model folder's preprocessor_config.json)"
                )
            comps = sorted(o.outputs, key=lambda c: c.index)
            if len(comps) != n:
                raise RuntimeError(f"vLLM returned {len(comps)} samples for prompt {i}, asked for {n}")
            for c in comps:
                toks = list(c.token_ids)
                rows.append(toks)
                lps.append(flat_logprobs(c.logprobs, toks) if c.logprobs is not None else [0.0] * len(toks))
        return self._trajectory(inputs, n, rows, lps, gen, tokenizer)

    def _trajectory(self, inputs, n, rows, lps, gen: GenSettings, tokenizer) -> Trajectory:
        pad = self.ids.pad
        R = max(1, max(len(t) for t in rows))
        responses = torch.full((len(rows), R), pad, dtype=torch.long)
        slp = torch.zeros(len(rows), R, dtype=torch.float32)
        for b, (t, lp) in enumerate(zip(rows, lps)):
            responses[b, : len(t)] = torch.tensor(t, dtype=torch.long)
            slp[b, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        lengths = torch.tensor([len(t) for t in rows])
        mask = response_mask_from(responses, self.ids.eos) & (torch.arange(R)[None] < lengths[:, None])
        responses = responses.masked_fill(~mask, pad)
        pix_rows, grid_rows = split_images(inputs, self.ids.vision_start)
        rep = lambda t: t.repeat_interleave(n, dim=0)  # noqa: E731
        ids, attn = rep(inputs["input_ids"]), rep(inputs["attention_mask"])
        mm = rep(inputs["mm_token_type_ids"]) if "mm_token_type_ids" in inputs else torch.zeros_like(ids)
        texts = []
        if tokenizer is not None:
            texts = [tokenizer.decode(r[m], skip_special_tokens=True) for r, m in zip(responses, mask)]
        return Trajectory(
            input_ids=torch.cat([ids, responses], 1),
            attention_mask=torch.cat([attn, mask.long()], 1),
            mm_token_type_ids=torch.cat([mm, torch.zeros_like(responses)], 1).to(mm.dtype),
            prompt_len=ids.shape[1],
            response_mask=mask,
            pixel_values=[p for p in pix_rows for _ in range(n)],
            image_grid_thw=[g for g in grid_rows for _ in range(n)],
            group=torch.arange(inputs["input_ids"].shape[0]).repeat_interleave(n),
            texts=texts,
            sampler_logp=slp * mask if gen.temperature == 1.0 else None,
        )
