"""The embedded tiny base model: a few-million-parameter Qwen2.5-VL that loads like the 7B one
(or, `--family qwen3_vl`, a Qwen3-VL that loads like the 8B one: vppo/models/qwen3_vl.py).

    python -m vppo.tiny                     # build (or find in the cache) and print the path
    python -m vppo.tiny --family qwen3_vl   # the Qwen3-VL base (a run's model.tiny_family)

Pieces, all standard Qwen2.5-VL classes saved with save_pretrained, so AutoProcessor.from_pretrained
and Qwen2_5_VLForConditionalGeneration.from_pretrained read them exactly as they read
Qwen2.5-VL-7B-Instruct from a local folder:
- tokenizer: a byte-level BPE trained on the synthetic set's text with Qwen2's pre-tokenizer, the
  Qwen2.5-VL special tokens and chat template (Qwen2Tokenizer);
- processor: Qwen2_5_VLProcessor with the Qwen2-VL image processor, small min / max pixels;
- model: Qwen2_5_VLForConditionalGeneration, about 2 M parameters (text: hidden 128, 4 layers,
  4 heads, 2 KV heads, untied lm_head as in the 7B; vision: depth 2, hidden 128, patch 14, merge 2);
- generation config: eos <|im_end|> and <|endoftext|>, pad <|endoftext|> (as the 7B's).
The Qwen3-VL base (TinyConfig.family) has the same sizes and warm start, built by its family module
(Qwen3VLProcessor, patch 16 on a 32-px grid with images of 64-96 px a side, DeepStack from both
vision layers, the Instruct template without a default system turn).

Warm start: supervised next-token training on the synthetic train split (vppo.synth), loss on the
`<think> ... </think> \\boxed{...}` response and its <|im_end|> only, prompts left-padded as
vppo.data builds them for generation. Every second step trains instead on the bare image + question
(no system prompt, no suffix; 4x the rows for the same cost): with 9 image tokens among ~20 rather
than ~75, the model starts using the image sooner. Accuracy then rises fast and in jumps, so the run
does not stop after a fixed number of steps: every `eval_every` steps it samples one answer for each
of `eval_problems` val problems at temperature 1.0 (the chat format only); a probe inside
[stop_low, stop_high] triggers a measurement on all of val, which ends the run when inside `accept`;
a measurement above stop_high rolls back to the previous evaluation point and continues with half
the learning rate and twice as frequent measurements. Tasks of mixed difficulty (vppo.synth) keep
some questions hard, so groups of sampled answers get mixed rewards. The val accuracy (the one that
stopped the run, so slightly optimistic), the test accuracy and the text-only baseline go to
warm_start.json.

The warm start stops at the low end of the band (accept 0.2-0.3): a short build, and RL then works on
visual skills the model is still acquiring (colour of one of several shapes, bar heights, counts). The
prompt suffix of the chat format (`TinyConfig.prompt_suffix`, the released VPPO suffix by default) is
recorded beside the weights (vppo.data.PROMPT_FILE), where vppo.eval and vppo.train look for it.

The build is cached under vppo.paths (a folder named by the hash of TinyConfig, the synthetic set's
config and the code versions) and rebuilt when any of those change: `ensure_tiny_model()`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import jinja2
import torch
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
from tokenizers.models import BPE
from transformers import AddedToken, Qwen2Tokenizer
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

from vppo import paths
from vppo.data import (
    PROMPT_SUFFIX,
    Problem,
    build_messages,
    encode_prompts,
    load_problems,
    save_prompt_suffix,
    vision_token_ids,
)
from vppo.models import Size, family, supported
from vppo.models.qwen2_5_vl import CHAT_TEMPLATE as QWEN2_5_VL_TEMPLATE
from vppo.provenance import package_versions
from vppo.synth import SYNTH_VERSION, SynthConfig, ensure_synth_data

logger = logging.getLogger(__name__)

TINY_VERSION = 1  # bump when the code below changes what gets built: the cache key includes it
INFO_FILE = "warm_start.json"

# Qwen2.5-VL's special tokens in their original order (ids 151643... there, 0... here).
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The Qwen2-VL / Qwen2.5-VL-Instruct chat template (each family's lives in vppo.models).
CHAT_TEMPLATE = QWEN2_5_VL_TEMPLATE
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: str = QWEN2_5_VL_TEMPLATE):
    """A Qwen2Tokenizer whose byte-level BPE is trained on `texts` (full chat-template renders are best).

    Same normaliser, pre-tokenizer (digits split one by one) and decoder as Qwen2; the Qwen2.5-VL
    special tokens take ids 0..13; eos <|im_end|>, pad <|endoftext|> as in Qwen2.5-VL-7B-Instruct.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} (bytes + specials)")
    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Special tokens are never merged with text: train on the pieces between them.
    pieces = (piece for text in texts for piece in _SPECIAL_RE.split(text) if piece)
    bpe.train_from_iterator(pieces, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(
        vocab=model["vocab"], merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.chat_template = chat_template
    return tok


def _corpus(
    problems: Sequence[Problem], suffix: str | None = PROMPT_SUFFIX, chat_template: str = QWEN2_5_VL_TEMPLATE
) -> list[str]:
    """The texts the model will read: rendered prompts (chat template, suffix) and responses."""
    template = jinja2.Environment(trim_blocks=True, lstrip_blocks=True).from_string(chat_template)
    prompts = [
        template.render(messages=build_messages(p, suffix), add_generation_prompt=True) for p in problems
    ]
    return [f"{q}{p.meta['response']}<|im_end|>\n" for q, p in zip(prompts, problems)]


def build_processor(
    tokenizer, min_pixels: int = 56 * 56, max_pixels: int = 84 * 84, family_name: str = "qwen2_5_vl"
):
    """The family's processor around `tokenizer` (Qwen2.5-VL: the Qwen2-VL image and video processors,
    patch 14, merge 2; Qwen3-VL: patch 16, merge 2)."""
    if min_pixels > max_pixels:
        raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
    return family(family_name).build_processor(tokenizer, min_pixels, max_pixels)


@dataclass(frozen=True)
class TinyConfig:
    """Everything the tiny base depends on (its hash names the cache folder)."""

    synth: SynthConfig = field(default_factory=SynthConfig)
    family: str = "qwen2_5_vl"  # a vppo.models model_type
    vocab_size: int = 512
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vision_depth: int = 2
    vision_hidden_size: int = 128
    vision_intermediate_size: int = 256
    vision_heads: int = 4
    min_pixels: int = 56 * 56
    max_pixels: int = 84 * 84
    # warm start
    seed: int = 0
    lr: float = 2e-3
    vision_lr_mult: float = 1.0
    short_every: int = 2  # every n-th step trains on the bare image + question (0: never)
    warmup_steps: int = 20
    batch_size: int = 16
    max_steps: int = 3000
    eval_every: int = 25
    eval_problems: int = 80  # val problems sampled at each measurement (all of val at the end)
    # A probe inside [stop_low, stop_high] triggers a measurement on all of val, which stops the run when
    # inside `accept` (a margin inside `band`). The low end of the band: the warm start is short (425
    # steps) and RL has the visual tasks the model is still learning to work on.
    stop_low: float = 0.2
    stop_high: float = 0.32
    accept: tuple[float, float] = (0.2, 0.3)
    band: tuple[float, float] = (0.2, 0.6)
    max_new_tokens: int = 32
    time_budget_s: float = 1200.0  # warm start gives up (and says so) past this
    prompt_suffix: str | None = PROMPT_SUFFIX  # ends the chat prompt (a run's data.prompt_suffix)

    def __post_init__(self):
        family(self.family)  # an unsupported family is an error naming the supported ones
        if not (0 < self.band[0] <= self.stop_low <= self.stop_high <= self.band[1] < 1):
            raise ValueError("need 0 < band[0] <= stop_low <= stop_high <= band[1] < 1")
        if not (self.band[0] <= self.accept[0] <= self.accept[1] <= self.band[1]):
            raise ValueError("need band[0] <= accept[0] <= accept[1] <= band[1]")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ValueError("hidden_size / num_heads must be a multiple of 4 (the 3-D rope sections)")
        for name in ("batch_size", "max_steps", "eval_every", "eval_problems", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")


def build_model(cfg: TinyConfig, tokenizer):
    """A randomly initialised model of cfg.family sized by `cfg`, ids from `tokenizer`."""
    size = Size(
        hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, layers=cfg.num_layers,
        heads=cfg.num_heads, kv_heads=cfg.num_kv_heads, vision_depth=cfg.vision_depth,
        vision_hidden=cfg.vision_hidden_size, vision_intermediate=cfg.vision_intermediate_size,
        vision_heads=cfg.vision_heads,
    )  # fmt: skip
    return family(cfg.family).build_model(size, tokenizer, seed=cfg.seed)


# ----------------------------------------------------------------------------------------------------
# warm start


def _sft_batch(
    problems: Sequence[Problem],
    targets: Sequence[list[int]],
    processor,
    pad_id: int,
    short: bool = False,
    suffix: str | None = PROMPT_SUFFIX,
) -> dict:
    """Left-padded prompts (as for generation) followed by right-padded response tokens, with labels.

    input_ids, attention_mask, mm_token_type_ids, labels: (B, T + R); pixel_values, image_grid_thw as
    the processor makes them. Labels are -100 on prompt and padding. `short`: the bare image and
    question instead of the chat prompt (the warm start's auxiliary format); `suffix` ends the chat prompt.
    """
    if short:
        pad = "<|vision_start|><|image_pad|><|vision_end|>"
        texts = [p.problem.replace("<image>", pad) + "\n" for p in problems]
        images = [img for p in problems for img in p.pil_images()]
        batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    else:
        batch = encode_prompts(problems, processor, suffix)
    b, r = len(problems), max(len(t) for t in targets)
    resp = torch.full((b, r), pad_id, dtype=torch.long)
    resp_mask = torch.zeros((b, r), dtype=torch.long)
    for i, t in enumerate(targets):
        resp[i, : len(t)] = torch.tensor(t)
        resp_mask[i, : len(t)] = 1
    labels = torch.cat([torch.full_like(batch["input_ids"], -100), resp.masked_fill(resp_mask == 0, -100)], 1)
    out = dict(batch)
    out["input_ids"] = torch.cat([batch["input_ids"], resp], 1)
    out["attention_mask"] = torch.cat([batch["attention_mask"], resp_mask], 1)
    out["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(resp)], 1)
    out["labels"] = labels
    return out


def _grade(response: str, answer: str) -> bool:
    from mathruler.grader import extract_boxed_content, grade_answer  # heavy: sympy, ~0.3 s

    return grade_answer(extract_boxed_content(response), answer)


@torch.no_grad()
def sample_accuracy(
    model,
    processor,
    problems: Sequence[Problem],
    batch_size: int = 64,
    max_new_tokens: int = 32,
    seed: int = 0,
    suffix: str | None = PROMPT_SUFFIX,
) -> list[float]:
    """One answer per problem sampled at temperature 1.0 (top_p 1, no top_k), graded 0/1 (mathruler)."""
    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    suppress = vision_token_ids(processor)
    scores = []
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        batch = encode_prompts(chunk, processor, suffix)
        out = model.generate(
            **batch,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            suppress_tokens=suppress,
        )
        texts = processor.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        scores += [float(_grade(t, p.answer)) for t, p in zip(texts, chunk)]
    model.train(was_training)
    return scores


def _by_task(problems: Sequence[Problem], scores: Sequence[float]) -> dict[str, float]:
    tasks = sorted({p.meta.get("task", "all") for p in problems})
    out = {}
    for t in tasks:
        s = [x for p, x in zip(problems, scores) if p.meta.get("task", "all") == t]
        out[t] = sum(s) / len(s)
    out["all"] = sum(scores) / len(scores)
    return out


def _measure(model, processor, problems: Sequence[Problem], cfg: TinyConfig, seed: int) -> dict[str, float]:
    """Per-task and overall accuracy of one sampled answer per problem, prompted as `cfg` trains."""
    scores = sample_accuracy(
        model, processor, problems, max_new_tokens=cfg.max_new_tokens, seed=seed, suffix=cfg.prompt_suffix
    )
    return _by_task(problems, scores)


def warm_start(model, processor, train: Sequence[Problem], val: Sequence[Problem], cfg: TinyConfig) -> dict:
    """Supervised warm start until sampled val accuracy lands in `cfg.accept`; returns a log."""
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    targets = [tok(p.meta["response"], add_special_tokens=False)["input_ids"] + [end] for p in train]
    gen = torch.Generator().manual_seed(cfg.seed)
    # The vision tower starts as a random projection in which the drawn shapes barely move the
    # features (mostly white background): a larger step there shortens the plateau before the
    # model starts to use the image.
    vision = [p for n, p in model.named_parameters() if ".visual." in f".{n}"]
    ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": rest, "mult": 1.0}, {"params": vision, "mult": cfg.vision_lr_mult}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.98))
    lr, every = cfg.lr, cfg.eval_every
    probe = list(val[: cfg.eval_problems])
    t0 = time.perf_counter()
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), 0)
    history, step, result = [], 0, None
    model.train()
    while step < cfg.max_steps and time.perf_counter() - t0 < cfg.time_budget_s:
        short = step % cfg.short_every == cfg.short_every - 1 if cfg.short_every else False
        # Bare prompts are about 4x shorter than chat prompts: 4x the rows for the same cost.
        idx = torch.randint(len(train), (cfg.batch_size * (4 if short else 1),), generator=gen).tolist()
        batch = _sft_batch(
            [train[i] for i in idx],
            [targets[i] for i in idx],
            processor,
            tok.pad_token_id,
            short,
            cfg.prompt_suffix,
        )
        for g in opt.param_groups:
            g["lr"] = g["mult"] * lr * min(1.0, (step + 1) / cfg.warmup_steps)
        loss = model(**batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % every:
            continue
        per_task = _measure(model, processor, probe, cfg, seed=step)
        acc = per_task["all"]
        history.append(
            {
                "step": step,
                "seconds": round(time.perf_counter() - t0, 1),
                "loss": round(loss.item(), 4),
                "lr": lr,
                "probe_acc": {k: round(v, 3) for k, v in per_task.items()},
            }
        )
        logger.info("warm start step %d loss %.3f probe acc %s", step, loss.item(), history[-1]["probe_acc"])
        if cfg.stop_low <= acc <= cfg.stop_high:  # confirm on all of val with fresh samples
            result = _measure(model, processor, val, cfg, seed=10_000 + step)
            history[-1]["val_acc"] = round(result["all"], 4)
            if cfg.accept[0] <= result["all"] <= cfg.accept[1]:
                break
            acc, result = result["all"], None
        if acc > cfg.stop_high:  # jumped past the band: go back, move more slowly
            model.load_state_dict(saved[0])
            opt.load_state_dict(saved[1])
            step, lr, every = saved[2], lr / 2, max(1, every // 2)
            continue
        saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), step)
    seconds = time.perf_counter() - t0
    if result is None:  # out of steps or time: report where it stands
        result = _measure(model, processor, val, cfg, seed=1)
    in_band = cfg.band[0] <= result["all"] <= cfg.band[1]
    if not in_band:
        logger.warning(
            "tiny warm start ended outside the band %s: val accuracy %.3f", cfg.band, result["all"]
        )
    model.eval()
    return {
        "steps": step,
        "seconds": round(seconds, 1),
        "val_accuracy": result,
        "in_band": in_band,
        "history": history,
    }


# ----------------------------------------------------------------------------------------------------
# build and cache


def _threads() -> int:
    """Torch threads for the build: $VPPO_TINY_THREADS, else 2, or 1 when the CPUs are already busy
    (two spinning OpenMP threads against other processes ran 5-10x slower than one, measured here)."""
    if os.environ.get("VPPO_TINY_THREADS"):
        return max(1, int(os.environ["VPPO_TINY_THREADS"]))
    cpus = os.cpu_count() or 1
    return 1 if cpus < 2 or os.getloadavg()[0] >= cpus - 0.5 else 2


def tiny_key(cfg: TinyConfig) -> str:
    d = asdict(cfg)
    if d["family"] == "qwen2_5_vl":
        del d["family"]  # the key of the Qwen2.5-VL base from before families existed: its cache stays valid
    return paths.artifact_key({"tiny": d, "tiny_version": TINY_VERSION, "synth_version": SYNTH_VERSION})


def build_tiny_model(
    out: str | Path, cfg: TinyConfig | None = None, synth_dir: str | Path | None = None
) -> dict:
    """Build tokenizer, processor and model, warm-start them and save all to `out`; returns the info."""
    cfg = cfg or TinyConfig()
    out = Path(out)
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(_threads())
    try:
        synth_dir = Path(synth_dir) if synth_dir is not None else ensure_synth_data(cfg.synth)
        train = list(load_problems(synth_dir, "train"))
        val = list(load_problems(synth_dir, "val"))
        test = list(load_problems(synth_dir, "test"))
        template = family(cfg.family).chat_template()
        tokenizer = build_tokenizer(_corpus(train, cfg.prompt_suffix, template), cfg.vocab_size, template)
        processor = build_processor(tokenizer, cfg.min_pixels, cfg.max_pixels, cfg.family)
        processor.tokenizer.padding_side = "left"
        model = build_model(cfg, tokenizer)
        log = warm_start(model, processor, train, val, cfg)
        test_acc = _measure(model, processor, test, cfg, seed=2)
        meta = json.loads((synth_dir / "meta.json").read_text())
        info = {
            "key": tiny_key(cfg),
            "params": sum(p.numel() for p in model.parameters()),
            "val_accuracy": log["val_accuracy"]["all"],
            "test_accuracy": test_acc["all"],
            "text_only_baseline": {s: meta["text_only_baseline"][s]["all"] for s in ("val", "test")},
            "per_task": {
                "val": log["val_accuracy"],
                "test": test_acc,
                "text_only_val": meta["text_only_baseline"]["val"],
            },
            "in_band": log["in_band"],
            "band": list(cfg.band),
            "sampling": "temperature 1.0, top_p 1.0, no top_k; one sample per problem; mathruler",
            "prompt_suffix": cfg.prompt_suffix,
            "warm_start_steps": log["steps"],
            "warm_start_seconds": log["seconds"],
            "threads": torch.get_num_threads(),
            # the same key on another machine or package set can build other weights (README)
            "packages": package_versions(),
            "config": asdict(cfg),
            "history": log["history"],
        }
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        processor.save_pretrained(out)
        save_prompt_suffix(out, cfg.prompt_suffix)
        info["build_seconds"] = round(time.perf_counter() - t0, 1)
        (out / INFO_FILE).write_text(json.dumps(info, indent=2))
        return info
    finally:
        torch.set_num_threads(threads)


def ensure_tiny_model(cfg: TinyConfig | None = None, root: str | Path | None = None) -> Path:
    """The folder of the tiny base for `cfg` (default config), built on first use (a few minutes on CPU)."""
    cfg = cfg or TinyConfig()
    target = Path(root or paths.tiny_root()) / tiny_key(cfg)
    target.parent.mkdir(parents=True, exist_ok=True)
    synth_dir = ensure_synth_data(cfg.synth, Path(root) / "synth" if root else None)
    return paths.build_once(target, lambda tmp: build_tiny_model(tmp, cfg, synth_dir), INFO_FILE)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="build here (always rebuilds) instead of the cache folder")
    ap.add_argument("--family", default="qwen2_5_vl", choices=supported(),
                    help="model family of the base (vppo.models; a run's model.tiny_family)")  # fmt: skip
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from vppo.spotlight import variant  # the pixel bounds of the family's grid

    cfg = variant("default", args.family)[1]
    if args.out:
        build_tiny_model(args.out, cfg)
        out = Path(args.out)
    else:
        out = ensure_tiny_model(cfg)
    info = json.loads((out / INFO_FILE).read_text())
    print(f"tiny base model in {out} ({info['params'] / 1e6:.2f} M parameters)")
    print(
        f"val accuracy {info['val_accuracy']:.1%} (band {info['band']}, in band: {info['in_band']}), "
        f"test {info['test_accuracy']:.1%}; text-only baseline val {info['text_only_baseline']['val']:.1%}, "
        f"test {info['text_only_baseline']['test']:.1%}; warm start {info['warm_start_steps']} steps, "
        f"{info['warm_start_seconds']:.0f} s; build {info['build_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
