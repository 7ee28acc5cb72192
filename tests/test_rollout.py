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


def test_response_hidden_runs_each_repeated_image_once_with_the_per_row_values_and_gradients(tmp_path):
    from transformers import AutoModelForImageTextToText

    import vppo.rollout as vr
    from vppo.data import encode_prompts, load_problems, load_processor, vision_token_ids
    from vppo.perturb import PerturbSpec, perturb_pixel_values

    path = make_micro_model(tmp_path / "m")
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    proc = load_processor(path)
    problems = load_problems(make_synth(tmp_path / "s", n_train=4) / "train.parquet", processor=proc)
    tok = proc.tokenizer
    vision = vision_token_ids(proc)
    torch.manual_seed(0)
    ro = vr.generate(
        model, encode_prompts(problems[:3], proc), 4, vr.GenSettings(1.0, 1.0, 0, 6),
        eos_ids=[tok.convert_tokens_to_ids("<|im_end|>")], pad_id=tok.pad_token_id, suppress_ids=vision,
        vision_start_id=tok.convert_tokens_to_ids("<|vision_start|>"), tokenizer=tok,
    )  # fmt: skip
    spec = PerturbSpec(kind="patch_blacken", patch_prob=0.5)
    ro.masked_pixel_values = [
        perturb_pixel_values(p, g, spec, [i], proc.image_processor)
        for i, (p, g) in enumerate(zip(ro.pixel_values, ro.image_grid_thw))
    ]
    calls = []
    visual_forward = model.model.visual.forward

    def count(pixel_values, *a, **kw):
        calls.append(len(kw["grid_thw"]) if "grid_thw" in kw else len(a[0]))
        return visual_forward(pixel_values, *a, **kw)

    model.model.visual.forward = count
    for masked, towers in ((False, 3), (True, 12)):  # 3 prompts x 4 rows; perturbations differ per row
        inp = vr.model_inputs(ro, masked=masked, vision_ids=vision, pad_id=tok.pad_token_id)
        calls.clear()
        model.zero_grad()
        got = vr.response_hidden(model, inp, ro.prompt_len)
        assert calls == [towers], calls
        got.square().sum().backward()
        g_got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        ref = model.model(**inp, use_cache=False).last_hidden_state[:, ro.prompt_len - 1 : -1]
        ref.square().sum().backward()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
        visual = [k for k in g_got if ".visual." in f".{k}"]
        assert visual and set(g_got) == {k for k, p in model.named_parameters() if p.grad is not None}
        for k, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(g_got[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)
