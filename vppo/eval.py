"""Average accuracy@n on the paper's benchmarks and the synthetic set (vppo.md section 6).

    python -m vppo.eval --model PATH --benchmarks all --data-dir DIR          # avg@8, T=1.0
    python -m vppo.eval --model tiny --benchmarks synth                       # the embedded default

Per problem, n samples (default 8) at temperature 1.0 (top_p 1.0, top_k 50, 2048 new tokens, as in
the authors' harness), graded by the training reward's boxed-answer grader; the score of a problem
is the mean over its samples, a benchmark's avg@n the mean over its problems, reported with the
standard error over problems; "Avg" is the mean over the paper benchmarks evaluated.

The training loop's validation calls `evaluate_problems` too, so both share prompts, sampling and
grading. What makes a number reproducible:
- every sample draws from its own generator, seeded from (seed, benchmark, problem row, sample): the
  responses do not depend on the batch size, on the order problems are generated in, or on a resume
  (bar floating-point differences of padded batches on a GPU);
- the generation config carries no hidden defaults: repetition penalty 1.0 unless asked for, since
  `generate` would otherwise take the checkpoint's generation_config.json values (Qwen2.5-VL-7B-
  Instruct ships repetition_penalty 1.05, top_k 1);
- each finished problem is appended to `OUT/cache/<benchmark>.jsonl` (a header line holds the settings
  key; a run with other settings refuses the cache instead of mixing; a changed grader re-grades the
  cached responses), so a killed run resumes without regenerating; `OUT/manifest.json` records model
  and data hashes, prompt template, sampling parameters, seed, grader version and package versions.

The prompt is the problem text followed by a suffix: `--prompt-suffix`, else the one a model folder
records in vppo_prompt.json (written by vppo.tiny and by the training export), else the released VPPO
suffix.

Outputs in OUT: results.md (tables, beside the paper's numbers when the model is Qwen2.5-VL-7B or
VPPO-7B), samples.json (every response, its extracted answer and grade), manifest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vppo.benchmarks import PAPER_AVG, PAPER_BENCHMARKS, PAPER_RESULTS, TITLES, Benchmark
from vppo.data import (
    PROMPT_SUFFIX,
    Problem,
    encode_prompts,
    load_prompt_suffix,
    render_prompt,
    vision_token_ids,
)
from vppo.rollout import GenSettings, generate

# The authors' evaluation settings (vppo.md section 6).
EVAL_GEN = GenSettings(temperature=1.0, top_p=1.0, top_k=50, max_new_tokens=2048)
CACHE_VERSION = 1

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
        from transformers import (
            LogitsProcessorList,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

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
        from transformers import LogitsProcessorList

        cfg = copy.deepcopy(generation_config)
        cfg.repetition_penalty = self.repetition_penalty
        cfg.no_repeat_ngram_size = 0
        return self.model.generate(
            generation_config=cfg, logits_processor=LogitsProcessorList([self.sampler]), **kwargs
        )


def eos_ids_of(model, tokenizer) -> list[int]:
    """EOS ids: the tokenizer's, <|im_end|> and <|endoftext|>, and the generation config's, all
    inside the vocabulary (a small model may keep Qwen's out-of-range defaults in its config)."""
    vocab = len(tokenizer)
    ids = {tokenizer.eos_token_id}
    ids |= {
        tokenizer.convert_tokens_to_ids(t)
        for t in ("<|im_end|>", "<|endoftext|>")
        if t in tokenizer.get_vocab()
    }
    gc = getattr(model, "generation_config", None)
    extra = getattr(gc, "eos_token_id", None) if gc is not None else None
    ids |= set(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    return sorted(i for i in ids if i is not None and 0 <= i < vocab)


def rollout_sampler(
    model, processor, gen: GenSettings, *, repetition_penalty: float = 1.0, suffix: str | None = PROMPT_SUFFIX
) -> SampleFn:
    """The default SampleFn: the processor's left-padded prompts (vppo.data, `suffix` after the problem
    text), rollout.generate() (the training loop's sampling code) with one seeded generator per sample."""
    tok = processor.tokenizer
    eos = eos_ids_of(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    suppress = vision_token_ids(processor)
    vision_start = tok.convert_tokens_to_ids("<|vision_start|>")

    def sample(problems: Sequence[Problem], seeds: list[list[int]]) -> list[str]:
        n = len(seeds[0])
        inputs = encode_prompts(problems, processor, suffix)
        sampler = SeededSampler([s for row in seeds for s in row], gen)
        ro = generate(
            _SeededModel(model, sampler, repetition_penalty),
            inputs,
            n,
            gen,
            eos_ids=eos,
            pad_id=pad,
            suppress_ids=suppress,
            vision_start_id=vision_start,
            tokenizer=tok,
        )
        return ro.texts

    return sample


# ----------------------------------------------------------------------------------------------------
# grading (the training reward's grader)


def grade_responses(responses: list[str], answers: list[str]) -> tuple[list[float], list[str | None], dict]:
    """(scores, extracted answers or None, grader counters) with vppo.reward, the training reward."""
    from vppo import reward

    scores, stats = reward.grade(responses, answers)
    extracted = [reward.extract_boxed(reward.collapse_ops(r)) for r in responses]
    counters = stats.as_dict() if hasattr(stats, "as_dict") else dict(stats)
    # Counts add up over batches; ratios (accuracy) do not.
    counters = {k: v for k, v in counters.items() if not k.endswith("accuracy")}
    return [float(s) for s in scores], extracted, counters


def grader_version() -> dict:
    """The grader's declared version (if any) and a hash of its source, so an edit shows."""
    from vppo import reward

    src = Path(reward.__file__).read_bytes()
    return {
        "module": "vppo.reward (mathruler grade_answer behind the project's normalisation)",
        "version": str(getattr(reward, "GRADER_VERSION", getattr(reward, "__version__", "unversioned"))),
        "source_sha256": hashlib.sha256(src).hexdigest(),
        "mathruler": _version("mathruler"),
    }


def grader_agreement(results: Sequence[ProblemResult]) -> dict:
    """How often the boxed-answer grader and math-verify agree on these samples (vppo.reward)."""
    from vppo import reward

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
            scores, extracted, _ = grade_responses(responses, [r.answer for r in results for _ in r.samples])
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
    Returns: EvalResult (accuracy and stderr as fractions in [0, 1]).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not problems:
        raise ValueError("problems must not be empty")
    indices = [int(p.meta.get("row", i)) for i, p in enumerate(problems)]
    if len(set(indices)) != len(indices):
        raise ValueError("problems: duplicate row indices (meta['row']); seeds would repeat")
    sample_fn = sample_fn or rollout_sampler(
        model, processor, gen, repetition_penalty=repetition_penalty, suffix=suffix
    )
    done: dict[int, ProblemResult] = dict(cache.done) if cache is not None else {}
    todo = [(i, p) for i, p in zip(indices, problems) if i not in done]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        desc = progress if isinstance(progress, str) else benchmark
        bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=desc, unit="problem")
    grader: dict[str, float] = {}
    try:
        for b in range(0, len(todo), batch_size):
            chunk = todo[b : b + batch_size]
            seeds = [problem_seed(seed, benchmark, i) for i, _ in chunk]
            texts = sample_fn([p for _, p in chunk], [sample_seeds(s, samples) for s in seeds])
            if len(texts) != len(chunk) * samples:
                raise ValueError(f"sample_fn returned {len(texts)} responses for {len(chunk)} x {samples}")
            answers = [p.answer for _, p in chunk for _ in range(samples)]
            scores, extracted, stats = grade_responses(texts, answers)
            for k, v in stats.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    grader[k] = grader.get(k, 0) + v
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
    return EvalResult(acc, se, per_problem, results, samples, no_box, grader, len(todo))


# ----------------------------------------------------------------------------------------------------
# hashes and the manifest


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def model_hashes(path: str | os.PathLike, memo: str | os.PathLike | None = None) -> dict:
    """sha256 of every config, tokenizer and weight file of a local model folder, and of them all.

    `memo`: a JSON file remembering (size, mtime) -> sha256 per file, so a resumed evaluation of a
    15 GB checkpoint does not read it again; a file whose size or mtime changed is hashed anew."""
    root = Path(path)
    if not root.is_dir():
        return {"combined": None, "files": {}, "note": f"{path} is not a local folder"}
    known = {}
    if memo is not None and Path(memo).is_file():
        with contextlib.suppress(json.JSONDecodeError, OSError):
            known = json.loads(Path(memo).read_text())
    exts = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".py")
    files, seen = {}, {}
    for p in sorted(root.rglob("*")):
        if not (p.is_file() and p.suffix in exts):
            continue
        st, name = p.stat(), p.relative_to(root).as_posix()
        stamp = [str(p.resolve()), st.st_size, st.st_mtime_ns]
        hit = known.get(name)
        files[name] = hit["sha256"] if hit and hit.get("stamp") == stamp else _sha256_file(p)
        seen[name] = {"stamp": stamp, "sha256": files[name]}
    if memo is not None:
        Path(memo).write_text(json.dumps(seen, indent=1))
    combined = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    return {"combined": combined, "files": files}


def problems_hash(problems: Sequence[Problem]) -> str:
    """sha256 over every problem's text, answer and image bytes, in order (layout-independent)."""
    from vppo.data import open_image

    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.uid, p.problem, p.answer]).encode())
        for src in p.images:
            if isinstance(src, bytes):
                h.update(src)
            elif isinstance(src, str):
                h.update(Path(src).read_bytes())
            else:
                h.update(open_image(src).tobytes())
    return h.hexdigest()


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def package_versions() -> dict:
    names = (
        "torch",
        "transformers",
        "tokenizers",
        "mathruler",
        "math-verify",
        "sympy",
        "pillow",
        "numpy",
        "vppo",
    )
    out = {n: _version(n) for n in names}
    out["python"] = platform.python_version()
    out["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    try:
        repo = Path(__file__).resolve().parents[1]
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        out["git_commit"] = head.stdout.strip() or None
        out["git_dirty"] = bool(dirty.stdout.strip())
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def prompt_template(processor, example: Problem | None, suffix: str | None = PROMPT_SUFFIX) -> dict:
    template = getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", "")
    return {
        "suffix": suffix,
        "chat_template_sha256": hashlib.sha256((template or "").encode()).hexdigest(),
        "example": render_prompt(example, processor, suffix) if example is not None else None,
    }


# ----------------------------------------------------------------------------------------------------
# reporting


def paper_model(model_path: str) -> str | None:
    """'Qwen2.5-VL-7B' or 'VPPO-7B' when the path names one of the paper's models, else None."""
    name = re.sub(r"[^a-z0-9.]", "", str(model_path).lower())
    if "vppo7b" in name:
        return "VPPO-7B"
    if "qwen2.5vl7b" in name:
        return "Qwen2.5-VL-7B"
    return None


def _avg(summary: dict[str, dict]) -> tuple[float, float, list[str]]:
    """Mean over the paper benchmarks evaluated (all evaluated if none is a paper benchmark), its
    standard error (benchmarks independent), and the names averaged."""
    names = [k for k in summary if k in PAPER_BENCHMARKS] or list(summary)
    mean = sum(summary[k]["accuracy"] for k in names) / len(names)
    se = math.sqrt(sum(summary[k]["stderr"] ** 2 for k in names)) / len(names)
    return mean, se, names


def markdown_report(summary: dict[str, dict], model_label: str, paper: str | None) -> str:
    """The results table (avg@n in %, ± standard error), the paper's rows when they apply, and a
    per-benchmark detail table."""
    order = [k for k in TITLES if k in summary] + [k for k in summary if k not in TITLES]
    n = next(iter(summary.values()))["samples"]
    mean, se, averaged = _avg(summary)
    head = "| model | " + " | ".join(TITLES.get(k, k) for k in order) + " | Avg |"
    lines = [f"## avg@{n} (%), ± standard error over problems", "", head, "|---" * (len(order) + 2) + "|"]
    cells = [f"{100 * summary[k]['accuracy']:.1f} ± {100 * summary[k]['stderr']:.1f}" for k in order]
    lines.append(f"| {model_label} | " + " | ".join(cells) + f" | {100 * mean:.1f} ± {100 * se:.1f} |")
    rows = [paper] if paper else []
    for name in rows:
        ref = PAPER_RESULTS[name]
        vals = [ref[k] for k in averaged if k in ref]
        avg = (
            PAPER_AVG[name]
            if len(vals) == len(PAPER_BENCHMARKS)
            else (sum(vals) / len(vals) if vals else None)
        )
        cells = [f"{ref[k]:.1f}" if k in ref else "–" for k in order]
        lines.append(
            f"| {name} (paper, Table 1) | " + " | ".join(cells) + (f" | {avg:.1f} |" if avg else " | – |")
        )
    if set(averaged) != set(PAPER_BENCHMARKS) and any(k in PAPER_BENCHMARKS for k in averaged):
        lines += [
            "",
            f"Avg is over the {len(averaged)} paper benchmarks evaluated here (the paper averages all 8).",
        ]
    lines += [
        "",
        "| benchmark | problems | n | avg@n (%) | s.e. (%) | no \\boxed (%) | grader failures | generated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in order:
        s = summary[k]
        g = s.get("grader", {})
        bad = sum(v for key, v in g.items() if any(w in key for w in ("timeout", "error", "crash")))
        lines.append(
            f"| {TITLES.get(k, k)} | {s['problems']} | {s['samples']} | {100 * s['accuracy']:.2f} | "
            f"{100 * s['stderr']:.2f} | {100 * s['no_box_rate']:.1f} | {bad:g} | {s['generated']} |"
        )
    agree = {k: s["math_verify_agreement"] for k, s in summary.items() if "math_verify_agreement" in s}
    if agree:
        lines += ["", "Boxed-answer grader vs math-verify on the same samples:", ""]
        lines += [
            f"- {TITLES.get(k, k)}: agree on {a['agree']}/{a['n']} ({100 * a['rate']:.1f} %); grader only "
            f"{a['ruler_only']}, math-verify only {a['verify_only']}"
            for k, a in agree.items()
        ]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# the command line


def load_model(path: str, device: str | None = None):
    """The policy for evaluation: bf16 on a GPU, fp32 on a CPU, eval mode."""
    from transformers import AutoModelForImageTextToText

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def image_pixels(processor) -> dict:
    """The processor's image bounds in pixels (transformers 5 keeps them as size[shortest/longest_edge])."""
    ip = processor.image_processor
    size = getattr(ip, "size", None) or {}
    get = lambda k: size.get(k) if isinstance(size, dict) else getattr(size, k, None)  # noqa: E731
    return {
        "min": getattr(ip, "min_pixels", None) or get("min_pixels") or get("shortest_edge"),
        "max": getattr(ip, "max_pixels", None) or get("max_pixels") or get("longest_edge"),
    }


def load_eval_processor(path: str, min_pixels: int | None, max_pixels: int | None):
    """The processor with the image bounds the evaluation uses: explicit values win; a stock
    processor whose max_pixels exceeds the released recipe's gets the recipe's bounds (what the paper
    trained with); a processor saved with smaller bounds (the tiny model, our exports) keeps them."""
    from vppo.data import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, load_processor

    proc = load_processor(path)
    saved = image_pixels(proc)["max"]
    if min_pixels is None and max_pixels is None and saved and saved > DEFAULT_MAX_PIXELS:
        min_pixels, max_pixels = DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS
    return load_processor(path, min_pixels, max_pixels) if (min_pixels or max_pixels) else proc


def _resolve_model(path: str) -> str:
    if path == "tiny":
        from vppo import tiny

        if not hasattr(tiny, "ensure_tiny_model"):
            raise ValueError("--model tiny needs vppo.tiny.ensure_tiny_model()")
        return str(tiny.ensure_tiny_model())
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"--model {path}: not a local model folder")
    return str(Path(path).expanduser())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vppo.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="local model folder, or 'tiny' for the tiny base")
    ap.add_argument("--benchmarks", default="all", help="comma-separated names, or 'all' (the paper's eight)")
    ap.add_argument("--data-dir", default=None, help="folder with dataset_info.json and/or <name>.parquet")
    ap.add_argument("--samples", type=int, default=8, help="samples per problem (avg@n)")
    ap.add_argument("--temperature", type=float, default=EVAL_GEN.temperature)
    ap.add_argument("--top-p", type=float, default=EVAL_GEN.top_p)
    ap.add_argument("--top-k", type=int, default=EVAL_GEN.top_k, help="0 = off")
    ap.add_argument("--max-new-tokens", type=int, default=EVAL_GEN.max_new_tokens)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument(
        "--prompt-suffix",
        default=None,
        help="text after each problem (default: the one recorded in the model folder's "
        "vppo_prompt.json by vppo.train / vppo.tiny, else the released VPPO suffix); '' for none",
    )
    ap.add_argument("--batch-size", type=int, default=8, help="problems per generate call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default runs/eval/<model name>)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    ap.add_argument("--min-pixels", type=int, default=None)
    ap.add_argument("--max-pixels", type=int, default=None)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (1 is fastest for tiny models)"
    )
    ap.add_argument("--fresh", action="store_true", help="discard cached generations in --out")
    ap.add_argument(
        "--strict", action="store_true", help="fail on a broken benchmark row instead of skipping it"
    )
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument(
        "--math-verify", action="store_true", help="also report how often math-verify agrees with the grader"
    )
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    for name in ("samples", "batch_size", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise ValueError(f"--top-k must be >= 0, got {args.top_k}")
    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    return args


def main(argv: list[str] | None = None, *, sample_fn: SampleFn | None = None) -> dict:
    """Run the evaluation; returns {"summary", "manifest", "out"} (also written to --out)."""
    from vppo.benchmarks import describe, load_benchmark, resolve_names

    args = parse_args(argv)
    names = resolve_names(args.benchmarks)  # unknown names fail before anything loads
    benches: list[Benchmark] = [
        load_benchmark(n, args.data_dir, strict=args.strict, limit=args.limit) for n in names
    ]
    model_path = _resolve_model(args.model)
    out = Path(args.out or Path("runs") / "eval" / Path(model_path).name)
    out.mkdir(parents=True, exist_ok=True)
    gen = GenSettings(args.temperature, args.top_p, args.top_k, args.max_new_tokens)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    processor = load_eval_processor(model_path, args.min_pixels, args.max_pixels)
    suffix = args.prompt_suffix if args.prompt_suffix is not None else load_prompt_suffix(model_path)
    model = None if sample_fn is not None else load_model(model_path, args.device)
    t0 = time.time()
    hashes = model_hashes(model_path, memo=out / "model_hashes.json")
    manifest = {
        "command": [sys.argv[0], *(argv if argv is not None else sys.argv[1:])],
        "model": {
            "path": str(Path(model_path).resolve()),
            "sha256": hashes["combined"],
            "files": hashes["files"],
        },
        "device": str(next(model.parameters()).device) if model is not None else None,
        "dtype": str(next(model.parameters()).dtype) if model is not None else None,
        "sampling": {**asdict(gen), "samples": args.samples, "repetition_penalty": args.repetition_penalty},
        "seed": args.seed,
        "seeding": "per sample: sha256('vppo-eval', seed, benchmark, row) then sha256(problem seed, sample)",
        "batch_size": args.batch_size,
        "image_pixels": image_pixels(processor),
        "prompt": prompt_template(processor, benches[0].problems[0], suffix),
        "grader": grader_version(),
        "packages": package_versions(),
        "data": {
            b.name: {
                **d,
                "files_sha256": {str(f): _sha256_file(f) for f in b.files},
                "problems_sha256": problems_hash(b.problems),
            }
            for b, d in zip(benches, describe(benches))
        },
        "limit": args.limit,
    }
    summary: dict[str, dict] = {}
    all_samples: dict[str, list] = {}
    for b in benches:
        key = {
            "cache_version": CACHE_VERSION,
            "benchmark": b.name,
            "model_sha256": hashes["combined"],
            "sampling": manifest["sampling"],
            "seed": args.seed,
            "prompt": {k: manifest["prompt"][k] for k in ("suffix", "chat_template_sha256")},
            "image_pixels": manifest["image_pixels"],
            # The source files' contents (not their paths, not the limited problem list): a moved data
            # folder or a larger --limit reuses the cache.
            "files_sha256": sorted(manifest["data"][b.name]["files_sha256"].values()),
        }
        cache_path = out / "cache" / f"{b.name}.jsonl"
        if args.fresh and cache_path.exists():
            cache_path.unlink()
        cache = ProblemCache(cache_path, key, grader=manifest["grader"])
        if cache.regraded:
            print(f"{b.title}: re-graded {cache.regraded} cached problems with the current grader")
        res = evaluate_problems(
            model,
            processor,
            b.problems,
            samples=args.samples,
            gen=gen,
            seed=args.seed,
            benchmark=b.name,
            batch_size=args.batch_size,
            repetition_penalty=args.repetition_penalty,
            suffix=suffix,
            cache=cache,
            progress=False if args.no_progress else b.title,
            sample_fn=sample_fn,
        )
        summary[b.name] = res.summary()
        if args.math_verify:
            summary[b.name]["math_verify_agreement"] = grader_agreement(res.results)
        all_samples[b.name] = [{**asdict(r), "score": r.score} for r in res.results]
    mean, se, averaged = _avg(summary)
    label = Path(model_path).name
    report = markdown_report(summary, label, paper_model(model_path))
    skipped = [f"{b.title}: {b.skipped_in_limit}" for b in benches if b.skipped_in_limit]
    if args.limit is not None and skipped:
        report += f"\n--limit {args.limit}: broken rows skipped to reach it ({', '.join(skipped)}).\n"
    manifest["results"] = {"benchmarks": summary, "avg": {"accuracy": mean, "stderr": se, "over": averaged}}
    manifest["wall_seconds"] = round(time.time() - t0, 1)
    (out / "results.md").write_text(report)
    (out / "samples.json").write_text(json.dumps(all_samples, indent=1, ensure_ascii=False))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False, default=str))
    print(report)
    print(f"wrote {out}/results.md, samples.json, manifest.json")
    return {"summary": summary, "avg": (mean, se), "manifest": manifest, "out": out, "report": report}


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # bad arguments and missing files: one clear line, no traceback
        sys.exit(f"error: {e}")
