"""LoRA (model.lora_rank > 0, vppo/lora.py) on the micro models: only the adapters train and their
gradients are the full model's projected onto them; the reference pass with the adapters off is the
base model; the export is the merged model; checkpoints hold the adapters and a stopped run resumes
exactly. The tests that take `fassets` run on every model family."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import FAMILIES, ROOT, make_micro_model, make_synth, subprocess_env, train_overrides, train_setup
from PIL import Image

LORA = ("model.lora_rank=4", "model.lora_alpha=8")  # scale alpha / r = 2


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    return make_micro_model(d / "model"), make_synth(d / "synth", n_train=32, n_val=4, n_test=4)


@pytest.fixture(scope="module", params=FAMILIES)
def fassets(request, assets, tmp_path_factory):
    if request.param == "qwen2_5_vl":
        return assets
    d = tmp_path_factory.mktemp(request.param)
    return make_micro_model(d / "model", layers=2, family=request.param), assets[1]


def _cfg(model, *extra):
    from vppo.config import load_config

    return load_config(None, [f"model.path={model}", *extra])


def _randomise_b(hf, seed=1):
    """B starts at zero (the adapter is then a no-op and dL/dA is zero): give it values."""
    from vppo import lora

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora._layers(hf).values():
            b = layer.lora_B[lora.ADAPTER].weight
            b.copy_(0.05 * torch.randn(b.shape, generator=g, dtype=b.dtype))


def _image_batch(path, fam):
    from vppo.data import load_processor

    proc = load_processor(path)
    img = Image.new("RGB", (2 * fam.grid, 2 * fam.grid))
    img.putdata([((7 * i) % 256, (13 * i) % 256, (29 * i) % 256) for i in range(4 * fam.grid**2)])
    text = "<|vision_start|><|image_pad|><|vision_end|>What is x? 0.5 Which bar is taller\n"
    return proc(text=[text], images=[img], return_tensors="pt")


def test_lm_head_as_a_target_is_refused_saying_why():
    from vppo.config import load_config

    with pytest.raises(ValueError, match="lora_target_modules.*FusedLMHead"):
        load_config(None, ["model.lora_rank=4", "model.lora_target_modules=[q_proj,lm_head]"])
    with pytest.raises(ValueError, match="model.lora_rank must be >= 0"):
        load_config(None, ["model.lora_rank=-1"])


def test_a_target_that_matches_no_layer_is_named(assets):
    from vppo.model import load_policy

    with pytest.raises(ValueError, match=r"lora_target_modules: \['qkv_proj'\] match no Linear"):
        load_policy(_cfg(assets[0], *LORA, "model.lora_target_modules=[q_proj,qkv_proj]"))


@pytest.mark.parametrize("vision", [False, True])
def test_only_adapter_parameters_get_gradients_equal_to_the_projected_full_gradients(fassets, vision):
    """dL/dB = scale * dL/dW @ A^T and dL/dA = scale * B^T @ dL/dW, with dL/dW from autograd on the
    plain model holding the merged weights W + scale * B @ A. float32: the RMSNorms compute in float32
    whatever the model dtype, so the paths differ by float32 rounding (measured 1e-6 of the largest
    entry); a missing scale or transpose is off by O(1)."""
    from vppo import lora
    from vppo.model import FusedLMHead, load_policy
    from vppo.models import family_of

    path = fassets[0]
    hf = load_policy(_cfg(path, *LORA, f"model.lora_vision={vision}"))
    fam = family_of(hf)
    _randomise_b(hf)
    layers = lora._layers(hf)
    vis = [n for n in layers if n.startswith("model.visual.")]
    assert bool(vis) == vision and len(layers) > len(vis)
    assert isinstance(hf.lm_head, FusedLMHead) and not hf.lm_head.weight.requires_grad
    full = load_policy(_cfg(path))
    full.load_state_dict(lora.merged_state(hf))

    batch = _image_batch(path, fam)
    g = torch.Generator().manual_seed(2)
    targets = torch.randint(0, hf.config.get_text_config().vocab_size, batch["input_ids"].shape, generator=g)
    for model in (hf, full):
        logits = model(**batch, use_cache=False).logits  # (1, T, V)
        logits.log_softmax(-1).gather(-1, targets[..., None]).sum().backward()

    trained = {n for n, p in hf.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in hf.named_parameters() if p.requires_grad}
    assert trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert len(trained) == 2 * len(layers)
    for name, layer in layers.items():
        a, b = layer.lora_A[lora.ADAPTER].weight, layer.lora_B[lora.ADAPTER].weight  # (r, in), (out, r)
        s = layer.scaling[lora.ADAPTER]
        assert s == 2.0
        dw = full.get_submodule(name).weight.grad  # (out, in)
        assert dw.abs().max() > 0, name
        for got, want in ((b.grad, s * dw @ a.T), (a.grad, s * b.T @ dw)):
            assert (got - want).abs().max() <= 1e-5 * want.abs().max(), name


def test_reference_pass_with_adapters_off_equals_the_base_models_logprobs(fassets, tmp_path):
    """algo.kl_coef > 0 with LoRA: no second model; traj.ref_logp is the base model's log-probs."""
    from vppo import loss, packing
    from vppo.model import load_policy
    from vppo.train import prepare

    run = train_setup(fassets, tmp_path / "r", *LORA, "algo.kl_coef=0.01")
    assert run.ref is None
    _randomise_b(run.hf)  # adapters that change the policy, so the two passes differ
    traj, _ = prepare(run, 1)
    base = load_policy(_cfg(fassets[0])).eval()
    want = loss.score(
        base, traj.select(range(len(traj))), run.opts, ids=run.ids, micro=8, dependency=False,
        **packing.pass_options(run.cfg.train, None),
    ).old_logp  # fmt: skip
    valid = traj.response_mask
    torch.testing.assert_close(traj.ref_logp[valid], want[valid], rtol=1e-5, atol=1e-5)
    assert (traj.ref_logp[valid] - traj.old_logp[valid]).abs().max() > 1e-3  # the adapters are on again


def _run(assets, out, steps, *extra):
    ov = train_overrides(
        assets, out, *LORA, "algo.kl_coef=0.01", "run.save_every=1", f"train.total_steps={steps}"
    )
    env = subprocess_env(OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "vppo.train", *ov, *extra], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    return p


def _records(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("train.deepspeed=configs/ds_zero2.json", "model.gradient_checkpointing=true"),
        ("train.deepspeed=configs/ds_zero3.json",),
    ],
    ids=["z0", "z2", "z3"],
)
def test_stopped_and_resumed_equals_the_uninterrupted_run_and_checkpoints_hold_adapters_only(
    assets, tmp_path, extra
):
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    from vppo import lora

    a, b = tmp_path / "a", tmp_path / "b"
    _run(assets, a, 3, *extra)
    _run(assets, b, 2, *extra)  # stopped after step 2 ...
    p = _run(assets, b, 3, *extra)  # ... and resumed to step 3
    assert "resumed from" in p.stdout
    ra, rb = _records(a), _records(b)
    assert sorted(ra) == sorted(rb) == [1, 2, 3]
    for step in (1, 2, 3):
        for key in ("reward", "loss", "grad_norm", "kl_loss", "response_len", "dep_mean"):
            assert rb[step][key] == pytest.approx(ra[step][key], rel=1e-5, abs=1e-7), (step, key)
    assert ra[3]["kl_loss"] > 0  # the adapters moved the policy away from the reference

    # the checkpoint: the adapters (and their optimizer state), not the frozen base
    ck = b / "checkpoints" / "step-00000003" / "engine" / "state"
    (states,) = ck.glob("*mp_rank_00_model_states.pt")  # ZeRO-3: zero_pp_rank_0_mp_rank_00_...
    module = torch.load(states, weights_only=False)["module"]
    assert module and all(".lora_A." in k or ".lora_B." in k for k in module), sorted(module)[:5]
    n_base = sum(t.numel() for t in load_file(str(assets[0] / "model.safetensors")).values())
    n_saved = sum(f.stat().st_size for f in ck.iterdir())
    assert n_saved < 4 * n_base  # far below the fp32 base weights alone (4 bytes each)

    # export/: the merged model (loads as a plain model) equals base + scale * B @ A; the adapter beside
    merged_a = AutoModelForImageTextToText.from_pretrained(a / "export").state_dict()
    merged_b = AutoModelForImageTextToText.from_pretrained(b / "export").state_dict()
    for k, v in merged_a.items():
        torch.testing.assert_close(merged_b[k], v, rtol=1e-5, atol=1e-7, msg=k)
    base = AutoModelForImageTextToText.from_pretrained(assets[0]).state_dict()
    adapter = load_file(str(a / "export" / lora.ADAPTER_DIR / "adapter_model.safetensors"))
    conf = json.loads((a / "export" / lora.ADAPTER_DIR / "adapter_config.json").read_text())
    scale = conf["lora_alpha"] / conf["r"]
    adapted = 0
    for k, w in base.items():
        key = f"base_model.model.{k.removesuffix('.weight')}.lora_A.weight"
        if key in adapter:
            bm, am = adapter[key.replace("lora_A", "lora_B")], adapter[key]
            assert bm.abs().max() > 0, k  # trained
            torch.testing.assert_close(merged_a[k], w + scale * bm @ am, rtol=1e-6, atol=1e-7, msg=k)
            adapted += 1
        else:
            assert torch.equal(merged_a[k], w), k  # frozen, untouched
    assert adapted == 7  # q k v o gate up down of the one LLM layer


def _worker(nproc, rollout, out, overrides):
    port = str(29700 + nproc + os.getpid() % 200)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", port,
           str(ROOT / "tests" / "dist_update_worker.py"), str(rollout), str(out), *overrides]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=ROOT,
                       timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_two_gloo_ranks_under_zero3_equal_one_process(assets, tmp_path):
    """The optimizer steps of one fixed rollout batch with LoRA under ZeRO-3 (gradient checkpointing
    on): two gloo ranks give the losses and the weights of one process; only the adapters moved."""
    from vppo.distributed import gathered
    from vppo.train import prepare

    extra = (*LORA, "algo.kl_coef=0.01", "algo.shaping=global", "train.deepspeed=configs/ds_zero3.json",
             "model.gradient_checkpointing=true")  # fmt: skip
    run = train_setup(assets, tmp_path / "gen", *extra)
    traj, _ = prepare(run, 1)
    rollout = tmp_path / "rollout.pt"
    torch.save({"batch": traj, "ids": run.ids}, rollout)
    ov = train_overrides(assets, tmp_path / "w", *extra)
    one = _worker(1, rollout, tmp_path / "one.pt", ov)
    two = _worker(2, rollout, tmp_path / "two.pt", ov)
    assert len(one["losses"]) == 2  # two optimizer steps
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    with gathered(list(run.hf.parameters())):  # the generating run's ZeRO-3 partitions
        init = {k: v.clone() for k, v in run.hf.state_dict().items()}
    moved = set()
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        if not torch.equal(v, init[k]):
            moved.add(k)
    assert moved and all(".lora_A." in k or ".lora_B." in k for k in moved), sorted(moved)[:5]
    assert any(".lora_A." in k for k in moved)  # A moves from the second step on (B was zero at the first)


@pytest.mark.vllm
def test_vllm_rollouts_sample_from_the_merged_weights(tmp_path):
    """rollout.engine=vllm with LoRA (the vLLM environment: `make test-vllm`): after the adapters moved,
    the merged push keeps vLLM's sampled log-probs equal to the trainer's clean pass (1e-4, fp32). A
    push of the base weights alone would be off by the adapters' update (alpha / r = 16 here)."""
    try:
        import vllm  # noqa: F401
    except ImportError as e:  # selected without vllm: fail loudly, never skip (as tests/test_vllm_engine.py)
        pytest.fail(f"this test needs vllm (run it in the vLLM environment): {e}")
    model = make_micro_model(tmp_path / "micro", hidden=64)  # head_dim 32: vLLM's CPU attention
    synth = make_synth(tmp_path / "synth")
    out = tmp_path / "run"
    args = train_overrides((model, synth), out, "rollout.engine=vllm", "train.total_steps=3",
                           "model.lora_rank=4", "model.lora_alpha=64")  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "vppo.train", *args], cwd=ROOT, env=subprocess_env(),
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [r for r in _records(out).values() if "reward" in r]
    assert [r["step"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["logp_mismatch_max"] < 1e-4 and r["push_seconds"] > 0, r
    assert recs[-1]["grad_norm"] > 0
