"""The model-family registry (vppo.models): every family implements every piece, an unsupported
model_type is refused before anything heavy loads, and the families behave as their modules say."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FAMILIES


def test_every_family_is_registered_and_complete():
    from vppo import models

    assert models.supported() == sorted(FAMILIES)  # the parametrised tests cover every family
    for name, fam in models.FAMILIES.items():
        assert fam.model_type == name
        assert models.missing_pieces(type(fam)) == [], name
        assert fam.grid == fam.patch * fam.merge


def test_a_family_without_a_required_piece_is_refused_naming_it():
    from vppo import models
    from vppo.models.qwen3_vl import Qwen3_VL

    class NoRope(models.Family):  # everything but rope_positions, and no patch
        model_type, hf_class, processor_class, merge = "nope", "NopeModel", "NopeProcessor", 2
        share_image_features = Qwen3_VL.share_image_features
        vision_tower = Qwen3_VL.vision_tower
        apply_liger = Qwen3_VL.apply_liger
        chat_template = Qwen3_VL.chat_template
        build_processor = Qwen3_VL.build_processor
        build_model = Qwen3_VL.build_model

    with pytest.raises(TypeError, match="NoRope lacks rope_positions, patch"):
        models.register(NoRope)
    assert "nope" not in models.FAMILIES
    with pytest.raises(ValueError, match="registered twice"):
        models.register(Qwen3_VL)


def test_unsupported_model_type_is_an_error_naming_the_supported_ones(tmp_path):
    from vppo import models
    from vppo.config import check_sources, load_config

    with pytest.raises(ValueError, match="'llava'.*supported model types: qwen2_5_vl, qwen3_vl"):
        models.family("llava")
    with pytest.raises(ValueError, match="processor object belongs to no supported model family"):
        models.family_of_processor(object())
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    cfg = load_config(None, [f"model.path={tmp_path}"])
    with pytest.raises(
        ValueError, match=r"model.path has model_type 'llava'.*supported: qwen2_5_vl, qwen3_vl"
    ):
        check_sources(cfg)


@pytest.mark.parametrize("name", FAMILIES)
def test_family_pieces_on_a_built_model(name, tmp_path):
    """Built from the family, saved and reloaded: the model_type chooses the family back, the vision
    tower is the model's, the processor's patch is the family's and the template renders images."""
    from transformers import AutoModelForImageTextToText

    from vppo import models
    from vppo.data import load_processor
    from vppo.tiny import build_tokenizer

    fam = models.family(name)
    tok = build_tokenizer(["a b c"] * 5, vocab_size=300, chat_template=fam.chat_template())
    proc = fam.build_processor(tok, fam.grid**2, 4 * fam.grid**2)
    model = fam.build_model(models.Size(hidden=32, intermediate=64, layers=2, heads=2, kv_heads=1,
                                        vision_depth=1, vision_hidden=32, vision_intermediate=64,
                                        vision_heads=2), tok)  # fmt: skip
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    assert models.family_of_path(tmp_path) is fam
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert type(hf).__name__ == fam.hf_class and models.family_of(hf) is fam
    tower = fam.vision_tower(hf)
    assert tower.patch_size == fam.patch and tower.spatial_merge_size == fam.merge
    back = load_processor(tmp_path)
    assert models.family_of_processor(back) is fam
    assert back.image_processor.patch_size == fam.patch and back.image_processor.merge_size == fam.merge
    text = back.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}],
        add_generation_prompt=True, tokenize=False,
    )  # fmt: skip
    assert "<|vision_start|><|image_pad|><|vision_end|>q<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    # text-only fallback: 0..L-1 on every axis
    ids = torch.zeros(2, 5, dtype=torch.long)
    pos = fam.rope_positions(hf, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert torch.equal(pos, torch.arange(5).expand(3, 2, 5))


def test_vppo_8b_config_is_the_released_8b_script():
    """configs/vppo_8b.yaml: examples/configs/train_vppo_8b.sh as a config of this loop, with the
    derived batch numbers its header prints."""
    from vppo.config import derived, load_config

    c = load_config("configs/vppo_8b.yaml", world_size=8)
    assert c.model.path == "Qwen/Qwen3-VL-8B-Instruct" and c.algo.patch_size == 16
    assert (c.train.total_steps, c.train.global_batch) == (130, 128)
    assert (c.rollout.rollout_batch_size, c.rollout.n) == (384, 8)
    assert (c.algo.topk_ratio, c.algo.b_min, c.algo.entropy_coef) == (0.4, 0.9, 0.12)
    assert (c.rollout.max_response_len, c.data.max_prompt_len) == (8192, 4096)
    assert (c.train.micro_batch, c.train.logprob_micro_batch) == (4, 8)
    d = derived(c, 8, n_train=38870, print_fn=None)
    assert (d.optimizer_steps_per_rollout, d.grad_accum_per_rank, d.logprob_passes_per_rank) == (3, 32, 48)
    assert (d.steps_per_epoch, d.total_steps, d.total_optimizer_steps) == (101, 130, 390)


@pytest.mark.parametrize("name", FAMILIES)
def test_export_reload_and_evaluate_each_family(name, tmp_path):
    """One VPPO step on the family's micro model, exported (run.export_hf), reloaded with
    from_pretrained: the trained weights' logits, the family's classes; then `vppo.eval` on it."""
    import shutil

    from helpers import make_micro_model, make_synth, train_setup
    from transformers import AutoModelForImageTextToText

    from vppo import eval as veval
    from vppo import models
    from vppo.data import encode_prompts, load_problems, load_processor
    from vppo.export import export_hf
    from vppo.train import train_step

    layers = 2 if name == "qwen3_vl" else 1  # a DeepStack feature added after layer 0 reaches the output
    model = make_micro_model(tmp_path / "m", layers=layers, family=name)
    synth = make_synth(tmp_path / "d", n_train=16, n_val=4, n_test=4)
    run = train_setup((model, synth), tmp_path / "run", "train.total_steps=1")
    train_step(run, 1)
    exp = tmp_path / "export"
    export_hf(run.engine, run.processor, exp, 0, run.cfg.data.prompt_suffix)
    back = AutoModelForImageTextToText.from_pretrained(exp, local_files_only=True).eval()
    proc = load_processor(exp)
    assert (
        type(back).__name__ == models.family(name).hf_class
        and models.family_of_processor(proc).model_type == name
    )
    inputs = encode_prompts(list(load_problems(synth / "train.parquet", "train"))[:2], proc)
    base = AutoModelForImageTextToText.from_pretrained(model, local_files_only=True).eval()
    run.hf.eval()
    with torch.no_grad():
        got, want, init = back(**inputs).logits, run.hf(**inputs).logits, base(**inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert float((init - want).abs().max()) > 1e-4  # the export holds the trained weights
    data = tmp_path / "bench"
    data.mkdir()
    shutil.copy(synth / "test.parquet", data / "synth.parquet")
    res = veval.main(["--model", str(exp), "--benchmarks", "synth", "--data-dir", str(data), "--out",
                      str(tmp_path / "eval"), "--samples", "2", "--max-new-tokens", "8", "--limit", "4",
                      "--no-progress"])  # fmt: skip
    assert res["summary"]["synth"]["problems"] == 4 and 0 <= res["summary"]["synth"]["accuracy"] <= 1


@pytest.mark.parametrize("name", FAMILIES)
def test_load_policy_freezes_the_familys_vision_tower_and_applies_its_liger_patch(name, tmp_path):
    from helpers import make_micro_model

    from vppo.config import load_config
    from vppo.model import FusedLMHead, load_policy

    path = make_micro_model(tmp_path / "m", family=name)
    hf = load_policy(load_config(None, [f"model.path={path}", "model.freeze_vision=true"]))
    frozen = {k for k, p in hf.named_parameters() if not p.requires_grad}
    assert frozen and frozen == {k for k, _ in hf.named_parameters() if k.startswith("model.visual.")}
    assert isinstance(hf.lm_head, FusedLMHead)
    # Liger: the family's patch, or (liger-kernel 0.8.5 with transformers 5.x: its output classes
    # do not import) an error that names the patch and the versions
    try:
        hf = load_policy(load_config(None, [f"model.path={path}", "model.liger=true"]))
    except RuntimeError as e:
        assert f"apply_liger_kernel_to_{name}" in str(e) and "transformers" in str(e), e
    else:
        assert "Liger" in type(hf.model.language_model.norm).__name__


@pytest.mark.parametrize("name", FAMILIES)
def test_vision_in_every_pass_changes_no_output_and_runs_the_tower_without_an_image(name, tmp_path):
    """vision_in_every_pass (installed with several ranks): with images, the hidden states, their
    gradients and greedy generations are those of the plain model, bitwise; without an image the
    tower runs once per forward on the family's dummy image, every vision parameter gets a gradient
    (zero) and nothing else changes; a decoding step with a filled cache runs no tower."""
    import copy
    import dataclasses

    from helpers import make_micro_model, make_synth
    from transformers import AutoModelForImageTextToText

    from vppo import data as vdata
    from vppo.model import vision_in_every_pass
    from vppo.models import family
    from vppo.rollout import response_hidden

    path = make_micro_model(tmp_path / "m", family=name)
    synth = make_synth(tmp_path / "s", n_train=2, n_val=2, n_test=2)
    proc = vdata.load_processor(path)
    probs = list(vdata.load_problems(synth / "train.parquet", processor=proc))[:2]
    text_only = [dataclasses.replace(p, problem=p.problem.replace("<image>", ""), images=(), image_sizes=())
                 for p in probs]  # fmt: skip
    plain = AutoModelForImageTextToText.from_pretrained(path).eval()
    hooked = copy.deepcopy(plain)
    vision_in_every_pass(hooked)
    calls = []
    family(name).vision_tower(hooked).register_forward_hook(lambda *a: calls.append(1))

    for batch, images in ((probs, True), (text_only, False)):
        inputs = dict(vdata.encode_prompts(batch, proc))
        assert ("pixel_values" in inputs) is images
        grads = []
        for model in (plain, hooked):
            model.zero_grad()
            h = response_hidden(model, inputs, 4)
            h.pow(2).sum().backward()
            grads.append({k: p.grad for k, p in model.named_parameters()})
            if model is plain:
                want = h.detach()
        assert torch.equal(h.detach(), want)
        tower = {k for k in grads[0] if k.startswith("model.visual.")}
        assert tower and all(grads[1][k] is not None for k in tower)
        for k, g in grads[0].items():
            if g is None and k in tower:  # without an image: none in the plain model, zero here
                assert not images and torch.count_nonzero(grads[1][k]) == 0, k
            else:  # lm_head: unused by response_hidden, None in both
                assert (g is None and grads[1][k] is None) or torch.equal(grads[1][k], g), k
        assert sum(calls) == 1  # one tower pass, real or dummy
        calls.clear()
        gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=proc.tokenizer.pad_token_id)
        with torch.no_grad():
            a, b = plain.generate(**inputs, **gen), hooked.generate(**inputs, **gen)
        assert torch.equal(a, b) and b.shape[1] == inputs["input_ids"].shape[1] + 4
        assert sum(calls) == 1  # the prefill only
        calls.clear()
