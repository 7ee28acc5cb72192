"""Logged statistics of an update do not depend on how its mini-batches are split (issue 26, item 4).

One fixed rollout batch of the micro Qwen2.5-VL is updated with several splits (row counts, token
budgets 1 / 50 / large, packed rows, two gloo ranks): every statistic of the training-step record
and of each optimizer step must agree within fp32 tolerance, as the loss and gradients already do.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, make_micro_model, make_synth, subprocess_env, train_overrides, train_setup

# global TAS statistics (the released form depends on train.micro_batch by design, docs/algorithm.md
# section 3) and a reference policy, so that kl_loss is logged too
BASE = ("algo.shaping=global", "algo.kl_coef=0.01")
# timings are not statistics of the batch
UNCOMPARED = ("step_seconds", "tokens_per_second")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("stats")
    return make_micro_model(d / "model"), make_synth(d / "synth", n_train=16, n_val=4, n_test=4)


@pytest.fixture(scope="module")
def rollout(assets, tmp_path_factory):
    """One scored rollout batch (16 rows, 2 optimizer steps of 8) with advantages of both signs (the
    random micro model earns no reward) and its old log-probs moved by up to +-1.5, so that ratios
    cross both clip bounds and the dual clip (non-zero clip fractions); the reference's log-probs
    moved too, so that the KL term is not zero."""
    from vppo.train import prepare

    run = train_setup(assets, tmp_path_factory.mktemp("gen"), *BASE)
    traj, info = prepare(run, 1)
    g = torch.Generator().manual_seed(0)
    off = (torch.rand(traj.old_logp.shape, generator=g) - 0.5) * 3 * traj.response_mask
    traj.old_logp = traj.old_logp + off
    traj.advantages = torch.randn(len(traj), generator=g)
    traj.ref_logp = traj.ref_logp - torch.rand(traj.ref_logp.shape, generator=g) * traj.response_mask
    assert traj.token_mask is not None and len(set(traj.response_mask.sum(-1).tolist())) > 2
    return traj, info


@pytest.mark.parametrize("loss_agg", ["token", "seq"])
def test_step_stats_of_any_split_and_ranks_equal_the_whole_batch_stats(loss_agg):
    from vppo.objective import LossConfig, policy_loss, step_stats

    g = torch.Generator().manual_seed(1)
    b, t = 9, 7
    valid = torch.arange(t)[None, :] < torch.tensor([7, 1, 0, 4, 6, 2, 7, 3, 5])[:, None]  # an empty row
    args = dict(
        logp=-torch.rand(b, t, generator=g) * 3, old_logp=-torch.rand(b, t, generator=g) * 3,
        advantages=torch.randn(b, generator=g), token_mask=torch.rand(b, t, generator=g) < 0.5,
        response_mask=valid, ref_logp=-torch.rand(b, t, generator=g) * 3,
        sampler_logp=-torch.rand(b, t, generator=g) * 3,
    )  # fmt: skip
    cfg = LossConfig(loss_agg=loss_agg, kl_coef=0.01, tis_cap=2.0)
    part = lambda rows: {k: v[rows] for k, v in args.items()}  # noqa: E731
    _, whole = policy_loss(**args, cfg=cfg)
    for split in (
        [[0], [1, 2], [3, 4, 5, 6, 7, 8]],
        [[i] for i in range(b)],
        [[2], [0, 1, 3, 4, 5, 6, 7, 8]],
    ):
        micro = [policy_loss(**part(r), cfg=cfg)[1] for r in split]
        got = step_stats(micro, loss_agg)
        assert set(got) == set(whole) - {"loss"}
        for k, v in got.items():
            assert v == pytest.approx(whole[k], rel=1e-6, abs=1e-7), (split, k)
    # two ranks: each rank's micro-batches, the sums all-reduced
    ranks = [[[0, 1], [2]], [[3, 4, 5, 6], [7, 8]]]
    per_rank = [[policy_loss(**part(r), cfg=cfg)[1] for r in rows] for rows in ranks]
    vecs = []  # what each rank contributes to the all-reduce ...
    for rows in per_rank:
        step_stats(rows, loss_agg, lambda x, op: vecs.append(x) or x)
    for rows in per_rank:  # ... and what each then gets back
        got = step_stats(rows, loss_agg, lambda x, op: vecs[0] + vecs[1])
        for k, v in got.items():
            assert v == pytest.approx(whole[k], rel=1e-6, abs=1e-7), ("2 ranks", k)
    with pytest.raises(ValueError, match="STAT_MEAN_OVER"):
        step_stats([{**whole, "new_stat": 1.0}], loss_agg)


def test_token_scale_weights_only_the_entropy_term():
    from vppo.objective import LossConfig, policy_loss

    g = torch.Generator().manual_seed(2)
    logp = -torch.rand(3, 5, generator=g)
    valid = torch.arange(5)[None, :] < torch.tensor([5, 2, 4])[:, None]
    args = (logp, logp - 0.1, torch.tensor([1.0, -1.0, 0.5]), None, valid)
    cfg = LossConfig(loss_agg="seq", entropy_coef=0.5)
    _, st = policy_loss(*args, cfg)
    loss, _ = policy_loss(*args, cfg, loss_scale=2.0, token_scale=3.0)
    assert float(loss) == pytest.approx(2.0 * st["pg_loss"] + 3.0 * 0.5 * st["entropy_loss"], rel=1e-6)
    same, _ = policy_loss(*args, cfg, loss_scale=2.0)  # None: the loss_scale
    assert float(same) == pytest.approx(2.0 * st["loss"], rel=1e-6)
    with pytest.raises(ValueError, match="token_scale"):
        policy_loss(*args, cfg, token_scale=-1.0)


def _record(assets, tmp, rollout, monkeypatch, *extra):
    """(training-step record, per-optimizer-step stats) of vppo.train.train_step on the fixed batch."""
    import vppo.train as vt

    traj, info = rollout
    run = train_setup(assets, tmp, *BASE, *extra)
    monkeypatch.setattr(vt, "prepare", lambda run, step: (copy.deepcopy(traj), info))
    seen, real = [], getattr(vt.update, "real", vt.update)  # not an earlier call's spy

    def spy(*a, **kw):
        out = real(*a, **kw)
        seen.extend(out)
        return out

    spy.real = real
    monkeypatch.setattr(vt, "update", spy)
    rec = vt.train_step(run, 1)
    return rec, seen


def _assert_same(got: dict, ref: dict, what: str, skip=()):
    assert set(got) == set(ref), (what, set(got) ^ set(ref))
    for k, v in ref.items():
        if k in UNCOMPARED or k in skip or k.startswith("time_"):
            continue
        assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (what, k, got[k], v)


@pytest.mark.parametrize("loss_agg", ["token", "seq"])
def test_logged_statistics_do_not_depend_on_the_micro_batch_split(
    assets, rollout, tmp_path, monkeypatch, loss_agg
):
    """With loss_agg=seq the loss and the gradient norm too: the entropy term is a token mean, so its
    micro-batch share must count tokens, not sequences."""
    traj, _ = rollout
    agg = f"algo.loss_agg={loss_agg}"
    ref, ref_steps = _record(assets, tmp_path / "ref", rollout, monkeypatch, "train.micro_batch=4", agg)
    assert len(ref_steps) == 2
    # the statistics are real: clipping on both sides and the dual clip, a partial TGF mask
    for k in ("clipfrac_high", "clipfrac_low", "clipfrac_dual", "ppo_kl", "pg_loss", "kl_loss"):
        assert any(abs(s[k]) > 1e-4 for s in ref_steps), k
    assert 0 < ref["kept_frac"] < 1
    valid = traj.response_mask
    # the step's kept fraction is that of the whole batch, not a per-micro-batch mean
    assert ref["kept_frac"] == pytest.approx(float(traj.token_mask[valid].float().mean()), rel=1e-6)
    # valid_tokens: the tokens of one optimizer step's global mini-batch (2 steps of 8 rows)
    assert [s["valid_tokens"] for s in ref_steps] == [float(valid[:8].sum()), float(valid[8:].sum())]
    for extra in (
        ("train.micro_batch=1",),
        ("train.micro_batch=8",),
        ("train.max_tokens_per_micro=1",),  # every row alone
        ("train.max_tokens_per_micro=50",),  # smaller than any padded row
        ("train.max_tokens_per_micro=1000000",),  # the whole mini-batch at once
        ("train.packing=true", "train.max_tokens_per_micro=50"),
    ):
        what = " ".join(extra)
        tmp = tmp_path / what.replace("=", "").replace(" ", "_")
        rec, steps = _record(assets, tmp, rollout, monkeypatch, *extra, agg)
        packed = "train.packing=true" in extra
        skip = ("pad_frac_update", "pad_frac_score") if packed else ()
        _assert_same(rec, ref, what, skip)
        assert len(steps) == len(ref_steps)
        for s, r in zip(steps, ref_steps):
            _assert_same(s, r, what, skip)


def _worker(nproc, rollout, out, overrides):
    port = str(29900 + nproc + os.getpid() % 50)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", port,
           str(ROOT / "tests" / "dist_stats_worker.py"), str(rollout), str(out), *overrides]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=ROOT,
                       timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_two_gloo_ranks_with_a_token_budget_log_the_one_process_statistics(assets, rollout, tmp_path):
    traj, info = rollout
    blob = tmp_path / "rollout.pt"
    from vppo.tokens import TokenIds  # noqa: F401  (pickled with the batch)

    run = train_setup(assets, tmp_path / "ids", *BASE)
    traj = copy.deepcopy(traj)  # a sampling engine's log-probs, off the scored ones: the mismatch metric
    g = torch.Generator().manual_seed(3)
    traj.sampler_logp = traj.old_logp + torch.rand(traj.old_logp.shape, generator=g)
    torch.save({"batch": traj, "ids": run.ids, "info": info}, blob)
    ov = train_overrides(assets, tmp_path / "w", *BASE, "train.max_tokens_per_micro=50")
    one = _worker(1, blob, tmp_path / "one.pt", ov)
    two = _worker(2, blob, tmp_path / "two.pt", ov)
    _assert_same(two["record"], one["record"], "2 ranks vs 1")
    # the counters and the mismatch are the whole batch's (dist_stats_worker deals the counters out)
    d = (traj.sampler_logp - traj.old_logp).abs()[traj.response_mask]
    assert two["record"]["logp_mismatch_max"] == pytest.approx(float(d.max()), rel=1e-6)
    assert two["record"]["logp_mismatch_mean"] == pytest.approx(float(d.double().mean()), rel=1e-6)
    assert (two["record"]["grader_timeouts"], two["record"]["grader_errors"]) == (len(traj), len(traj) // 4)
    assert two["record"]["dropped_groups"] == len(traj) // 4  # rollout.n=4: groups of 4 rows
    assert len(two["steps"]) == len(one["steps"]) == 2
    for s, r in zip(two["steps"], one["steps"]):
        _assert_same(s, r, "2 ranks vs 1")


def test_the_sampling_engine_numbers_are_the_whole_steps_over_ranks():
    """push_seconds is the slowest rank's push, rollout_tokens_per_second every rank's tokens over the
    slowest rank's generation time (before, both were rank 0's own). Two ranks, simulated: rank 0
    pushed in 2 s and generated 300 tokens in 3 s, rank 1 in 5 s and 100 tokens in 1 s."""
    from vppo.sampling import engine_stats

    other = {
        "max": torch.tensor([5.0, 1.0], dtype=torch.float64),
        "sum": torch.tensor([100.0], dtype=torch.float64),
    }

    def two_ranks(t, op):
        return torch.maximum(t, other["max"]) if op == "max" else t + other["sum"]

    assert engine_stats(2.0, 3.0, 300, reduce=two_ranks) == {
        "push_seconds": 5.0,
        "rollout_tokens_per_second": 400 / 3,
    }
    assert engine_stats(2.0, 3.0, 300) == {
        "push_seconds": 2.0,
        "rollout_tokens_per_second": 100.0,
    }  # one process
