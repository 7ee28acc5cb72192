"""Small artifacts the tests build themselves (nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch

from vppo.data import PROMPT_SUFFIX


def make_micro_model(out: Path, *, seed: int = 0, hidden: int = 32, layers: int = 1) -> Path:
    """A random Qwen2.5-VL (~0.1 M parameters) with the tiny tokenizer / processor, saved like a
    real checkpoint so it loads through the same code path as Qwen2.5-VL-7B-Instruct."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from vppo.synth import TASKS  # noqa: F401  (the synthetic questions share the vocabulary)
    from vppo.tiny import build_processor, build_tokenizer

    texts = ["What is x? \\boxed{1/2} 0.5 How many red shapes? Which bar is taller", PROMPT_SUFFIX] * 10
    tok = build_tokenizer(texts, vocab_size=300)
    proc = build_processor(tok, min_pixels=28 * 28, max_pixels=84 * 84)
    tid = tok.convert_tokens_to_ids
    text = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 2, 4]},
        eos_token_id=tid("<|im_end|>"), bos_token_id=None, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[0], window_size=56)  # fmt: skip
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"), vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"), tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
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
        "run.tensorboard=false",
        *extra,
    ]


def train_setup(assets, out, *extra):
    """vppo.train.setup of that run, in this process."""
    from vppo.config import load_config
    from vppo.train import setup

    return setup(load_config(None, train_overrides(assets, out, *extra)))
