"""avg@n of a problem set: seeded sampling, grading, the per-problem cache (docs/algorithm.md section 6).

The library behind both the training loop's validation and `python -m vppo.eval`, so the two share
prompts, sampling and grading:

    res = evaluate_problems(model, processor, problems, samples=8, gen=EVAL_GEN, seed=0, benchmark="val")
    res.accuracy, res.stderr, res.per_problem       # fractions in [0, 1]

Per problem, n samples are drawn and graded by the training reward's boxed-answer grader (vppo.reward;
`grader="released"`: exactly the authors' harness, mathruler's grade_answer on the last boxed content);
the score of a problem is the mean over its samples, the accuracy the mean over problems, with the
standard error over problems. What makes a number reproducible:
- every sample draws from its own generator, seeded from (seed, benchmark, problem row, sample): the
  responses do not depend on the batch size, on the order problems are generated in, or on a resume
  (bar floating-point differences of padded batches on a GPU);
- the generation config carries no hidden defaults: repetition penalty 1.0 unless asked for, since
  `generate` would otherwise take the checkpoint's generation_config.json values (Qwen2.5-VL-7B-
  Instruct ships repetition_penalty 1.05, top_k 1);
- a ProblemCache appends each finished problem to a JSON-lines file whose header holds the settings
  key: other settings refuse the cache instead of mixing, a changed grader re-grades the cached
  responses, and a killed run resumes without regenerating.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vppo import reward
from vppo.data import PROMPT_SUFFIX, Problem, encode_prompts
from vppo.rollout import GenSettings, generate
from vppo.tokens import token_ids

# The authors' evaluation settings (docs/algorithm.md section 6).
EVAL_GEN = GenSettings(temperature=1.0, top_p=1.0, top_k=50, max_new_tokens=2048)
CACHE_VERSION = 1
# "project": vppo.reward's grader (the training reward); "released": PAPO-Eval's eval_utils.py scoring.
GRADERS = ("project", "released")

# (problems of one batch, per problem its n sample seeds) -> B * n response texts, problem-major.
SampleFn = Callable[[Sequence[Problem], list[list[int]]], list[str]]


# ----------------------------------------------------------------------------------------------------
# seeds and seeded sampling


def _hash_int(*parts: object) -> int:
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def problem_seed(seed: int, benchmark: str, index: int) -> int:
    """The seed of one problem, from (run seed, benchmark, row index in its source)."""
    return _hash_int("vppo-eval", seed, benchmark, index)


def sample_seeds(pseed: int, n: int) -> list[int]:
    """The n per-sample seeds of a problem (sample j's seed does not depend on n)."""
    return [_hash_int(pseed, j) for j in range(n)]


class SeededSampler:
    """A logits processor that samples each row from its own torch.Generator.

    generate() draws every row from the global RNG, so a response would depend on which rows share
    its batch. This processor applies the same warpers generate() would (temperature, then top-k,
    then top-p, HF's own classes), draws the next token of row r by inverse CDF with one uniform from
    generator r, and returns scores that are 0 at the drawn token and -inf elsewhere: the sampling
    step of generate() (and any warper after this processor) can then only pick that token.
    Rows are in generate()'s order (prompt-major, n samples per prompt).
    """

    def __init__(self, seeds: Sequence[int], gen: GenSettings):
        if gen.temperature <= 0:
            raise ValueError(f"gen.temperature must be > 0 for sampling, got {gen.temperature}")
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.warpers = LogitsProcessorList()
        if gen.temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(gen.temperature))
        if gen.top_k and gen.top_k > 0:
            self.warpers.append(TopKLogitsWarper(top_k=gen.top_k))
        if gen.top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=gen.top_p))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        B, V = scores.shape  # (B, V)
        if B != len(self.generators):
            raise ValueError(
                f"SeededSampler has {len(self.generators)} generators but the batch has {B} rows"
            )
        warped = self.warpers(input_ids, scores.float())
        probs = torch.softmax(warped.double(), dim=-1)  # (B, V); float64 so the CDF tail stays exact
        cdf = probs.cumsum(-1)  # (B, V)
        u = torch.tensor([torch.rand((), generator=g, dtype=torch.float64).item() for g in self.generators])
        target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(1)  # (B, 1)
        tok = torch.searchsorted(cdf, target, right=True).clamp_(max=V - 1)  # (B, 1): first cdf > target
        # A rounding corner (target at the very top of the CDF) may land on a zero-probability token.
        bad = probs.gather(1, tok) <= 0
        tok = torch.where(bad, probs.argmax(-1, keepdim=True), tok)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, tok, 0.0)


class _SeededModel:
    """The policy as rollout.generate() sees it, with the seeded sampler added to model.generate()
    and the checkpoint's processor-creating generation defaults neutralised."""

    def __init__(self, model, sampler: SeededSampler, repetition_penalty: float):
        self.model, self.sampler, self.repetition_penalty = model, sampler, repetition_penalty

    def parameters(self):
        return self.model.parameters()

    def generate(self, generation_config=None, **kwargs):
        cfg = copy.deepcopy(generation_config)
        cfg.repetition_penalty = self.repetition_penalty
        cfg.no_repeat_ngram_size = 0
        return self.model.generate(
            generation_config=cfg, logits_processor=LogitsProcessorList([self.sampler]), **kwargs
        )


def rollout_sampler(
    model,
    processor,
    gen: GenSettings,
    *,
    repetition_penalty: float = 1.0,
    suffix: str | None = PROMPT_SUFFIX,
    regroup_after: int = 0,
) -> SampleFn:
    """The default SampleFn: the processor's left-padded prompts (vppo.data, `suffix` after the problem
    text), rollout.generate() (the training loop's sampling code) with one seeded generator per sample.

    generate() decodes a batch until its last row stops, so one response that never emits an EOS makes
    every row of its batch run to max_new_tokens. With `regroup_after` = k > 0 (and k < max_new_tokens)
    the batch is first generated for k tokens; the rows still running then are generated again on their
    own, with the full budget, from the same seeds. A row's tokens depend only on its prompt and its
    generator (SeededSampler), so the rerun repeats its first k tokens and goes on: the responses are
    those of one pass (bar floating-point differences between batch shapes), and a straggler costs k
    tokens twice instead of holding its whole batch."""
    ids = token_ids(model, processor)
    if regroup_after < 0:
        raise ValueError(f"regroup_after must be >= 0 (0: off), got {regroup_after}")

    def run(problems: Sequence[Problem], flat_seeds: list[int], n: int, g: GenSettings):
        inputs = encode_prompts(problems, processor, suffix)
        return generate(
            _SeededModel(model, SeededSampler(flat_seeds, g), repetition_penalty),
            inputs,
            n,
            g,
            eos_ids=ids.eos,
            pad_id=ids.pad,
            suppress_ids=ids.vision,
            vision_start_id=ids.vision_start,
            tokenizer=processor.tokenizer,
        )

    def sample(problems: Sequence[Problem], seeds: list[list[int]]) -> list[str]:
        n, flat = len(seeds[0]), [s for row in seeds for s in row]
        if not 0 < regroup_after < gen.max_new_tokens:
            return run(problems, flat, n, gen).texts
        ro = run(problems, flat, n, replace(gen, max_new_tokens=regroup_after))
        texts = list(ro.texts)
        responses = ro.input_ids[:, ro.prompt_len :]
        stopped = torch.isin(responses, torch.tensor(ids.eos)).any(-1)  # (B,)
        running = (~stopped & (responses.shape[1] == regroup_after)).nonzero().flatten().tolist()
        if running:  # one row per straggler (n = 1), each with its own seed
            again = run([problems[r // n] for r in running], [flat[r] for r in running], 1, gen)
            for r, text in zip(running, again.texts):
                texts[r] = text
        return texts

    return sample


def vllm_sampler(engine, processor, gen: GenSettings, *, suffix: str | None = PROMPT_SUFFIX) -> SampleFn:
    """A SampleFn on a `vppo.vllm_engine.VLLMEngine` (`python -m vppo.eval --engine vllm`): the same
    prompts and response rule as rollout_sampler, vLLM's sampler. On a GPU each problem's request is
    seeded with its first sample seed (its n samples do not depend on the batch); on the CPU vLLM
    takes no per-request seed, so only the engine seed holds (samples depend on the batch)."""

    def sample(problems: Sequence[Problem], seeds: list[list[int]]) -> list[str]:
        inputs = encode_prompts(problems, processor, suffix)
        first = [row[0] for row in seeds]  # a problem's request seed (GPU)
        ro = engine.generate(problems, inputs, len(seeds[0]), gen, seed=first, tokenizer=processor.tokenizer)
        return ro.texts

    return sample


# ----------------------------------------------------------------------------------------------------
# grading (the training reward's grader)


def grade_responses(
    responses: list[str], answers: list[str], grader: str = "project"
) -> tuple[list[float], list[str | None], dict]:
    """(scores, extracted answers or None, grader counters) with vppo.reward: the training reward's
    grader, or (`grader="released"`) the authors' harness scoring."""
    if grader == "project":
        scores, stats = reward.grade(responses, answers)
        extracted = [reward.extract_boxed(reward.collapse_ops(r)) for r in responses]
    elif grader == "released":
        scores, stats = reward.default_grader().grade_released(responses, answers)
        extracted = [reward.extract_boxed_released(r) for r in responses]
    else:
        raise ValueError(f"grader must be one of {GRADERS}, got {grader!r}")
    counters = stats.as_dict() if hasattr(stats, "as_dict") else dict(stats)
    # Counts add up over batches; ratios (accuracy) do not.
    counters = {k: v for k, v in counters.items() if not k.endswith("accuracy")}
    return [float(s) for s in scores], extracted, counters


def grader_agreement(results: Sequence[ProblemResult]) -> dict:
    """How often the boxed-answer grader and math-verify agree on these samples (vppo.reward)."""
    responses = [s["response"] for r in results for s in r.samples]
    answers = [r.answer for r in results for _ in r.samples]
    a = reward.agreement(responses, answers, reward.default_grader())
    return {k: v for k, v in asdict(a).items() if k != "disagreements"} | {
        "first_disagreements": a.disagreements[:10]
    }


# ----------------------------------------------------------------------------------------------------
# results and the per-problem cache


@dataclass
class ProblemResult:
    index: int  # row index in the benchmark's source (the seed depends on it)
    uid: str
    answer: str
    seed: int
    samples: list[dict]  # [{"response", "extracted", "score"}]

    @property
    def score(self) -> float:
        return sum(s["score"] for s in self.samples) / len(self.samples)


@dataclass
class EvalResult:
    """avg@n of one problem set. `per_problem` are the problems' mean scores in input order."""

    accuracy: float
    stderr: float  # standard error of the mean over problems (sample std / sqrt(N))
    per_problem: list[float]
    results: list[ProblemResult]
    samples: int  # n
    no_box_rate: float  # fraction of responses without a (non-empty) boxed answer
    grader: dict = field(default_factory=dict)  # summed grader counters of this call (timeouts, errors)
    generated: int = 0  # problems generated by this call (the rest came from the cache)

    def summary(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "stderr": self.stderr,
            "problems": len(self.per_problem),
            "samples": self.samples,
            "no_box_rate": self.no_box_rate,
            "grader": self.grader,
            "generated": self.generated,
        }


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (unbiased std / sqrt(N)); stderr 0 for N = 1."""
    if not values:
        raise ValueError("values must not be empty")
    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


class ProblemCache:
    """One JSON line per finished problem, after a header line holding the settings key.

    Appends are flushed and fsynced, so a kill loses at most the problem being written; a torn last
    line is dropped on load. A cache whose generation settings (`key`) differ raises ValueError on
    open. A cache graded by another grader version (`grader`) keeps its responses and is re-graded
    with the current grader: a grader fix does not cost a regeneration."""

    def __init__(self, path: str | os.PathLike, key: dict, grader: dict | None = None):
        self.path, self.key, self.grader = Path(path), key, grader
        self.done: dict[int, ProblemResult] = {}
        self.regraded = 0
        if self.path.exists() and self.path.stat().st_size:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write([])

    def _header(self) -> str:
        return json.dumps({"header": self.key, "grader": self.grader}, sort_keys=True)

    def _write(self, results: list[ProblemResult]) -> None:
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(
                "\n".join([self._header(), *(json.dumps(asdict(r), sort_keys=True) for r in results)]) + "\n"
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _load(self) -> None:
        lines = self.path.read_text().split("\n")
        try:
            first = json.loads(lines[0])
        except json.JSONDecodeError:
            first = {}
        header = first.get("header")
        if header != self.key:
            diff = sorted(
                k for k in set(self.key) | set(header or {}) if (header or {}).get(k) != self.key.get(k)
            )
            raise ValueError(
                f"cache {self.path} was written with other settings (differing: {', '.join(diff)}); "
                "evaluate into another --out or pass --fresh to discard it"
            )
        n_lines = len([ln for ln in lines if ln])
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn write: the run was killed mid-line; later lines cannot exist
            self.done[rec["index"]] = ProblemResult(**rec)
        results = list(self.done.values())
        if self.grader is not None and first.get("grader") != self.grader and results:
            responses = [s["response"] for r in results for s in r.samples]
            name = (self.grader or {}).get("name", "project")
            scores, extracted, _ = grade_responses(
                responses, [r.answer for r in results for _ in r.samples], grader=name
            )
            flat = iter(zip(scores, extracted))
            for r in results:
                for s in r.samples:
                    s["score"], s["extracted"] = next(flat)
            self.regraded = len(results)
        if self.regraded or first.get("grader") != self.grader or len(results) + 1 < n_lines:
            self._write(results)  # new header and grades, or the torn tail dropped, before appending

    def add(self, result: ProblemResult) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(asdict(result), sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[result.index] = result


# ----------------------------------------------------------------------------------------------------
# the evaluation (shared by in-training validation and the CLI)


def evaluate_problems(
    model,
    processor,
    problems: Sequence[Problem],
    *,
    samples: int = 8,
    gen: GenSettings = EVAL_GEN,
    seed: int = 0,
    benchmark: str = "val",
    batch_size: int = 8,
    repetition_penalty: float = 1.0,
    suffix: str | None = PROMPT_SUFFIX,
    cache: ProblemCache | None = None,
    progress: bool | str = False,
    sample_fn: SampleFn | None = None,
    grader: str = "project",
    regroup_after: int = 0,
) -> EvalResult:
    """avg@`samples` of `problems`: generate, grade with the training reward's grader, average.

    Args:
        model, processor: a Qwen2.5-VL-style policy (eval mode, on its device) and its processor;
            unused when `sample_fn` is given.
        problems: vppo.data Problems; a problem's row index (`meta["row"]`, else its position) and
            `benchmark` seed its samples, so the result does not depend on `batch_size` or a resume.
        batch_size: problems per generate() call (batch_size * samples rows).
        suffix: appended after each problem's text (the training run's data.prompt_suffix).
        cache: finished problems are skipped and new ones appended (see ProblemCache).
        progress: False, True, or a tqdm description.
        sample_fn: replaces the default sampler (rollout_sampler); tests and custom backends.
        grader: "project" (the training reward's grader) or "released" (the authors' harness).
        regroup_after: rows still running after this many tokens are finished on their own
            (rollout_sampler; the same responses, without one straggler holding its batch; 0: off).
    Returns: EvalResult (accuracy and stderr as fractions in [0, 1]).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not problems:
        raise ValueError("problems must not be empty")
    if grader not in GRADERS:
        raise ValueError(f"grader must be one of {GRADERS}, got {grader!r}")
    indices = [int(p.meta.get("row", i)) for i, p in enumerate(problems)]
    if len(set(indices)) != len(indices):
        raise ValueError("problems: duplicate row indices (meta['row']); seeds would repeat")
    sample_fn = sample_fn or rollout_sampler(
        model, processor, gen, repetition_penalty=repetition_penalty, suffix=suffix,
        regroup_after=regroup_after,
    )  # fmt: skip
    done: dict[int, ProblemResult] = dict(cache.done) if cache is not None else {}
    todo = [(i, p) for i, p in zip(indices, problems) if i not in done]
    bar = None
    if progress:
        desc = progress if isinstance(progress, str) else benchmark
        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=desc, unit="problem")
    counters: dict[str, float] = {}
    try:
        for b in range(0, len(todo), batch_size):
            chunk = todo[b : b + batch_size]
            seeds = [problem_seed(seed, benchmark, i) for i, _ in chunk]
            texts = sample_fn([p for _, p in chunk], [sample_seeds(s, samples) for s in seeds])
            if len(texts) != len(chunk) * samples:
                raise ValueError(f"sample_fn returned {len(texts)} responses for {len(chunk)} x {samples}")
            answers = [p.answer for _, p in chunk for _ in range(samples)]
            scores, extracted, stats = grade_responses(texts, answers, grader)
            for k, v in stats.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    counters[k] = counters.get(k, 0) + v
            for j, ((i, p), s) in enumerate(zip(chunk, seeds)):
                rows = range(j * samples, (j + 1) * samples)
                res = ProblemResult(
                    i,
                    p.uid,
                    p.answer,
                    s,
                    [{"response": texts[r], "extracted": extracted[r], "score": scores[r]} for r in rows],
                )
                done[i] = res
                if cache is not None:
                    cache.add(res)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    results = [done[i] for i in indices]
    per_problem = [r.score for r in results]
    acc, se = mean_and_stderr(per_problem)
    # As the grader counts it: no box, an unclosed box, or an empty one.
    no_box = sum(not (s["extracted"] or "").strip() for r in results for s in r.samples) / (
        len(results) * samples
    )
    return EvalResult(acc, se, per_problem, results, samples, no_box, counters, len(todo))
