"""The training loop on the micro models: one step in-process, and the run-level guarantees
(distributed equivalence, kill-and-resume, config errors) in subprocesses. The tests that take
`fassets` run on every model family (Qwen2.5-VL, Qwen3-VL); the others on Qwen2.5-VL."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from helpers import FAMILIES, ROOT, make_micro_model, make_synth, subprocess_env, train_overrides, train_setup


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    return make_micro_model(d / "model"), make_synth(d / "synth", n_train=32, n_val=4, n_test=4)


@pytest.fixture(scope="module", params=FAMILIES)
def fassets(request, assets, tmp_path_factory):
    """(micro model of each family, the synthetic set). Qwen3-VL: two LLM layers, so the DeepStack
    feature (added after layer 0) reaches the responses and its merger trains."""
    if request.param == "qwen2_5_vl":
        return assets
    d = tmp_path_factory.mktemp(request.param)
    return make_micro_model(d / "model", layers=2, family=request.param), assets[1]


def test_vppo_step_moves_every_trainable_parameter(fassets, tmp_path):
    from vppo.train import train_step

    run = train_setup(fassets, tmp_path)
    before = {k: p.detach().clone() for k, p in run.hf.named_parameters() if p.requires_grad}
    rec = train_step(run, 1)
    after = dict(run.hf.named_parameters())
    frozen = [k for k, v in before.items() if torch.equal(v, after[k].detach())]
    assert not frozen, f"parameters unchanged by a step: {frozen[:5]}"
    assert rec["skipped_steps"] == 0 and math.isfinite(rec["grad_norm"]) and rec["grad_norm"] > 0
    assert 0 < rec["kept_frac"] < 1 and rec["dep_mean"] >= 0


def test_learning_rate_warms_up_linearly_then_stays(assets, tmp_path):
    from vppo.train import prepare, update

    run = train_setup(assets, tmp_path, "train.warmup_steps=3", "train.lr=1e-3")
    traj, _ = prepare(run, 1)
    lrs = [s["lr"] for _ in range(3) for s in update(run.engine, traj, run.cfg, run.opts, run.ids, run.world)]
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3, 1e-3])


def test_perturbed_pass_sees_another_image_and_mask_keeps_ceil_k_L(fassets, tmp_path):
    from vppo.train import prepare, shape

    run = train_setup(fassets, tmp_path)
    traj, _ = prepare(run, 1)
    for clean, masked, grid in zip(traj.pixel_values, traj.masked_pixel_values, traj.image_grid_thw):
        assert masked.shape == clean.shape and grid.shape[0] >= 1
        assert not torch.equal(masked, clean)
    valid = traj.response_mask
    assert float(traj.kl[valid].max()) > 1e-6  # the masked pass really saw a different image
    assert torch.all(traj.kl[~valid] == 0)
    lengths = valid.sum(-1)
    want = torch.tensor([math.ceil(0.4 * int(n) - 1e-9) for n in lengths])
    assert torch.equal(traj.token_mask.sum(-1), want)  # TGF: the top 40 % of each response
    assert not bool((traj.token_mask & ~valid).any())
    shaped, alpha = shape(run.cfg, traj.select(range(8)))  # TAS on one micro-batch of 8 rows
    assert alpha.min() >= run.cfg.algo.b_min - 1e-6 and alpha.max() > alpha.min()
    torch.testing.assert_close(shaped, alpha * traj.advantages[:8])


def test_non_finite_loss_skips_the_optimizer_step(assets, tmp_path):
    from vppo.train import prepare, update

    run = train_setup(assets, tmp_path)
    traj, _ = prepare(run, 1)
    traj.advantages = traj.advantages.clone()
    traj.advantages[0] = float("nan")  # poisons the first optimizer step only
    before = {k: p.detach().clone() for k, p in run.hf.named_parameters()}
    steps = update(run.engine, traj, run.cfg, run.opts, run.ids, run.world)
    assert [s["skipped"] for s in steps] == [True, False]
    assert not math.isfinite(steps[0]["grad_norm"])
    assert run.engine.vppo_guard.skipped == 1
    # the second step ran from the untouched weights and moments
    assert any(not torch.equal(before[k], p.detach()) for k, p in run.hf.named_parameters())


def test_image_pad_token_in_a_response_does_not_break_scoring(fassets, tmp_path):
    from vppo.loss import LossOptions, score
    from vppo.train import prepare

    run = train_setup(fassets, tmp_path)
    traj, _ = prepare(run, 1)
    first = traj.old_logp.clone()
    pad_id = run.processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    traj.input_ids[0, traj.prompt_len] = pad_id  # a sampled vision token inside the response
    again = score(run.hf, traj, LossOptions(impl="torch"), ids=run.ids, micro=3, dependency=True)
    assert torch.isfinite(again.old_logp).all()
    assert (again.old_logp <= 0).all()
    # rows without the token are scored exactly as before, whatever the micro-batch size
    torch.testing.assert_close(again.old_logp[1:], first[1:], rtol=1e-5, atol=1e-5)


def test_prompt_suffix_reaches_rollouts_validation_and_the_length_filter(assets, tmp_path, monkeypatch):
    import vppo.evaluate
    from vppo.data import PROMPT_SUFFIX
    from vppo.train import prepare, validate

    suffix = "Answer in a box."
    run = train_setup(
        assets, tmp_path, f"data.prompt_suffix={suffix}", "run.val_every=1", "run.val_samples=2"
    )
    traj, _ = prepare(run, 1)
    tok = run.processor.tokenizer
    prompt = tok.decode(traj.input_ids[0, : traj.prompt_len])
    assert suffix in prompt and PROMPT_SUFFIX not in prompt
    seen = []
    real = vppo.evaluate.encode_prompts

    def spy(problems, processor, suffix=PROMPT_SUFFIX, **kw):
        seen.append(suffix)
        return real(problems, processor, suffix, **kw)

    monkeypatch.setattr(vppo.evaluate, "encode_prompts", spy)
    validate(run, 1)
    assert seen and set(seen) == {suffix}
    # the overlong filter measures prompts with the configured suffix: a bound that every prompt
    # with the short suffix meets drops every prompt with the long default one
    from vppo.data import prompt_length

    bound = max(prompt_length(p, run.processor, suffix) for p in run.train_set)
    assert bound < min(prompt_length(p, run.processor, PROMPT_SUFFIX) for p in run.train_set)
    short = train_setup(
        assets, tmp_path / "s", f"data.prompt_suffix={suffix}", f"data.max_prompt_len={bound}"
    )
    assert len(short.train_set) == len(run.train_set) and short.train_set.stats.overlong == 0
    with pytest.raises(ValueError, match=r"training set \(0 prompts\)"):
        train_setup(assets, tmp_path / "l", f"data.max_prompt_len={bound}")


def test_a_suffix_other_than_the_one_the_model_learned_is_warned_about(assets, tmp_path, caplog):
    import logging
    import shutil

    from vppo.data import save_prompt_suffix

    model = tmp_path / "model"
    shutil.copytree(assets[0], model)
    save_prompt_suffix(model, "Answer in a box.")
    with caplog.at_level(logging.WARNING, logger="vppo.train"):
        train_setup((model, assets[1]), tmp_path / "same", "data.prompt_suffix=Answer in a box.")
    assert "differs from the suffix" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="vppo.train"):
        train_setup((model, assets[1]), tmp_path / "other")
    assert "differs from the suffix" in caplog.text and "Answer in a box." in caplog.text


def test_grpo_with_a_reference_policy_starts_at_zero_kl(assets, tmp_path):
    from vppo.train import prepare, update

    run = train_setup(
        assets, tmp_path, "algo.name=grpo", "algo.shaping=none", "algo.topk_ratio=1.0", "algo.kl_coef=0.01"
    )
    traj, _ = prepare(run, 1)
    assert traj.kl is None and traj.k3 is None and traj.token_mask is None
    assert traj.masked_pixel_values is None
    valid = traj.response_mask
    # the reference is the initial policy: same log-probs, so the KL term starts at zero
    torch.testing.assert_close(traj.ref_logp[valid], traj.old_logp[valid], rtol=0, atol=1e-5)
    steps = update(run.engine, traj, run.cfg, run.opts, run.ids, run.world)
    assert abs(steps[0]["kl_loss"]) < 1e-5 and not steps[0]["skipped"]


def test_bad_config_fails_before_any_model_is_loaded(tmp_path):
    env = subprocess_env()
    for args, needle in (
        (["algo.topk_ration=0.5"], "algo.topk_ratio"),
        (["train.lr=fast"], "train.lr"),
        (["train.micro_batch=7"], "train.micro_batch"),
    ):
        t0 = time.time()
        p = subprocess.run(
            [sys.executable, "-m", "vppo.train", f"run.output_dir={tmp_path}", *args],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert p.returncode == 2, p.stderr[-2000:]
        assert needle in p.stderr
        assert "Loading weights" not in p.stderr and time.time() - t0 < 60


def _worker(tmp, nproc, rollout, out, overrides):
    port = str(29600 + nproc + os.getpid() % 300)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", port,
           str(ROOT / "tests" / "dist_update_worker.py"), str(rollout), str(out), *overrides]  # fmt: skip
    env = subprocess_env(OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process_on_the_same_global_batch(assets, tmp_path):
    from vppo.train import prepare

    extra = ("algo.shaping=global", "train.deepspeed=configs/ds_zero2.json")
    run = train_setup(assets, tmp_path / "gen", *extra)
    traj, _ = prepare(run, 1)
    rollout = tmp_path / "rollout.pt"
    torch.save({"batch": traj, "ids": run.ids}, rollout)
    ov = train_overrides(assets, tmp_path / "w", *extra)
    one = _worker(tmp_path, 1, rollout, tmp_path / "one.pt", ov)
    two = _worker(tmp_path, 2, rollout, tmp_path / "two.pt", ov)
    assert len(one["losses"]) == 2  # two optimizer steps
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    init = {k: v for k, v in run.hf.state_dict().items()}
    moved = 0
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved += not torch.equal(v, init[k])
    assert moved > 0


def _train_cmd(assets, out):
    ov = train_overrides(assets, out, "run.save_every=1", "run.keep_last=5", "run.export_hf=false")
    return [sys.executable, "-m", "vppo.train", *ov]


def _records(out):
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_resume_equals_the_uninterrupted_run(fassets, tmp_path):
    assets = fassets
    ext = tmp_path / "torch_extensions"
    env = subprocess_env(OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(ext))
    a, b = tmp_path / "a", tmp_path / "b"
    p = subprocess.run(_train_cmd(assets, a), capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    # DeepSpeed's CPU shared-memory comm op is not JIT-compiled (40-80 s on a fresh machine)
    assert not [f.name for f in ext.rglob("*.so")] and "shm_comm_op built" not in p.stdout + p.stderr
    proc = subprocess.Popen(_train_cmd(assets, b), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    first = b / "checkpoints" / "step-00000001" / "meta.json"
    deadline = time.time() + 600
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert first.exists(), "no first checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(d.name for d in (b / "checkpoints").glob("step-*") if (d / "meta.json").exists())
    assert done and done[-1] != "step-00000003", "the run finished before it was killed"
    p = subprocess.run(_train_cmd(assets, b), capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout
    ra, rb = _records(a), _records(b)
    assert sorted(rb) == sorted(ra) == [1, 2, 3]
    for step in (2, 3):
        for key in ("reward", "loss", "grad_norm", "response_len", "dep_mean", "alpha_mean"):
            assert rb[step][key] == pytest.approx(ra[step][key], rel=1e-5, abs=1e-7), (step, key)
