"""The one typed config of a run: YAML files in configs/ plus dotted overrides `key.sub=value`.

    cfg = load_config("configs/vppo_7b.yaml", ["train.lr=2e-6", "rollout.n=16"])
    d = derived(cfg, world_size=8)           # prints and returns the derived batch numbers
    save_resolved(cfg, run_dir)              # run_dir/config.yaml, loadable with load_config

Everything is checked here, before any model is loaded: unknown keys (with the closest valid
name), value types, ranges, choices, and the divisibility of the batch sizes; YAML syntax errors
name file:line:column. Whether the data and model sources exist is checked by check_sources, which
the command line (config_from_args) runs and load_config does not. The defaults are
the embedded tiny CPU run (configs/tiny.yaml is the same values written out); `model.path` and
`data.train` / `data.val` left at None mean "the tiny base / the synthetic set", filled in by the
training loop.

Units: a "step" is one rollout batch (sample, grade, score, then `optimizer_steps_per_rollout`
optimizer steps); `global_batch` counts prompts per optimizer step (a mini-batch of
global_batch * n trajectories); `micro_batch` and `logprob_micro_batch` count trajectories per
rank per forward/backward.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"

VPPO_PROMPT_SUFFIX = (
    "You first think through the reasoning process as an internal monologue, enclosed within "
    "<think> </think> tags. Then, provide your final answer enclosed within \\boxed{}."
)


def _f(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with a help text (shown by --help)."""
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


# the language model's attention and MLP projections, the same names in every vppo.models family
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class ModelConfig:
    path: str | None = _f(
        None,
        "HF model folder or hub id; null = the tiny base of data.synth and model.tiny_family (model.base)",
    )
    base: Literal["shipped", "build"] = _f(
        "shipped",
        "when model.path is null: shipped = the committed base in bases/ (sha256 checked; the "
        "README's numbers start from it), build = build / find one in the cache with vppo.tiny",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "parameter / compute dtype")
    attn_impl: Literal["sdpa", "flash_attention_2", "eager"] = _f(
        "sdpa", "attention; flash_attention_2 falls back to sdpa when flash-attn is not installed"
    )
    gradient_checkpointing: bool = _f(False, "non-reentrant activation checkpointing")
    liger: bool = _f(False, "apply Liger-Kernel's patches for the model family (vppo.models)")
    freeze_vision: bool = _f(False, "freeze the vision tower (the released recipe trains it)")
    tiny_family: Literal["qwen2_5_vl", "qwen3_vl"] = _f(
        "qwen2_5_vl", "model family of the tiny base built when model.path is null (vppo.models)"
    )
    # LoRA (vppo/lora.py, through PEFT): the base weights frozen, low-rank adapters trained
    lora_rank: int = _f(0, "LoRA rank r of every adapter; 0 = off (full-weight training)")
    lora_alpha: float = _f(32.0, "LoRA alpha: the adapter's update is scaled by alpha / rank")
    lora_dropout: float = _f(0.0, "dropout on the adapters' input while training")
    lora_target_modules: list[str] = _f(
        list(LORA_TARGETS), "leaf names of the language model's Linear layers that get adapters "
        "(default: its attention and MLP projections); the lm_head cannot be one (vppo/lora.py)"
    )  # fmt: skip
    lora_vision: bool = _f(False, "also adapt every Linear layer of the vision tower (else it stays frozen)")


@dataclass
class DataConfig:
    train: str | None = _f(None, "parquet file/folder, save_to_disk folder or dataset name; null = synthetic")
    val: str | None = _f(None, "validation source (same forms); null = synthetic val split")
    image_dir: str | None = _f(None, "folder of relative image paths (and of .zip archives holding them)")
    format: Literal["auto", "vppo", "virl39k", "columns"] = _f(
        "auto", "source schema (docs/training-data.md): vppo (problem/answer/images: chamber111's sets), "
        "virl39k (TIGER-Lab's 39Krelease.parquet + images.zip), columns (the three keys below), auto "
        "(the keys below when they are columns, else the one preset that fits; for train and val each)"
    )  # fmt: skip
    problem_key: str = _f("problem", "column with the problem text (with <image> placeholders)")
    answer_key: str = _f("answer", "column with the ground-truth answer")
    image_key: str = _f("images", "column with the images")
    prompt_suffix: str = _f(VPPO_PROMPT_SUFFIX, "appended after the problem text")
    min_pixels: int = _f(3136, "processor min_pixels (released: 200704 = 256*28*28)")
    max_pixels: int = _f(50176, "processor max_pixels (released: 1003520 = 1280*28*28)")
    max_prompt_len: int = _f(512, "prompt tokens after image expansion; longer prompts are dropped")
    strict: bool = _f(False, "stop on a broken row instead of skipping it")
    shuffle: bool = _f(True, "shuffle the training set each epoch (seeded)")
    synth: Literal["default", "spotlight", "multiread"] = _f(
        "default", "the synthetic task family used when data.train / data.val / model.path are null "
        "(spotlight: read one value off the image, then compute; multiread: several values; vppo.spotlight)"
    )  # fmt: skip


@dataclass
class RolloutConfig:
    n: int = _f(8, "responses per prompt (group size G)")
    temperature: float = _f(1.0, "sampling temperature")
    top_p: float = _f(0.99, "nucleus sampling; 1.0 = off")
    top_k: int = _f(0, "top-k sampling; 0 = off")
    max_response_len: int = _f(64, "max new tokens per response")
    rollout_batch_size: int = _f(16, "prompts per rollout batch (one training step)")
    online_filter: bool = _f(False, "DAPO dynamic sampling: drop groups with mean accuracy <= low or >= high")
    filter_low: float = _f(0.01, "online filter: drop groups with mean accuracy <= this")
    filter_high: float = _f(0.99, "online filter: drop groups with mean accuracy >= this")
    filter_max_tries: int = _f(8, "online filter: max generation rounds to fill one rollout batch")
    val_n: int = _f(8, "validation samples per problem (avg@n)")
    val_temperature: float = _f(1.0, "validation temperature")
    val_top_p: float = _f(1.0, "validation top_p")
    val_top_k: int = _f(50, "validation top_k (0 = off)")
    engine: Literal["hf", "vllm"] = _f("hf", "sampling engine: hf (transformers generate) or vllm")
    gpu_memory_utilization: float = _f(0.5, "vllm: fraction of GPU memory for weights + KV cache")
    tensor_parallel_size: int = _f(
        1, "vllm: GPUs per engine (1 = one engine per rank); divides the world size and the model's heads"
    )
    vllm_sleep: bool = _f(True, "vllm: sleep (level 1) between rollouts where the platform supports it")


@dataclass
class AlgoConfig:
    name: Literal["grpo", "dapo", "vppo"] = _f(
        "vppo", "grpo | dapo | vppo (only vppo runs the dependency passes)"
    )
    dependency: Literal["kl", "k3"] = _f(
        "k3", "token dependency: exact KL (paper) or k3 estimator (released)"
    )
    perturbation: Literal["patch_blacken", "noise", "blur", "grey"] = _f(
        "patch_blacken", "how the perturbed image is made"
    )
    patch_size: int = _f(14, "patch_blacken: cell size in pixels of the resized image")
    patch_prob: float = _f(0.5, "patch_blacken: probability that a cell is blackened")
    noise_sigma: float = _f(189.0, "noise: Gaussian std on the 0..255 scale")
    blur_radius: float = _f(6.0, "blur: Gaussian blur radius (std) in pixels")
    grey_value: int = _f(128, "grey: the uniform grey level 0..255")
    topk_ratio: float = _f(0.4, "TGF: fraction k of response tokens kept (ceil(k*L)); 1.0 = TGF off")
    token_select: Literal["dependency", "random", "entropy"] = _f(
        "dependency", "TGF scores: dependency (VPPO), random (seeded), entropy (ablations)"
    )
    shaping: Literal["none", "released", "global", "static"] = _f(
        "released",
        "TAS: none | released (per-rank mini-batch min/max, dynamic b_max per micro-batch) | "
        "global (min/max/mean over the global batch) | static (paper Eq. 5 with fixed b_max)",
    )
    b_min: float = _f(0.9, "TAS floor beta_min")
    b_max: float | None = _f(None, "TAS beta_max for shaping=static; null = dynamic")
    adv_eps: float = _f(1e-6, "GRPO advantage: (R - mean) / (std + eps)")
    clip_low: float = _f(0.2, "PPO clip: ratio >= 1 - clip_low")
    clip_high: float = _f(0.28, "PPO clip: ratio <= 1 + clip_high (clip-higher)")
    dual_clip: float | None = _f(3.0, "dual-clip constant c > 1 for negative advantages; null = off")
    entropy_coef: float = _f(0.06, "entropy penalty coefficient")
    entropy_mode: Literal["nll", "exact"] = _f(
        "nll", "nll: mean -logp of the sampled token (released); exact: full entropy"
    )
    loss_agg: Literal["token", "seq"] = _f("token", "token-mean over valid tokens or mean of sequence means")
    kl_coef: float = _f(0.0, "KL-to-reference coefficient (low_var_kl); 0 = no reference model")
    tis_cap: float | None = _f(
        None, "truncated importance sampling of the policy term, weight min(pi_old / pi_vllm, cap): "
        "corrects the sampling engine's mismatch (rollout.engine=vllm, rollout.temperature=1); >= 1 (a cap "
        "below 1 would shrink every token's term); null = off"
    )  # fmt: skip


@dataclass
class TrainConfig:
    epochs: int = _f(1, "passes over the training set (ignored when total_steps is set)")
    total_steps: int | None = _f(100, "training steps (rollout batches); null = derived from epochs")
    global_batch: int = _f(8, "prompts per optimizer step (mini-batch); trajectories = global_batch * n")
    micro_batch: int = _f(32, "trajectories per rank per update forward/backward")
    logprob_micro_batch: int = _f(64, "trajectories per rank per no-grad log-prob / dependency pass")
    ppo_epochs: int = _f(1, "passes over each rollout batch")
    lr: float = _f(2e-4, "learning rate (constant)")
    warmup_steps: int = _f(0, "linear warm-up in optimizer steps")
    weight_decay: float = _f(0.01, "AdamW weight decay")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas [beta1, beta2]")
    grad_clip: float | None = _f(1.0, "gradient norm clip; null = off")
    seed: int = _f(1, "seed of data order, sampling and perturbations")
    deepspeed: str | None = _f(None, "DeepSpeed JSON (configs/ds_*.json); null = ZeRO-0 with model.dtype")
    impl: Literal["auto", "triton", "torch"] = _f("auto", "kernel implementation")
    packing: bool = _f(False, "padding-free passes: a micro-batch's rows as one sequence (vppo.packing)")
    max_tokens_per_micro: int | None = _f(
        None,
        "token budget of a micro-batch (scoring and update, rows filled by token count; same count on "
        "every rank); null = micro_batch / logprob_micro_batch rows",
    )
    balance_batch: Literal["none", "minibatch", "rollout", False, True] = _f(
        "none",
        "Karmarkar-Karp partition of rows across ranks by length before the update, which splits prompt "
        "groups across ranks (per-rank TAS, shaping=released, sees the balanced rows): none; minibatch "
        "(each global mini-batch on its own; true is read as this); rollout (the whole rollout batch, "
        "then mini-batches in order: the released _balance_batch); false = none",
    )


@dataclass
class RunConfig:
    output_dir: str = _f("runs/tiny", "run folder: resolved config, metrics, logs, checkpoints")
    save_every: int = _f(50, "checkpoint every N steps; 0 = only at the end")
    keep_last: int = _f(2, "checkpoints kept (older ones deleted after a new one is complete)")
    resume: str = _f("auto", "auto (newest complete checkpoint in output_dir) | never | a checkpoint path")
    plot_every: int = _f(
        10, "redraw curves.png every N steps (and at the last); metrics.jsonl gets every step"
    )
    val_every: int = _f(25, "validate every N steps; 0 = off")
    val_samples: int = _f(128, "validation problems (0 = all)")
    spotlight_problems: int = _f(
        0,
        "at each validation, the dependency diagnostic (vppo.spotlight) on the first N validation problems "
        "with known visual tokens (data.synth=spotlight), 2 responses each: spot_* metrics and drawn samples "
        "in <output_dir>/spotlight/step_N/; 0 = off",
    )
    watchdog_seconds: float = _f(1800.0, "dump all stacks when a phase runs longer than this; 0 = off")
    export_hf: bool = _f(True, "export the final policy in Hugging Face format")
    loggers: list[Literal["console", "tensorboard", "wandb", "swanlab", "mlflow"]] = _f(
        ["tensorboard"],
        "where the metrics.jsonl records and the config also go (vppo.trackers), e.g. [console,wandb]: "
        "console (a line per step), tensorboard (<output_dir>/tb), wandb, swanlab, mlflow (offline, in "
        "output_dir, unless WANDB_MODE / SWANLAB_MODE / MLFLOW_TRACKING_URI say otherwise; pip install "
        "'vppo[trackers]'); [] = metrics.jsonl only",
    )
    tensorboard: bool | None = _f(
        None, "deprecated, use run.loggers: true adds tensorboard to it, false removes it; null = leave it"
    )
    nvtx: bool = _f(False, "NVTX ranges around each phase")
    # the resume guard (vppo.checkpoint.open_run; RUN_DEFINING / RESUME_FREE below)
    overwrite: bool = _f(
        False, "with run.resume=never: delete the run already in output_dir (checkpoints, metrics, export, "
        "logs, config) and start clean; without it such a start is refused"
    )  # fmt: skip
    allow_config_change: bool = _f(
        False, "resume although a run-defining key changed (RUN_DEFINING in vppo/config.py): the change is "
        "logged in metrics.jsonl at the resume step and the old config kept as config.step-N.yaml"
    )  # fmt: skip


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


# ---------------------------------------------------------------------------------------------
# Resume: which keys define a run. A resume compares the config its checkpoint was trained with
# against the new one (vppo.checkpoint.open_run) and refuses a changed run-defining key unless
# run.allow_config_change=true. Every key is in exactly one of the two sets (tests/test_resume_guard.py
# fails on a key in neither); at run time a key in neither counts as run-defining. model.base,
# model.tiny_family, data.format and run.loggers are keys of branches merged beside this one.

# Keys that cannot change a number the run computes or logs: cadence, retention and sinks of the
# outputs, the run's length, and memory knobs that recompute the same operations.
RESUME_FREE = frozenset({
    "model.gradient_checkpointing",  # the same forward recomputed in the backward
    "data.strict",  # a broken row stops the run instead of being skipped: the rows kept are the same
    "rollout.vllm_sleep",  # weights parked in host memory between rollouts
    "train.epochs", "train.total_steps",  # the run's length (the learning rate has no decay schedule)
    "run.output_dir", "run.resume", "run.overwrite", "run.allow_config_change",
    "run.save_every", "run.keep_last", "run.plot_every", "run.val_every", "run.watchdog_seconds",
    "run.export_hf", "run.tensorboard", "run.nvtx", "run.loggers",
})  # fmt: skip

# Everything else: what the run learns from and how (model, data, sampling, algorithm, batch sizes,
# optimizer, seed) and what its logged validation numbers measure. Kernels and micro-batching are
# here too: they change results by rounding (and train.micro_batch is the per-micro-batch TAS window
# of algo.shaping=released); change them deliberately with run.allow_config_change=true.
RUN_DEFINING = frozenset({
    "model.path", "model.dtype", "model.attn_impl", "model.liger", "model.freeze_vision", "model.base",
    "model.tiny_family", "model.lora_rank", "model.lora_alpha", "model.lora_dropout",
    "model.lora_target_modules", "model.lora_vision", "data.format", "data.train", "data.val",
    "data.image_dir", "data.problem_key", "data.answer_key", "data.image_key",
    "data.prompt_suffix", "data.min_pixels", "data.max_pixels", "data.max_prompt_len", "data.shuffle",
    "data.synth",
    "rollout.n", "rollout.temperature", "rollout.top_p", "rollout.top_k", "rollout.max_response_len",
    "rollout.rollout_batch_size", "rollout.online_filter", "rollout.filter_low", "rollout.filter_high",
    "rollout.filter_max_tries", "rollout.val_n", "rollout.val_temperature", "rollout.val_top_p",
    "rollout.val_top_k", "rollout.engine", "rollout.gpu_memory_utilization", "rollout.tensor_parallel_size",
    "algo.name", "algo.dependency", "algo.perturbation", "algo.patch_size", "algo.patch_prob",
    "algo.noise_sigma", "algo.blur_radius", "algo.grey_value", "algo.topk_ratio", "algo.token_select",
    "algo.shaping", "algo.b_min", "algo.b_max", "algo.adv_eps", "algo.clip_low", "algo.clip_high",
    "algo.dual_clip", "algo.entropy_coef", "algo.entropy_mode", "algo.loss_agg", "algo.kl_coef",
    "algo.tis_cap",
    "train.global_batch", "train.micro_batch", "train.logprob_micro_batch", "train.ppo_epochs", "train.lr",
    "train.warmup_steps", "train.weight_decay", "train.betas", "train.grad_clip", "train.seed",
    "train.deepspeed", "train.impl", "train.packing", "train.max_tokens_per_micro", "train.balance_batch",
    "run.val_samples", "run.spotlight_problems",
})  # fmt: skip

# Left null, these are filled with the tiny base / the synthetic set by the training loop
# (vppo.bases.resolve_defaults): compared only once filled.
FILLED_AT_START = ("model.path", "data.train", "data.val")


# Values an earlier version wrote that load as another value today ({key: {old: new}}): a checkpoint's
# config.yaml holding one is the same run as a config holding its new form.
LEGACY_VALUES: dict[str, dict[Any, Any]] = {"train.balance_batch": {True: "minibatch", False: "none"}}


def config_changes(old: dict, new: Config, *, unfilled_ok: bool = False) -> dict[str, tuple[Any, Any]]:
    """{key: (old value, new value)} of the keys outside RESUME_FREE whose value differs between a
    saved config (`old`: config.yaml as a nested dict) and `new`. A key the saved config lacks
    (written before the key existed) counts as its default. unfilled_ok: skip FILLED_AT_START keys
    that `new` leaves null (the check before resolve_defaults)."""
    flat_old, flat_new, table = _flatten(old), _flatten(to_dict(new)), fields_table()
    out = {}
    for key, value in flat_new.items():
        if key in RESUME_FREE or (unfilled_ok and key in FILLED_AT_START and value is None):
            continue
        before = flat_old.get(key, table[key][1] if key in table else None)
        if isinstance(before, tuple):
            before = list(before)
        if key in LEGACY_VALUES and not isinstance(before, (list, dict)):
            before = LEGACY_VALUES[key].get(before, before)
        if before != value:
            out[key] = (before, value)
    return out


# ---------------------------------------------------------------------------------------------
# Introspection: every dotted key with its type, default and help.


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def fields_table() -> dict[str, tuple[Any, Any, str]]:
    """{"train.lr": (type, default, help), ...} for every leaf key, in declaration order."""
    out = {}
    defaults = Config()
    for sec, cls in _section_classes().items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            out[f"{sec}.{f.name}"] = (
                hints[f.name],
                getattr(getattr(defaults, sec), f.name),
                f.metadata["help"],
            )
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(map(str, typing.get_args(tp)))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + " or null"
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _closest(key: str, valid: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest valid dotted key, matching whole keys then leaf names."""
    hit = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if not hit:
        leaves = {k.rsplit(".", 1)[-1]: k for k in valid}
        leaf = difflib.get_close_matches(key.rsplit(".", 1)[-1], list(leaves), n=1, cutoff=0.6)
        hit = [leaves[leaf[0]]] if leaf else difflib.get_close_matches(key, valid, n=1, cutoff=0.3)
    return f" (did you mean '{hit[0]}'?)" if hit else ""


# ---------------------------------------------------------------------------------------------
# Values: coercion of YAML / command-line values to the declared field types.

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NULL = {"null", "none", "~", ""}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Convert value (from YAML or a command-line string) to tp, or raise ValueError naming key."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.strip().lower() in _NULL):
            return None
        return _coerce(key, value, args[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        v = value.strip() if isinstance(value, str) else value
        if v not in choices:
            raise ValueError(f"{key}: {value!r} is not one of {list(choices)}")
        return v
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list like [0.9, 0.999], got {value!r}")
        return [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if value is None:
        raise ValueError(f"{key}: null is not allowed (expected {_type_name(tp)})")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
        if not math.isfinite(f) or f != int(f):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"{key}: expected a number, got {value!r}")
        try:
            f = float(value)  # PyYAML reads 1e-6 (no dot) as a string
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ValueError(f"{key}: expected a finite number, got {value!r}")
        return f
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"{key}: unsupported field type {tp}")  # a bug in this file, not in the input


# ---------------------------------------------------------------------------------------------
# Loading.


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _apply(cfg: Config, flat: dict[str, Any], source: str) -> None:
    table = fields_table()
    valid = list(table)
    for key, raw in flat.items():
        if key not in table:
            if key in SECTIONS:
                raise ValueError(f"{source}: '{key}' is a section; set its keys, e.g. '{key}.<name>=...'")
            raise ValueError(f"{source}: unknown config key '{key}'{_closest(key, valid)}")
        sec, name = key.split(".", 1)
        setattr(getattr(cfg, sec), name, _coerce(key, raw, table[key][0]))


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """['train.lr=1e-6', ...] -> {'train.lr': value}; values are YAML scalars (strings kept raw)."""
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        # YAML gives ints, bools, nulls and lists; _coerce handles strings for every other type.
        try:
            val = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            val = raw
        if isinstance(val, str) or isinstance(val, dict):
            val = raw.strip()
        out[key] = val
    return out


def _read_yaml(p: Path, name: str) -> Any:
    """The parsed YAML document of file p; a syntax error is a one-line ValueError
    `name:LINE:COLUMN: invalid YAML: <problem>` (1-based, as editors count) instead of PyYAML's
    multi-line message about `<unicode string>`."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else name
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        context, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
        if context:
            problem += f" ({context}" + (f" from line {cmark.line + 1}" if cmark is not None else "") + ")"
        raise ValueError(f"{where}: invalid YAML: {problem}") from None


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    *,
    world_size: int | None = None,
) -> Config:
    """Defaults <- YAML file (if any) <- dotted overrides, then validate(cfg, world_size).

    world_size defaults to $WORLD_SIZE (set by torchrun / deepspeed before the process starts),
    else 1. Raises ValueError naming the field for unknown keys, bad types and bad values.
    """
    cfg = Config()
    if path is not None:
        p = resolve_path(str(path))  # configs/x.yaml also works from outside the repository
        if not p.is_file():
            raise ValueError(f"config file not found: {path}")
        doc = _read_yaml(p, str(path)) or {}
        if not isinstance(doc, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(doc).__name__}")
        for sec, val in doc.items():
            if sec in SECTIONS and not isinstance(val, dict):
                raise ValueError(f"{path}: section '{sec}' must be a mapping, got {val!r}")
        _apply(cfg, _flatten(doc), str(path))
    if overrides:
        _apply(cfg, parse_overrides(list(overrides)), "override")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world_size)
    return cfg


def resolve_path(p: str) -> Path:
    """A path as given, else relative to the repository root (configs/ds_zero2.json from anywhere)."""
    q = Path(p).expanduser()
    if q.exists() or q.is_absolute():
        return q
    return REPO_ROOT / q if (REPO_ROOT / q).exists() else q


# ---------------------------------------------------------------------------------------------
# Validation.


def _check(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise ValueError(f"{key} {msg}, got {value!r}")


def validate(cfg: Config, world_size: int = 1) -> None:
    """Ranges, cross-field rules and batch divisibility; raises ValueError naming the field."""
    m, d, r, a, t, u = cfg.model, cfg.data, cfg.rollout, cfg.algo, cfg.train, cfg.run
    for key, v in [
        ("data.min_pixels", d.min_pixels),
        ("data.max_pixels", d.max_pixels),
        ("data.max_prompt_len", d.max_prompt_len),
        ("rollout.n", r.n),
        ("rollout.max_response_len", r.max_response_len),
        ("rollout.rollout_batch_size", r.rollout_batch_size),
        ("rollout.filter_max_tries", r.filter_max_tries),
        ("rollout.val_n", r.val_n),
        ("rollout.tensor_parallel_size", r.tensor_parallel_size),
        ("algo.patch_size", a.patch_size),
        ("train.epochs", t.epochs),
        ("train.global_batch", t.global_batch),
        ("train.micro_batch", t.micro_batch),
        ("train.logprob_micro_batch", t.logprob_micro_batch),
        ("train.ppo_epochs", t.ppo_epochs),
    ]:
        _check(v >= 1, key, "must be >= 1", v)
    _check(m.lora_rank >= 0, "model.lora_rank", "must be >= 0 (0 = LoRA off)", m.lora_rank)
    _check(m.lora_alpha > 0, "model.lora_alpha", "must be > 0", m.lora_alpha)
    _check(0 <= m.lora_dropout < 1, "model.lora_dropout", "must be in [0, 1)", m.lora_dropout)
    if m.lora_rank:
        _check(not (m.lora_vision and m.freeze_vision), "model.lora_vision",
               "contradicts model.freeze_vision=true (with LoRA every base weight is frozen anyway; "
               "lora_vision adds adapters to the vision tower)", m.lora_vision)  # fmt: skip
        _check(bool(m.lora_target_modules), "model.lora_target_modules", "must name at least one layer "
               "with model.lora_rank > 0", m.lora_target_modules)  # fmt: skip
        _check(
            "lm_head" not in m.lora_target_modules, "model.lora_target_modules",
            "cannot hold lm_head: the lm_head stays a vppo.model.FusedLMHead whose weight the fused "
            "scoring and loss kernels read directly (an adapter there would be bypassed); it stays frozen",
            m.lora_target_modules,
        )  # fmt: skip
    for key, v in [
        ("train.warmup_steps", t.warmup_steps),
        ("train.seed", t.seed),
        ("rollout.top_k", r.top_k),
        ("rollout.val_top_k", r.val_top_k),
        ("run.save_every", u.save_every),
        ("run.val_every", u.val_every),
        ("run.val_samples", u.val_samples),
        ("run.spotlight_problems", u.spotlight_problems),
    ]:
        _check(v >= 0, key, "must be >= 0", v)
    _check(u.spotlight_problems == 0 or u.val_every > 0, "run.spotlight_problems",
           "runs at validation: needs run.val_every > 0", u.spotlight_problems)  # fmt: skip
    _check(
        d.max_pixels >= d.min_pixels,
        "data.max_pixels",
        f"must be >= data.min_pixels ({d.min_pixels})",
        d.max_pixels,
    )
    _check(
        d.min_pixels >= 28 * 28, "data.min_pixels", "must be >= 784 (one 28x28 merged patch)", d.min_pixels
    )
    if t.total_steps is not None:
        _check(t.total_steps >= 1, "train.total_steps", "must be >= 1 or null", t.total_steps)
    # the earlier boolean form of train.balance_batch stays valid
    t.balance_batch = LEGACY_VALUES["train.balance_batch"].get(t.balance_batch, t.balance_batch)
    if t.max_tokens_per_micro is not None:
        _check(t.max_tokens_per_micro >= 1, "train.max_tokens_per_micro", "must be >= 1 or null",
               t.max_tokens_per_micro)  # fmt: skip
    for key, v in [("rollout.temperature", r.temperature), ("rollout.val_temperature", r.val_temperature)]:
        _check(v > 0, key, "must be > 0", v)
    _check(0 < r.gpu_memory_utilization <= 1, "rollout.gpu_memory_utilization", "must be in (0, 1]",
           r.gpu_memory_utilization)  # fmt: skip
    for key, v in [("rollout.top_p", r.top_p), ("rollout.val_top_p", r.val_top_p)]:
        _check(0 < v <= 1, key, "must be in (0, 1]", v)
    _check(0 <= r.filter_low <= 1, "rollout.filter_low", "must be in [0, 1]", r.filter_low)
    _check(0 <= r.filter_high <= 1, "rollout.filter_high", "must be in [0, 1]", r.filter_high)
    _check(
        r.filter_low < r.filter_high,
        "rollout.filter_low",
        f"must be < rollout.filter_high ({r.filter_high})",
        r.filter_low,
    )
    if r.online_filter:
        _check(
            r.n >= 2,
            "rollout.n",
            "must be >= 2 with rollout.online_filter (a group of one has no spread)",
            r.n,
        )

    _check(0 < a.topk_ratio <= 1, "algo.topk_ratio", "must be in (0, 1]", a.topk_ratio)
    _check(a.token_select == "dependency" or (a.name == "vppo" and a.topk_ratio < 1), "algo.token_select",
           "selects TGF tokens: needs algo.name=vppo and algo.topk_ratio < 1", a.token_select)  # fmt: skip
    _check(0 <= a.patch_prob <= 1, "algo.patch_prob", "must be in [0, 1]", a.patch_prob)
    _check(a.noise_sigma >= 0, "algo.noise_sigma", "must be >= 0", a.noise_sigma)
    _check(a.blur_radius >= 0, "algo.blur_radius", "must be >= 0", a.blur_radius)
    _check(0 <= a.grey_value <= 255, "algo.grey_value", "must be in [0, 255]", a.grey_value)
    _check(0 <= a.b_min <= 1, "algo.b_min", "must be in [0, 1]", a.b_min)
    if a.shaping == "static":
        _check(
            a.b_max is not None, "algo.b_max", "must be set (>= algo.b_min) with algo.shaping=static", a.b_max
        )
        _check(a.b_max >= a.b_min, "algo.b_max", f"must be >= algo.b_min ({a.b_min})", a.b_max)
    elif a.b_max is not None:
        raise ValueError(
            f"algo.b_max must be null with algo.shaping={a.shaping} (beta_max is dynamic; set "
            f"algo.shaping=static for a fixed one), got {a.b_max!r}"
        )
    if a.name != "vppo" and (a.shaping != "none" or a.topk_ratio != 1.0):
        raise ValueError(
            f"algo.name={a.name} has no token dependency: set algo.shaping=none and algo.topk_ratio=1.0 "
            f"(got algo.shaping={a.shaping}, algo.topk_ratio={a.topk_ratio}) or use algo.name=vppo"
        )
    _check(a.adv_eps > 0, "algo.adv_eps", "must be > 0", a.adv_eps)
    _check(0 <= a.clip_low < 1, "algo.clip_low", "must be in [0, 1)", a.clip_low)
    _check(a.clip_high >= 0, "algo.clip_high", "must be >= 0", a.clip_high)
    if a.dual_clip is not None:
        _check(a.dual_clip > 1, "algo.dual_clip", "must be > 1 or null", a.dual_clip)
    _check(a.entropy_coef >= 0, "algo.entropy_coef", "must be >= 0", a.entropy_coef)
    _check(a.kl_coef >= 0, "algo.kl_coef", "must be >= 0", a.kl_coef)
    if a.tis_cap is not None:
        # min(ratio, cap) with cap < 1 scales down every token whose engines agree (ratio ~ 1), not
        # just the outliers: a smaller learning rate in disguise (cap 0.5 halved every term), not TIS
        _check(a.tis_cap >= 1, "algo.tis_cap", "must be >= 1 or null (the weight min(pi_old / pi_vllm, cap) "
               "truncates large ratios; a cap below 1 shrinks every token's term, even where the engines "
               "agree: lower train.lr instead)", a.tis_cap)  # fmt: skip
        need = "needs the vllm engine's log-probs: rollout.engine=vllm and rollout.temperature=1"
        _check(r.engine == "vllm" and r.temperature == 1.0, "algo.tis_cap", need, a.tis_cap)

    _check(t.lr > 0, "train.lr", "must be > 0", t.lr)
    _check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0", t.weight_decay)
    _check(
        len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas),
        "train.betas",
        "must be two numbers in [0, 1)",
        t.betas,
    )
    if t.grad_clip is not None:
        _check(t.grad_clip > 0, "train.grad_clip", "must be > 0 or null", t.grad_clip)
    if t.deepspeed is not None:
        _check(
            resolve_path(t.deepspeed).is_file(),
            "train.deepspeed",
            "must be an existing JSON file",
            t.deepspeed,
        )

    _check(u.keep_last >= 1, "run.keep_last", "must be >= 1", u.keep_last)
    _check(u.plot_every >= 1, "run.plot_every", "must be >= 1", u.plot_every)
    _check(u.watchdog_seconds >= 0, "run.watchdog_seconds", "must be >= 0", u.watchdog_seconds)
    _check(bool(u.output_dir.strip()), "run.output_dir", "must not be empty", u.output_dir)
    _check(len(set(u.loggers)) == len(u.loggers), "run.loggers", "must not repeat a logger", u.loggers)
    if u.tensorboard is not None:  # folded into run.loggers and cleared: the saved config has loggers only
        warnings.warn(
            f"run.tensorboard is deprecated: use run.loggers (run.tensorboard={str(u.tensorboard).lower()} "
            f"{'adds tensorboard to' if u.tensorboard else 'removes tensorboard from'} run.loggers)",
            FutureWarning,
            stacklevel=2,
        )
        u.loggers = [x for x in u.loggers if x != "tensorboard"] + (["tensorboard"] if u.tensorboard else [])
        u.tensorboard = None
    _check(not u.overwrite or u.resume == "never", "run.overwrite", "deletes the run in run.output_dir to "
           "start clean: set run.resume=never with it", u.overwrite)  # fmt: skip
    tp = r.tensor_parallel_size
    if r.engine == "vllm":  # the engines are made of whole groups of tp trainer ranks
        _check(tp <= world_size and world_size % tp == 0, "rollout.tensor_parallel_size",
               f"must divide the world size ({world_size}): each vLLM engine spans tp ranks", tp)  # fmt: skip
    if u.resume not in ("auto", "never"):
        _check(
            Path(u.resume).exists(),
            "run.resume",
            "must be auto, never or an existing checkpoint path",
            u.resume,
        )
    _ = m  # model fields are fully checked by their types
    batch_numbers(cfg, world_size)


_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")  # `name` or `org/name`, as on the Hugging Face hub


def _looks_local(value: str) -> bool:
    """A value meant as a path: a data file suffix, a leading `.` `/` `~`, or more than one `/`."""
    return (
        value.endswith((".parquet", ".json", ".jsonl"))
        or value.startswith((".", "/", "~"))
        or value.count("/") > 1
    )


def _hf_home() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(os.environ.get("HF_HOME") or Path(xdg) / "huggingface").expanduser()


def _hub_cache() -> Path:
    """The Hugging Face hub cache as huggingface_hub resolves it (read from the environment now)."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(env).expanduser() if env else _hf_home() / "hub"


def _model_cached(repo_id: str) -> bool | None:
    """Whether model repo_id is in the local hub cache; None when that cannot be told."""
    try:
        from huggingface_hub import try_to_load_from_cache  # optional probe; ~0.1 s
    except ImportError:
        return None
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json", cache_dir=_hub_cache()), str)
    except Exception:  # an id the hub library refuses: the loader will say why
        return None


def _dataset_cached(name: str) -> bool:
    """Whether a folder that could hold dataset `name` is in the hub cache (datasets--ns--name) or
    in datasets' own cache (ns___name with the name snake-cased). Permissive on purpose: a name it
    accepts wrongly still fails, naming itself, in the loader; one it refused wrongly would block a
    run that works."""
    if (_hub_cache() / f"datasets--{name.replace('/', '--')}").is_dir():
        return True
    root = Path(os.environ.get("HF_DATASETS_CACHE") or _hf_home() / "datasets").expanduser()
    ns, _, base = name.rpartition("/")

    def squash(x: str) -> str:
        return re.sub(r"[^0-9a-z]", "", x.lower())

    try:
        entries = [e.name for e in os.scandir(root) if e.is_dir()]
    except OSError:
        return False
    for entry in entries:
        e_ns, sep, e_base = entry.rpartition("___")
        if (e_ns if sep else "") == ns and squash(e_base) == squash(base):
            return True
    return False


def check_sources(cfg: Config) -> None:
    """That data.train, data.val, data.image_dir and model.path name something loadable; else a
    one-line ValueError naming the key, the value and what is wrong.

    The training command line (config_from_args) runs this right after validate(), before any model
    or data loads. It is not part of validate() / load_config(): a config file describes a run and
    stays loadable, printable and testable on a machine that lacks its data (configs/vppo_7b.yaml
    names chamber111/VPPO_ViRL39K_train and Qwen/Qwen2.5-VL-7B-Instruct). Paths are taken relative
    to the current directory, as the loaders take them. The rules:

    - None passes: the tiny base / the synthetic set, filled in by the training loop.
    - data.train / data.val: an existing file must be a .parquet file; an existing folder must hold
      parquet files or be a `datasets.save_to_disk` folder. A missing value that looks like a path
      (ends with .parquet / .json / .jsonl, starts with `.`, `/` or `~`, or has more than one `/`)
      is an error. Any other missing value is taken for a hub dataset name (`name` or `org/name`,
      optionally `@split`): the loader reads those from the local Hugging Face cache only, so the
      name must be well-formed and a folder for it must be in the hub cache or in datasets' cache
      (a permissive test; the loader still names a cached-looking one it cannot read). So
      `chamber111/VPPO_ViRL39K_train` of configs/vppo_7b.yaml, with no such folder here and no such
      cached dataset, is an error here rather than a traceback from the loader.
    - data.val is checked only when run.val_every > 0 (otherwise the run never loads it).
    - a parquet source's columns (its schema, no rows; local, or a snapshot in the hub file cache)
      must fit data.format: a preset's columns, or for `auto` the keys or exactly one preset
      (vppo.data.resolve_format).
    - data.image_dir, when set, must be an existing folder.
    - model.path: an existing folder must hold config.json; a missing path-like value is an error;
      any other value must be a hub id (`name` or `org/name`) that is in the local Hugging Face
      cache, since the model and processor are loaded with local_files_only=True (nothing is
      downloaded). When the cache cannot be consulted (no huggingface_hub) a well-formed id passes.
    """
    d, m = cfg.data, cfg.model
    sources = [("data.train", d.train)]
    if cfg.run.val_every:  # the validation set is loaded only when validation runs
        sources.append(("data.val", d.val))
    for key, value in sources:
        if value is None:
            continue
        p = Path(value).expanduser()
        if p.is_file():
            _check(p.suffix == ".parquet", key, "must be a .parquet file, a folder or a dataset name", value)
        elif p.is_dir():
            usable = (p / "dataset_dict.json").exists() or (p / "state.json").exists()
            usable = usable or next(iter(p.rglob("*.parquet")), None) is not None
            _check(
                usable, key, "is a folder with no parquet files (nor a datasets save_to_disk folder)", value
            )
        elif _looks_local(value):
            _check(False, key, f"does not exist (no such file or folder from {Path.cwd()})", value)
        else:
            name = value.partition("@")[0]
            _check(
                bool(_HUB_NAME.match(name)) and _dataset_cached(name),
                key,
                f"is neither a file or folder (from {Path.cwd()}) nor a dataset in the local Hugging Face "
                "cache (nothing is downloaded)",
                value,
            )
        # its columns fit data.format (read from a parquet schema, local or in the hub file cache)
        from vppo.data import resolve_format, source_columns  # torch, PIL: only with real data

        try:
            cols = source_columns(value, "train" if key == "data.train" else "val")
            if cols is not None:
                resolve_format(
                    cols, d.format, problem_key=d.problem_key, answer_key=d.answer_key,
                    image_key=d.image_key, name=str(value),
                )  # fmt: skip
        except (ValueError, OSError) as e:
            raise ValueError(f"{key}={value!r}: {e}") from e
    if d.image_dir is not None:
        _check(
            Path(d.image_dir).expanduser().is_dir(),
            "data.image_dir",
            "must be an existing folder",
            d.image_dir,
        )
    if m.path is None and m.base == "shipped":
        from vppo.bases import SHIPPED  # a few constants; the files are checked when the loop loads them

        _check(
            (d.synth, m.tiny_family) in SHIPPED, "model.base",
            f"has no shipped base for data.synth={d.synth!r}, model.tiny_family={m.tiny_family!r} (shipped: "
            f"{', '.join(f'{s}/{f}' for s, f in SHIPPED)}); use model.base=build", m.base,
        )  # fmt: skip
    if m.path is not None:
        p = Path(m.path).expanduser()
        if p.exists():
            _check(p.is_dir(), "model.path", "must be a model folder, not a file", m.path)
            _check((p / "config.json").is_file(), "model.path", "is a folder without config.json", m.path)
            _check_family(p / "config.json", m.path)
        elif _looks_local(m.path) or not _HUB_NAME.match(m.path):
            _check(False, "model.path", f"does not exist (no such folder from {Path.cwd()})", m.path)
        else:
            _check(
                _model_cached(m.path) is not False,
                "model.path",
                "is neither a local folder nor a model in the local Hugging Face cache (nothing is "
                f"downloaded: fetch it first, e.g. `hf download {m.path}`)",
                m.path,
            )


VLLM_MISSING = (
    "rollout.engine=vllm needs the vllm package, which this Python ({python}) cannot find: on a GPU "
    "`pip install -e '.[vllm]'`, on a CPU `make vllm-env` and run with .venv-vllm/bin/python"
)


def vllm_missing() -> str | None:
    """The one-line error when vllm is not installed for this interpreter, else None (a lookup, not
    an import: importing vllm takes seconds)."""
    import importlib.util
    import sys

    return None if importlib.util.find_spec("vllm") else VLLM_MISSING.format(python=sys.executable)


def _attention_heads(model_path: str) -> dict[str, int]:
    """{config key: heads} of model_path's config.json: the language model's query and key/value
    heads and the vision tower's heads, where present (Qwen2.5-VL keeps the first two at the top
    level in older files, under text_config in newer ones)."""
    p = Path(model_path).expanduser() / "config.json"
    if not p.is_file():
        return {}
    c = json.loads(p.read_text())
    text, vision = c.get("text_config") or c, c.get("vision_config") or {}
    out = {}
    for key, src, name in [
        ("num_attention_heads", text, "num_attention_heads"),
        ("num_key_value_heads", text, "num_key_value_heads"),
        ("vision_config.num_heads", vision, "num_heads"),
    ]:
        v = src.get(name, c.get(name) if src is text else None)
        if isinstance(v, int) and v > 0:
            out[key] = v
    return out


def check_engine(cfg: Config) -> None:
    """rollout.engine=vllm only: vllm installed, and rollout.tensor_parallel_size dividing the model's
    attention heads (config.json of model.path; vLLM shards heads across its tensor-parallel ranks,
    key/value heads are split or, when fewer than tp, replicated); else a one-line ValueError. Before
    anything loads: vLLM says the same only after the data, the policy and DeepSpeed are up."""
    r = cfg.rollout
    if r.engine != "vllm":
        return
    missing = vllm_missing()
    if missing:
        raise ValueError(missing)
    tp = r.tensor_parallel_size  # within the world size: validate()
    if cfg.model.path is None or tp == 1:
        return
    for key, heads in _attention_heads(cfg.model.path).items():
        ok = heads % tp == 0 or (key == "num_key_value_heads" and tp % heads == 0)
        _check(ok, "rollout.tensor_parallel_size", f"must divide {key} ({heads}) of {cfg.model.path}", tp)


def _check_family(config_json: Path, path: str) -> None:
    """The model's config.json names a model_type that vppo.models has a family for (no weights read)."""
    from vppo.models import model_type_of_path, supported

    mt = model_type_of_path(config_json.parent)
    _check(
        mt is None or mt in supported(),  # none named: the loader says what is missing
        "model.path",
        f"has model_type {mt!r}, which no vppo.models family handles (supported: {', '.join(supported())})",
        path,
    )


# ---------------------------------------------------------------------------------------------
# Derived numbers.


@dataclass(frozen=True)
class Derived:
    world_size: int
    prompts_per_rollout: int  # prompts sampled per training step
    samples_per_rollout: int  # trajectories per training step
    prompts_per_step: int  # prompts per optimizer step (mini-batch)
    samples_per_step: int  # trajectories per optimizer step
    optimizer_steps_per_rollout: int  # (rollout batch / global batch) * ppo_epochs
    rollout_prompts_per_rank: int
    samples_per_rank_per_step: int  # trajectories per rank per optimizer step
    grad_accum_per_rank: int  # micro-batches per rank per optimizer step
    logprob_passes_per_rank: int  # no-grad micro-batches per rank per rollout batch (per pass kind)
    steps_per_epoch: int | None  # training steps per epoch, when the train-set size is known
    total_steps: int | None  # training steps of the run, when known
    total_optimizer_steps: int | None


def batch_numbers(cfg: Config, world_size: int = 1, n_train: int | None = None) -> Derived:
    """The derived batch numbers; raises ValueError naming the fields when sizes do not divide."""
    r, t = cfg.rollout, cfg.train
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if r.rollout_batch_size % t.global_batch:
        raise ValueError(
            f"rollout.rollout_batch_size ({r.rollout_batch_size}) must be a multiple of train.global_batch "
            f"({t.global_batch}): each rollout batch is split into whole optimizer steps"
        )
    if t.global_batch % world_size:
        raise ValueError(
            f"train.global_batch ({t.global_batch}) must be a multiple of the world size ({world_size}): "
            "prompts are sharded across ranks with each group of rollout.n kept whole"
        )
    per_rank = t.global_batch * r.n // world_size
    if per_rank % t.micro_batch:
        raise ValueError(
            f"train.micro_batch ({t.micro_batch}) must divide the trajectories per rank per optimizer step "
            f"(train.global_batch {t.global_batch} * rollout.n {r.n} / world size {world_size} = {per_rank})"
        )
    rollout_per_rank = r.rollout_batch_size // world_size
    steps_per_epoch = total = None
    if n_train is not None:
        if n_train < r.rollout_batch_size:
            raise ValueError(
                f"the training set ({n_train} prompts) is smaller than rollout.rollout_batch_size "
                f"({r.rollout_batch_size})"
            )
        steps_per_epoch = n_train // r.rollout_batch_size  # the last partial batch is dropped
    if t.total_steps is not None:
        total = t.total_steps
    elif steps_per_epoch is not None:
        total = steps_per_epoch * t.epochs
    opt_per_rollout = r.rollout_batch_size // t.global_batch * t.ppo_epochs
    return Derived(
        world_size=world_size,
        prompts_per_rollout=r.rollout_batch_size,
        samples_per_rollout=r.rollout_batch_size * r.n,
        prompts_per_step=t.global_batch,
        samples_per_step=t.global_batch * r.n,
        optimizer_steps_per_rollout=opt_per_rollout,
        rollout_prompts_per_rank=rollout_per_rank,
        samples_per_rank_per_step=per_rank,
        grad_accum_per_rank=per_rank // t.micro_batch,
        logprob_passes_per_rank=math.ceil(rollout_per_rank * r.n / t.logprob_micro_batch),
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        total_optimizer_steps=None if total is None else total * opt_per_rollout,
    )


def derived(cfg: Config, world_size: int = 1, n_train: int | None = None, *, print_fn=print) -> Derived:
    """batch_numbers(...) and print them (print_fn=None to stay quiet, e.g. on ranks > 0)."""
    dv = batch_numbers(cfg, world_size, n_train)
    if print_fn is not None:
        print_fn(format_derived(dv, cfg))
    return dv


def format_derived(dv: Derived, cfg: Config) -> str:
    lines = [
        f"world size {dv.world_size}",
        f"per training step: {dv.prompts_per_rollout} prompts x n={cfg.rollout.n} = "
        f"{dv.samples_per_rollout} samples ({dv.rollout_prompts_per_rank} prompts per rank)",
        f"per optimizer step: {dv.prompts_per_step} prompts = {dv.samples_per_step} samples "
        f"({dv.samples_per_rank_per_step} per rank)",
        f"optimizer steps per rollout batch: {dv.optimizer_steps_per_rollout} "
        f"(ppo_epochs {cfg.train.ppo_epochs})",
        f"gradient accumulation per rank: {dv.grad_accum_per_rank} micro-batches of {cfg.train.micro_batch}",
        f"log-prob passes per rank per step: {dv.logprob_passes_per_rank} micro-batches of "
        f"{cfg.train.logprob_micro_batch} (per pass kind)",
    ]
    if dv.steps_per_epoch is not None:
        lines.append(f"training steps per epoch: {dv.steps_per_epoch}")
    if dv.total_steps is not None:
        lines.append(f"training steps: {dv.total_steps} ({dv.total_optimizer_steps} optimizer steps)")
    return "derived batch numbers:\n  " + "\n  ".join(lines)


def deepspeed_config(cfg: Config, world_size: int = 1, *, with_optimizer: bool = False) -> dict:
    """The DeepSpeed JSON of train.deepspeed (ZeRO-0 when null) with the batch numbers, gradient
    clipping and precision filled in from cfg, so the two can never disagree.

    with_optimizer adds an AdamW "optimizer" block from train.* (DeepSpeed then builds its own
    fused / CPU-offload Adam); leave it off when passing a torch optimizer to deepspeed.initialize.
    """
    dv = batch_numbers(cfg, world_size)
    if cfg.train.deepspeed is None:
        ds: dict = {"zero_optimization": {"stage": 0}}
    else:
        ds = json.loads(resolve_path(cfg.train.deepspeed).read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch
    ds["gradient_accumulation_steps"] = dv.grad_accum_per_rank
    ds["train_batch_size"] = dv.samples_per_step
    ds["gradient_clipping"] = cfg.train.grad_clip or 0.0
    ds["bf16"] = {"enabled": cfg.model.dtype == "bfloat16"}
    ds["fp16"] = {"enabled": cfg.model.dtype == "float16"}
    if with_optimizer:
        t = cfg.train
        ds["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": t.lr, "betas": list(t.betas), "eps": 1e-8, "weight_decay": t.weight_decay},
        }
    return ds


def resolve_attn_impl(name: str) -> str:
    """flash_attention_2 when requested and importable, else sdpa (with a warning)."""
    if name == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401  # optional extra
        except ImportError:
            warnings.warn("flash-attn is not installed: falling back to sdpa attention", stacklevel=2)
            return "sdpa"
    return name


# ---------------------------------------------------------------------------------------------
# Saving and the command line.


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, width=1000)


def save_resolved(cfg: Config, run_dir: str | os.PathLike) -> Path:
    """Write run_dir/config.yaml (the fully resolved config, loadable with load_config)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
    return path


def keys_help() -> str:
    lines = ["config keys (override with key.sub=value):"]
    for key, (tp, default, help) in fields_table().items():
        dflt = "null" if default is None else default
        if isinstance(dflt, str) and len(dflt) > 40:
            dflt = dflt[:37] + "..."
        lines.append(f"  {key} ({_type_name(tp)}, default {dflt}): {help}")
    return "\n".join(lines)


def build_parser(prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    """argparse with --config FILE and positional key.sub=value overrides; --help lists every key."""
    p = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="FILE", default=None, help="YAML config (default: the tiny CPU run)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    # the deepspeed launcher appends --local_rank=N (LOCAL_RANK is read from the environment)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. train.lr=1e-6"
    )
    return p


def check_loggers(cfg: Config) -> None:
    """That every tracker of run.loggers imports; else a ValueError naming it and the pip command.
    The command line runs it next to check_sources, and the training loop before it loads
    anything; not part of validate(), so that a run's config.yaml stays loadable where its trackers
    are not installed."""
    from vppo import trackers  # light: the tracker packages are imported by the check itself

    trackers.check(cfg.run.loggers)


def config_from_args(
    argv: list[str] | None = None, prog: str | None = None, description: str | None = None
) -> Config:
    """Parse the command line into a Config; bad keys or values, YAML syntax errors, data or model
    sources that cannot be loaded (check_sources), tracker packages that do not import (check_loggers)
    and a vLLM engine that cannot start (check_engine) exit with a one-line message (status 2).
    --print-config prints and exits before the sources are checked (it needs no data)."""
    parser = build_parser(prog, description)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        parser.error(str(e))
    if args.print_config:
        print(to_yaml(cfg), end="")
        parser.exit(0)
    try:
        check_sources(cfg)
        check_loggers(cfg)
        check_engine(cfg)
    except ValueError as e:
        parser.error(str(e))
    return cfg
