"""The vLLM sampling engine (rollout.engine=vllm) against the hf engine, with the REAL engine.

These tests need vllm: they carry the `vllm` marker, which the main environment deselects
(pyproject addopts `-m "not vllm"`), and run in the vLLM environment (`make test-vllm`, called by
.ci/run): `.venv-vllm/bin/python -m pytest -m vllm tests/test_vllm_engine.py`. Where vllm is missing
and they are selected anyway they fail, never skip.

The models are the micro models of tests/helpers.py, one per family (Qwen2.5-VL, Qwen3-VL: every
test runs on both), at hidden 64 (head_dim 32: vLLM's CPU attention has no kernel for 16; the family
builders scale the rope sections to it); the Qwen3-VL one has two LLM layers and DeepStack from its
one vision layer.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import FAMILIES, ROOT, make_micro_model, make_synth, subprocess_env, train_overrides

pytestmark = pytest.mark.vllm

# fp32 on both sides: the engine's log-prob of a sampled token is log_softmax of the same logits the
# trainer's clean pass computes, up to summation order (measured max 5.8e-6 in the probe).
LOGP_TOL = 1e-4


def _need_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # selected without vllm: fail loudly, never skip
        pytest.fail(f"the vllm tests need vllm (run them with `make test-vllm`): {e}")


@pytest.fixture(scope="module", params=FAMILIES)
def assets(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"vllm_assets_{request.param}")
    layers = 2 if request.param == "qwen3_vl" else 1  # DeepStack after layer 0 reaches the responses
    model = make_micro_model(root / "micro", hidden=64, layers=layers, family=request.param)
    return model, make_synth(root / "synth")


@pytest.fixture(scope="module")
def run(assets, tmp_path_factory):
    """One training run's set-up with rollout.engine=vllm (the engine is built once per module)."""
    _need_vllm()
    from helpers import train_setup

    return train_setup(assets, tmp_path_factory.mktemp("vllm_run"), "rollout.engine=vllm")


def _hf_traj(run, probs):
    from vppo.data import encode_prompts
    from vppo.rollout import generate

    inputs = encode_prompts(probs, run.processor, run.cfg.data.prompt_suffix)
    i = run.ids
    return inputs, generate(
        run.hf, inputs, run.cfg.rollout.n, run.gen, eos_ids=i.eos, pad_id=i.pad, suppress_ids=i.vision,
        vision_start_id=i.vision_start, tokenizer=run.processor.tokenizer,
    )  # fmt: skip


def test_engine_built_and_sampling_params_explicit(run):
    from vppo.vllm_engine import VLLMEngine

    eng = run.sampler
    assert isinstance(eng, VLLMEngine)
    sp = eng.sampling_params(4, replace(run.gen, top_k=0))
    assert sp.top_k in (0, -1) and sp.repetition_penalty == 1.0  # off, and never the checkpoint's
    assert sp.presence_penalty == 0.0 and sp.frequency_penalty == 0.0 and sp.min_p == 0.0
    assert sp.n == 4 and sp.logprobs == 0 and sp.max_tokens == run.gen.max_new_tokens
    assert set(sp.stop_token_ids) == set(run.ids.eos)
    assert not set(sp.allowed_token_ids) & set(run.ids.vision)
    assert len(sp.allowed_token_ids) == len(run.processor.tokenizer) - len(run.ids.vision)
    assert eng.sampling_params(4, replace(run.gen, top_k=7)).top_k == 7


def test_layout_masks_groups_match_hf(run):
    """Same prompt rows, images, grids, groups and mask rule as the hf engine; no vision token."""
    from vppo.rollout import response_mask_from

    probs = list(run.train_set)[:4]
    inputs, hf = _hf_traj(run, probs)
    run.sampler.push(run.hf)
    vl = run.sampler.generate(probs, inputs, run.cfg.rollout.n, run.gen, tokenizer=run.processor.tokenizer)
    n = run.cfg.rollout.n
    assert len(vl) == len(hf) == 4 * n and vl.prompt_len == hf.prompt_len
    P = vl.prompt_len
    assert torch.equal(vl.input_ids[:, :P], hf.input_ids[:, :P])
    assert torch.equal(vl.attention_mask[:, :P], hf.attention_mask[:, :P])
    assert torch.equal(vl.mm_token_type_ids, torch.cat([hf.mm_token_type_ids[:, :P],
                                                        torch.zeros_like(vl.responses)], 1))  # fmt: skip
    assert torch.equal(vl.group, hf.group) and vl.group.tolist() == [g for g in range(4) for _ in range(n)]
    assert all(torch.equal(a, b) for a, b in zip(vl.pixel_values, hf.pixel_values))
    assert all(torch.equal(a, b) for a, b in zip(vl.image_grid_thw, hf.image_grid_thw))
    assert sum(g.shape[0] for g in vl.image_grid_thw) == 4 * n  # every prompt has its image
    # the response mask: up to and including the first EOS, pad after it, attention = mask
    assert torch.equal(vl.response_mask, response_mask_from(vl.responses, run.ids.eos) & vl.response_mask)
    assert torch.equal(vl.attention_mask[:, P:], vl.response_mask.long())
    assert (vl.responses[~vl.response_mask] == run.ids.pad).all()
    assert vl.response_mask[:, 0].all()
    assert not torch.isin(vl.responses, torch.tensor(run.ids.vision)).any()
    assert vl.sampler_logp.shape == vl.response_mask.shape
    assert (vl.sampler_logp[~vl.response_mask] == 0).all() and (vl.sampler_logp[vl.response_mask] < 0).all()
    assert len(vl.texts) == len(vl)


def test_everything_after_sampling_is_engine_independent(run):
    """The same rollout rows, with and without the vllm engine's extra field, give the same scores and
    the same loss: `sampler_logp` is logged, never read by the scoring passes or the update."""
    from functools import partial

    from vppo import loss, objective
    from vppo.rollout import model_inputs

    probs = list(run.train_set)[:2]
    inputs, _ = _hf_traj(run, probs)
    run.sampler.push(run.hf)
    vl = run.sampler.generate(probs, inputs, run.cfg.rollout.n, run.gen, tokenizer=run.processor.tokenizer)
    hf_like = replace(vl, sampler_logp=None)
    outs = []
    run.hf.eval()
    for t in (vl, hf_like):
        t.rewards = torch.arange(len(t), dtype=torch.float32) % 3
        loss.score(run.hf, t, run.opts, ids=run.ids, micro=8, dependency=False)
        adv = objective.group_advantages(t.rewards, run.cfg.rollout.n)
        fn = partial(loss.vppo_loss_linear, labels=t.responses, old_logp=t.old_logp, advantages=adv,
                     token_mask=None, response_mask=t.response_mask, opts=run.opts)  # fmt: skip
        with torch.no_grad():
            out, stats = run.engine(
                model_inputs(t, vision_ids=run.ids.vision, pad_id=run.ids.pad), t.prompt_len, fn
            )
        outs.append((t.old_logp, t.entropy, out, stats))
    (la, ea, oa, sa), (lb, eb, ob, sb) = outs
    assert torch.equal(la, lb) and torch.equal(ea, eb) and torch.equal(oa, ob) and sa == sb


def test_step_mismatch_push_and_greedy_after_update(run):
    """A training step on vLLM rollouts: sampled log-probs equal the trainer's clean pass (1e-4, fp32),
    the mismatch lands in the metrics; after the update and a push, vLLM's greedy outputs equal HF
    greedy generation from the updated weights (and differ from the engine's pre-push outputs)."""
    from vllm import SamplingParams

    from vppo.train import train_step

    rec = train_step(run, 1)
    for k in ("push_seconds", "rollout_tokens_per_second", "logp_mismatch_mean", "logp_mismatch_max",
              "time_generate"):  # fmt: skip
        assert k in rec, k
    assert 0 <= rec["logp_mismatch_mean"] <= rec["logp_mismatch_max"] < LOGP_TOL
    assert rec["push_seconds"] > 0 and rec["rollout_tokens_per_second"] > 0

    probs = list(run.train_set)[4:8]
    inputs, _ = _hf_traj(run, probs)
    eng = run.sampler
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=run.gen.max_new_tokens, top_k=0,
                            repetition_penalty=1.0, stop_token_ids=list(run.ids.eos),
                            allowed_token_ids=eng.allowed, detokenize=False)  # fmt: skip
    P = inputs["input_ids"].shape[1]

    def vllm_greedy():
        from vppo.vllm_engine import collapse_runs

        reqs = [{"prompt_token_ids": collapse_runs(r[m.bool()].tolist(), run.sampler.image_pad),
                 "multi_modal_data": {"image": p.pil_images()[0]}}
                for r, m, p in zip(inputs["input_ids"], inputs["attention_mask"], probs)]  # fmt: skip
        return [list(o.outputs[0].token_ids) for o in run.sampler.llm.generate(reqs, greedy, use_tqdm=False)]

    before = vllm_greedy()  # the engine still holds the weights pushed before the step's update
    run.sampler.push(run.hf)
    after = vllm_greedy()
    assert before != after, "the push did not change the engine's outputs"
    run.hf.eval()
    kw = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "mm_token_type_ids",
                                                   "pixel_values", "image_grid_thw")}  # fmt: skip
    out = run.hf.generate(**kw, do_sample=False, max_new_tokens=run.gen.max_new_tokens,
                          eos_token_id=run.ids.eos, pad_token_id=run.ids.pad, suppress_tokens=run.ids.vision,
                          repetition_penalty=1.0, top_k=None, top_p=None, temperature=None)  # fmt: skip
    from vppo.rollout import response_mask_from

    resp = out[:, P:]
    mask = response_mask_from(resp, run.ids.eos)
    hf_rows = [r[m].tolist() for r, m in zip(resp, mask)]
    assert after == hf_rows


def test_two_step_run_with_vllm_engine(assets, tmp_path):
    """`python -m vppo.train rollout.engine=vllm` end to end: two steps, metrics carry the engine's."""
    _need_vllm()
    out = tmp_path / "run"
    args = train_overrides(assets, out, "rollout.engine=vllm", "train.total_steps=2", "algo.name=vppo")
    p = subprocess.run([sys.executable, "-m", "vppo.train", *args], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in recs if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["logp_mismatch_max"] < LOGP_TOL and r["push_seconds"] > 0 and r["time_generate"] > 0
        assert r["rollout_tokens_per_second"] > 0 and "kl_mean" in r  # VPPO's dependency pass ran


def test_eval_with_vllm_engine(assets, tmp_path):
    """`python -m vppo.eval --engine vllm` on the micro model: avg@2 of four synthetic problems."""
    _need_vllm()
    import shutil

    model, synth = assets
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(synth / "test.parquet", data / "synth.parquet")
    out = tmp_path / "eval"
    args = ["--model", str(model), "--benchmarks", "synth", "--data-dir", str(data), "--out", str(out),
            "--engine", "vllm", "--samples", "2", "--max-new-tokens", "8", "--limit", "4",
            "--no-progress"]  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "vppo.eval", *args], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["sampling"]["engine"] == "vllm" and manifest["sampling"]["top_k"] == 50
    samples = json.loads((out / "samples.json").read_text())["synth"]
    assert len(samples) == 4 and all(len(r["samples"]) == 2 for r in samples)
    assert 0 <= manifest["results"]["benchmarks"]["synth"]["accuracy"] <= 1


def test_main_env_deselects_vllm_tests():
    """The marker is registered and the main environment's addopts deselect it."""
    text = (Path(ROOT) / "pyproject.toml").read_text()
    assert '"vllm: ' in text and "-m 'not vllm'" in text
