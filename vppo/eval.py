"""Average accuracy@n on the paper's benchmarks and the synthetic set (docs/algorithm.md section 6).

    python -m vppo.eval --model PATH --benchmarks all --data-dir DIR          # avg@8, T=1.0
    python -m vppo.eval --model tiny --benchmarks synth                       # the embedded default
    python -m vppo.eval --check-data --data-dir DIR --benchmarks all          # the data only, no model

DIR is a PAPO-Eval checkout holding chamber111/VPPO-Eval's `data/` folder (or that `data/` folder),
or a folder of the benchmarks' own releases as `hf download` names them; `--benchmark-path NAME=PATH`
gives one release by itself, `--split NAME=SPLIT` picks its split / config / variants (vppo.benchmarks,
vppo.datasets, docs/data.md). `--check-data` loads and checks the data without a model: per benchmark
the layout and files found, rows, broken rows and why, images, answer kinds, one prompt; it exits
non-zero when a requested benchmark is missing or empty.

Per problem, n samples (default 8) at temperature 1.0 (top_p 1.0, top_k 50, 2048 new tokens, as in
the authors' harness), graded by the training reward's boxed-answer grader (`--grader project`) or
exactly as the authors' harness grades (`--grader released`: mathruler's grade_answer on the last
boxed content, PAPO-Eval's eval_utils.py); the score of a problem is the mean over its samples, a
benchmark's avg@n the mean over its problems, reported with the standard error over problems; "Avg"
is the mean over the paper benchmarks evaluated. A row whose image the processor refuses (an aspect
ratio over 200) is skipped, counted and named, and the evaluation goes on.

The sampling, grading and cache are vppo.evaluate's `evaluate_problems`, which the training loop's
validation calls too, so both share prompts, sampling and grading; the manifest's hashes and versions
come from vppo.provenance, results.md from vppo.report. What makes a number reproducible:
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
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from vppo import bases, spotlight
from vppo.benchmarks import (
    Benchmark,
    check_benchmark,
    check_report,
    describe,
    load_benchmark,
    resolve_names,
)
from vppo.config import vllm_missing
from vppo.data import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_PIXELS,
    PROMPT_SUFFIX,
    BrokenRowWarning,
    image_token_count,
    load_processor,
    load_prompt_suffix,
)
from vppo.evaluate import (
    CACHE_VERSION,
    EVAL_GEN,
    GRADERS,
    ProblemCache,
    SampleFn,
    evaluate_problems,
    grader_agreement,
    vllm_sampler,
)
from vppo.provenance import (
    grader_version,
    model_hashes,
    package_versions,
    problems_hash,
    prompt_template,
    sha256_file,
)
from vppo.report import _avg, markdown_report, paper_model, write_outputs
from vppo.rollout import GenSettings
from vppo.synth import VISUAL_PATTERNS

# ----------------------------------------------------------------------------------------------------
# the command line


def load_model(path: str, device: str | None = None):
    """The policy for evaluation: bf16 on a GPU, fp32 on a CPU, eval mode."""
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
    proc = load_processor(path)
    saved = image_pixels(proc)["max"]
    if min_pixels is None and max_pixels is None and saved and saved > DEFAULT_MAX_PIXELS:
        min_pixels, max_pixels = DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS
    return load_processor(path, min_pixels, max_pixels) if (min_pixels or max_pixels) else proc


def _resolve_model(path: str) -> str:
    if path == "tiny":  # the shipped base of the embedded default (bases/tiny, sha256 checked)
        return str(bases.shipped_base("default"))
    if not Path(path).expanduser().is_dir():
        raise ValueError(f"--model {path}: not a local model folder")
    return str(Path(path).expanduser())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m vppo.eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="local model folder, or 'tiny' (bases/tiny)")
    ap.add_argument(
        "--benchmarks", default="all",
        help="comma-separated names (also the authors' entry names, e.g. "
        "AI4Math_MathVerse_vision_dependent), or 'all' (the paper's eight)",
    )  # fmt: skip
    ap.add_argument(
        "--data-dir", default=None,
        help="a PAPO-Eval checkout or its data/ folder (dataset_info.json), and/or the benchmarks' own "
        "releases in folders named as hf download names them, and/or <name>.parquet",
    )  # fmt: skip
    ap.add_argument(
        "--benchmark-path", action="append", default=[], metavar="NAME=PATH",
        help="one benchmark's own release (a folder as downloaded, or one file); repeatable",
    )  # fmt: skip
    ap.add_argument(
        "--split", action="append", default=[], metavar="NAME=SPLIT",
        help="split / config / variants of a benchmark's own release (e.g. mathvision=testmini, "
        "mmmu_pro=vision, dynamath=1,2); repeatable",
    )  # fmt: skip
    ap.add_argument(
        "--check-data", action="store_true",
        help="load and check the benchmarks without a model; exit non-zero when one is missing or empty",
    )  # fmt: skip
    ap.add_argument(
        "--grader", choices=GRADERS, default="project",
        help="project: the training reward's grader; released: exactly the authors' harness "
        "(mathruler grade_answer on the last boxed content)",
    )  # fmt: skip
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
    ap.add_argument(
        "--regroup-after", type=int, default=0, metavar="K",
        help="hf engine: rows still running after K tokens are finished on their own, so one response "
        "that never stops does not hold its whole batch to --max-new-tokens (the same responses: each "
        "row is seeded on its own); 0: off",
    )  # fmt: skip
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default runs/eval/<model name>)")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark")
    ap.add_argument("--min-pixels", type=int, default=None)
    ap.add_argument("--max-pixels", type=int, default=None)
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument(
        "--engine", choices=("hf", "vllm"), default="hf", help="sampling engine (vllm: vppo.vllm_engine)"
    )
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.8, help="--engine vllm on a GPU")
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
    ap.add_argument(
        "--spotlight", type=int, default=0,
        help="also the dependency precision / recall (vppo.spotlight) on the first N problems with "
        "known visual spans",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.model is None and not args.check_data:
        raise ValueError("--model is required (or --check-data to check the data without one)")
    args.benchmark_path = _pairs(args.benchmark_path, "--benchmark-path")
    args.split = _pairs(args.split, "--split")
    if args.engine == "vllm" and vllm_missing():  # before the benchmarks and the processor load
        ap.error(vllm_missing().replace("rollout.engine=vllm", "--engine vllm"))
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.regroup_after < 0:
        raise ValueError(f"--regroup-after must be >= 0 (0: off), got {args.regroup_after}")
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
    if args.engine == "vllm" and args.repetition_penalty != 1.0:
        raise ValueError("--engine vllm samples with repetition penalty 1.0 only")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise ValueError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    return args


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ValueError(f"{flag} takes NAME=VALUE, got {item!r}")
        out[name.strip()] = value.strip()
    return out


def drop_refused_images(bench: Benchmark, processor, strict: bool = False) -> list[str]:
    """Skip the problems whose images the processor refuses (Qwen2-VL: an aspect ratio over 200),
    counted as broken rows and named; ValueError when none is left (or, `strict`, at the first)."""
    refused, keep = [], []
    for p in bench.problems:
        try:
            for w, h in p.image_sizes:
                image_token_count(processor, w, h)
            keep.append(p)
        except ValueError as e:
            refused.append(f"row {p.meta['row']}: the processor refuses its image ({e})")
            if strict:
                raise ValueError(f"benchmark {bench.title}: broken {refused[-1]}") from e
    if refused:
        bench.problems = keep
        bench.broken = sorted(bench.broken + refused, key=lambda b: int(b.split(":")[0].split()[1]))
        bench.stats.broken += len(refused)
        print(f"{bench.title}: skipped {len(refused)} row(s) the processor refuses; the first: {refused[0]}")
        if not keep:
            raise ValueError(
                f"benchmark {bench.title}: no problem left; every row's image is refused ({refused[0]})"
            )
    return refused


def check_data(args, names: list[str]) -> dict:
    """--check-data: load and check every requested benchmark; no model."""
    checks, errors = [], {}
    suffix = args.prompt_suffix if args.prompt_suffix is not None else PROMPT_SUFFIX
    for n in names:
        try:
            with warnings.catch_warnings():  # the broken rows are in the report, with their reasons
                warnings.simplefilter("ignore", BrokenRowWarning)
                b = load_benchmark(
                    n, args.data_dir, strict=False, paths=args.benchmark_path, splits=args.split
                )
            checks.append(check_benchmark(b, suffix))
        except ValueError as e:
            errors[n] = str(e)
    report = check_report(checks, errors)
    print(report, end="")
    ok = not errors
    print("data check: " + ("all benchmarks found" if ok else f"{len(errors)} benchmark(s) missing or empty"))
    return {"check": checks, "errors": errors, "ok": ok, "report": report}


def _vllm_sample_fn(args, model_path: str, processor, benches, gen: GenSettings, suffix) -> SampleFn:
    """--engine vllm: one vLLM engine (bf16 on a GPU, fp32 on a CPU, as load_model) behind a SampleFn,
    with the special token ids vppo.tokens reads for the hf engine (EOS from the generation config)."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from vppo.tokens import token_ids
    from vppo.vllm_engine import VLLMEngine

    has_gc = (Path(model_path) / "generation_config.json").is_file()
    gc = GenerationConfig.from_pretrained(model_path, local_files_only=True) if has_gc else None
    ids = token_ids(SimpleNamespace(generation_config=gc), processor)
    px = image_pixels(processor)
    engine = VLLMEngine(
        model_path, processor, ids, dtype="bfloat16" if torch.cuda.is_available() else "float32",
        max_model_len=None, max_images=max(1, max(len(p.images) for b in benches for p in b.problems)),
        seed=args.seed, gpu_memory_utilization=args.gpu_memory_utilization, min_pixels=px["min"],
        max_pixels=px["max"],
    )  # fmt: skip
    return vllm_sampler(engine, processor, gen, suffix=suffix)


def main(argv: list[str] | None = None, *, sample_fn: SampleFn | None = None) -> dict:
    """Run the evaluation; returns {"summary", "manifest", "out"} (also written to --out)."""
    args = parse_args(argv)
    names = resolve_names(args.benchmarks)  # unknown names fail before anything loads
    if args.check_data:
        return check_data(args, names)
    benches: list[Benchmark] = [
        load_benchmark(
            n,
            args.data_dir,
            strict=args.strict,
            limit=args.limit,
            paths=args.benchmark_path,
            splits=args.split,
        )
        for n in names
    ]
    model_path = _resolve_model(args.model)
    out = Path(args.out or Path("runs") / "eval" / Path(model_path).name)
    out.mkdir(parents=True, exist_ok=True)
    gen = GenSettings(args.temperature, args.top_p, args.top_k, args.max_new_tokens)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    processor = load_eval_processor(model_path, args.min_pixels, args.max_pixels)
    for b in benches:  # before any generation: one refused image must not abort the run (issue 26)
        drop_refused_images(b, processor, strict=args.strict)
    suffix = args.prompt_suffix if args.prompt_suffix is not None else load_prompt_suffix(model_path)
    if sample_fn is None and args.engine == "vllm":
        sample_fn = _vllm_sample_fn(args, model_path, processor, benches, gen, suffix)
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
        "sampling": {
            **asdict(gen),
            "samples": args.samples,
            "repetition_penalty": args.repetition_penalty,
            **({"engine": "vllm"} if args.engine == "vllm" else {}),
        },  # fmt: skip
        "seed": args.seed,
        "seeding": "per sample: sha256('vppo-eval', seed, benchmark, row) then sha256(problem seed, sample)",
        "batch_size": args.batch_size,
        "regroup_after": args.regroup_after,
        "image_pixels": image_pixels(processor),
        "prompt": prompt_template(processor, benches[0].problems[0], suffix),
        "grader": {**grader_version(), "name": args.grader},
        "packages": package_versions(),
        "data": {
            b.name: {
                **d,
                "files_sha256": {str(f): sha256_file(f) for f in b.files},
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
            grader=args.grader,
            regroup_after=args.regroup_after,
        )
        summary[b.name] = res.summary()
        if args.math_verify:
            summary[b.name]["math_verify_agreement"] = grader_agreement(res.results)
        all_samples[b.name] = [{**asdict(r), "score": r.score} for r in res.results]
    mean, se, averaged = _avg(summary)
    label = Path(model_path).name
    report = markdown_report(summary, label, paper_model(model_path), grader=args.grader)
    skipped = [f"{b.title}: {b.skipped_in_limit}" for b in benches if b.skipped_in_limit]
    if args.limit is not None and skipped:
        report += f"\n--limit {args.limit}: broken rows skipped to reach it ({', '.join(skipped)}).\n"
    manifest["results"] = {"benchmarks": summary, "avg": {"accuracy": mean, "stderr": se, "over": averaged}}
    spot = [p for b in benches for p in b.problems if p.meta.get("task") in VISUAL_PATTERNS][: args.spotlight]
    if spot and model is not None:  # the visual-dependency diagnostic (issue 15)
        manifest["spotlight"] = spotlight.diagnose(model_path, spot, suffix=suffix)
        report += spotlight.report_line(manifest["spotlight"])
    manifest["wall_seconds"] = round(time.time() - t0, 1)
    write_outputs(out, report, all_samples, manifest)
    print(report)
    print(f"wrote {out}/results.md, samples.json, manifest.json")
    return {"summary": summary, "avg": (mean, se), "manifest": manifest, "out": out, "report": report}


if __name__ == "__main__":
    try:
        result = main()
    except ValueError as e:  # bad arguments and missing files: one clear line, no traceback
        sys.exit(f"error: {e}")
    if result.get("ok") is False:  # --check-data found a requested benchmark missing or empty
        sys.exit(1)
