"""rollout.generate samples with the run's settings, never the checkpoint's hidden defaults."""

import torch
from helpers import make_micro_model, make_synth


def test_generation_ignores_the_checkpoints_greedy_defaults(tmp_path):
    from transformers import AutoModelForImageTextToText

    from vppo.data import encode_prompts, load_problems, load_processor, vision_token_ids
    from vppo.rollout import GenSettings, generate

    path = make_micro_model(tmp_path / "m")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    # like Qwen2.5-VL-7B-Instruct's generation_config.json: top_k=1 (greedy) and a repetition penalty
    model.generation_config.top_k, model.generation_config.repetition_penalty = 1, 1.5
    proc = load_processor(path)
    problems = load_problems(make_synth(tmp_path / "s", n_train=2) / "train.parquet", processor=proc)
    tok = proc.tokenizer
    torch.manual_seed(0)
    ro = generate(
        model, encode_prompts(problems[:1], proc), 6, GenSettings(1.0, 1.0, 0, 8),
        eos_ids=[tok.convert_tokens_to_ids("<|im_end|>")], pad_id=tok.pad_token_id,
        suppress_ids=vision_token_ids(proc), vision_start_id=tok.convert_tokens_to_ids("<|vision_start|>"),
    )  # fmt: skip
    distinct = {tuple(r.tolist()) for r in ro.responses}
    assert len(distinct) > 1, "top_k=0 fell back to the checkpoint's top_k=1: greedy sampling"
