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
