"""Small artifacts the tests build themselves (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

from vppo.data import PROMPT_SUFFIX

FAMILIES = ("qwen2_5_vl", "qwen3_vl")  # every vppo.models family: the parametrised tests run each


def make_micro_model(
    out: Path, *, seed: int = 0, hidden: int = 32, layers: int = 1, family: str = "qwen2_5_vl",
    vision_depth: int = 1,
) -> Path:  # fmt: skip
    """A random model of `family` (~0.1 M parameters; vppo.models builds it) with the tiny tokenizer
    and the family's processor, saved like a real checkpoint so it loads through the same code path
    as Qwen2.5-VL-7B-Instruct / Qwen3-VL-8B-Instruct."""
    from vppo.models import Size
    from vppo.models import family as family_of
    from vppo.synth import TASKS  # noqa: F401  (the synthetic questions share the vocabulary)
    from vppo.tiny import build_tokenizer

    fam = family_of(family)
    texts = ["What is x? \\boxed{1/2} 0.5 How many red shapes? Which bar is taller", PROMPT_SUFFIX] * 10
    tok = build_tokenizer(texts, vocab_size=300, chat_template=fam.chat_template())
    g = fam.grid  # images between one and nine merged cells of the family's grid
    proc = fam.build_processor(tok, min_pixels=g * g, max_pixels=9 * g * g)
    size = Size(
        hidden=hidden, intermediate=2 * hidden, layers=layers, heads=2, kv_heads=1, vision_depth=vision_depth,
        vision_hidden=32, vision_intermediate=64, vision_heads=2, max_positions=1024,
    )  # fmt: skip
    model = fam.build_model(size, tok, seed=seed).eval()
    tid = tok.convert_tokens_to_ids
    gc = model.generation_config
    gc.eos_token_id, gc.bos_token_id, gc.pad_token_id = [tid("<|im_end|>")], None, tok.pad_token_id
    model.save_pretrained(out)
    proc.save_pretrained(out)
    return out


def make_synth(out: Path, *, n_train: int = 64, n_val: int = 8, n_test: int = 8, seed: int = 0) -> Path:
    """A small synthetic set in the training schema (train / val / test parquet)."""
    from vppo.synth import SynthConfig, write_synth

    write_synth(SynthConfig(seed=seed, n_train=n_train, n_val=n_val, n_test=n_test), out)
    return out


ROOT = Path(__file__).resolve().parents[1]
# in-process tests set up a one-rank group; subprocesses must not inherit its rendezvous
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def subprocess_env(**extra) -> dict:
    """os.environ without the distributed rendezvous, with the repo and tests/ importable."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**env, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **extra}


def train_overrides(assets, out, *extra) -> list[str]:
    """Config overrides of a small, fast training run on (micro model, synthetic set)."""
    model, synth = assets
    return [
        f"model.path={model}",
        f"data.train={synth / 'train.parquet'}",
        f"data.val={synth / 'val.parquet'}",
        f"run.output_dir={out}",
        "rollout.rollout_batch_size=4",
        "rollout.n=4",
        "rollout.max_response_len=12",
        "train.global_batch=2",
        "train.micro_batch=4",
        "train.logprob_micro_batch=8",
        "train.total_steps=3",
        "train.weight_decay=0.0",
        "train.lr=1e-3",
        "train.impl=torch",
        "run.val_every=0",
        "run.loggers=[]",
        *extra,
    ]


def train_setup(assets, out, *extra):
    """vppo.train.setup of that run, in this process."""
    from vppo.config import load_config
    from vppo.train import setup

    return setup(load_config(None, train_overrides(assets, out, *extra)))
