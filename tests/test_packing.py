"""Padding-free passes (vppo.packing): on the micro model of every family (Qwen2.5-VL, Qwen3-VL)
packed rows give the padded rows' rope positions, scores and gradients; token-budget micro-batches
give the row split's gradient;
Karmarkar-Karp balancing moves rows between ranks without changing the global mini-batch."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from helpers import FAMILIES, ROOT, make_micro_model, make_synth, subprocess_env, train_overrides, train_setup

RESP_LENS = [10, 3, 7, 1, 10, 5]  # mixed response lengths (rows 0-5), a vision token in row 2


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("packing")
    return make_micro_model(d / "model", layers=2), make_synth(d / "synth", n_train=16, n_val=4, n_test=4)


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request, assets, tmp_path_factory):
    """A micro model of each family. Qwen3-VL: DeepStack from both vision layers, added after LLM
    layers 0 and 1, so three LLM layers (added after the last one, a DeepStack feature would never
    reach a response position and its merger would get no gradient)."""
    if request.param == "qwen2_5_vl":
        return assets[0]
    d = tmp_path_factory.mktemp(request.param)
    return make_micro_model(d / "model", layers=3, vision_depth=2, family=request.param)


@pytest.fixture(scope="module")
def batch(family_model, assets):
    """(model with a FusedLMHead, token ids, a trajectory): 3 prompts of different lengths x 2
    responses of lengths RESP_LENS, a vision token inside response 2, perturbed images."""
    from transformers import AutoModelForImageTextToText

    import vppo.rollout as vr
    from vppo.data import encode_prompts, load_problems, load_processor
    from vppo.model import FusedLMHead
    from vppo.perturb import PerturbSpec, perturb_pixel_values
    from vppo.tokens import token_ids

    path, synth = family_model, assets[1]
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    FusedLMHead.replace(model)
    proc = load_processor(path)
    problems = load_problems(synth / "train.parquet", processor=proc)
    ids = token_ids(model, proc)
    torch.manual_seed(0)
    enc = encode_prompts(problems[:3], proc)
    assert len(set(enc["attention_mask"].sum(-1).tolist())) == 3  # the prompts differ in length
    ro = vr.generate(
        model, enc, 2, vr.GenSettings(1.0, 1.0, 0, 10), eos_ids=ids.eos, pad_id=ids.pad,
        suppress_ids=ids.vision, vision_start_id=ids.vision_start,
    )  # fmt: skip
    r = ro.response_mask.shape[1]
    mask = torch.arange(r)[None, :] < torch.tensor(RESP_LENS)[:, None]
    p = ro.prompt_len
    ro.input_ids[:, p:] = ro.input_ids[:, p:].masked_fill(~mask, ids.pad)
    ro.input_ids[2, p + 4] = proc.image_token_id  # a vision token sampled inside a response
    ro.attention_mask[:, p:] = mask.long()
    ro.response_mask = mask
    spec = PerturbSpec(kind="patch_blacken", patch_prob=0.5)
    ro.masked_pixel_values = [
        perturb_pixel_values(x, g, spec, [i], proc.image_processor)
        for i, (x, g) in enumerate(zip(ro.pixel_values, ro.image_grid_thw))
    ]
    return model, ids, ro


def test_packed_rows_carry_the_rope_positions_of_the_padded_forward(batch):
    from vppo import packing
    from vppo.rollout import model_inputs, response_hidden

    model, ids, ro = batch
    inputs = model_inputs(ro, vision_ids=ids.vision, pad_id=ids.pad)
    seen = []
    lm = model.model.language_model
    real = lm.forward

    def spy(*a, **kw):
        seen.append(kw["position_ids"])
        return real(*a, **kw)

    lm.forward = spy
    try:
        response_hidden(model, inputs, ro.prompt_len)  # the padded forward computes its own positions
    finally:
        lm.forward = real
    (padded,) = seen  # (3, B, P + R)
    attn = ro.attention_mask.bool()
    p = packing.pack(model, inputs, ro.response_mask, ro.prompt_len)
    assert p.position_ids.shape == (4, 1, int(attn.sum()))
    assert torch.equal(p.position_ids[1:, 0], padded[:, attn])
    assert torch.equal(p.position_ids[0, 0], torch.cat([torch.arange(n) for n in attn.sum(-1).tolist()]))
    assert torch.equal(p.input_ids[0], inputs["input_ids"][attn])
    slots = sum(int(g.prod(-1).sum()) // 4 for g in ro.image_grid_thw)  # merge 2 x 2; none in a response
    assert int((p.input_ids == model.config.image_token_id).sum()) == slots
    # the image rows really use 3-D positions (height / width differ from the text channel)
    assert not torch.equal(p.position_ids[2], p.position_ids[3])


def test_packed_scoring_equals_padded_logp_kl_k3_entropy_and_reference(batch):
    from vppo import loss

    model, ids, ro = batch
    opts = loss.LossOptions(impl="torch")
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for q in ref.parameters():
            q.add_(0.01 * torch.randn_like(q))
    out = {}
    for packed in (False, True):
        t = loss.score(
            model, ro.select(range(len(ro))), opts, ids=ids, micro=4, dependency=True, ref=ref, packed=packed
        )
        out[packed] = t
    for k in ("old_logp", "entropy", "kl", "k3", "ref_logp"):
        a, b = getattr(out[False], k), getattr(out[True], k)
        assert a.abs().sum() > 0, k
        torch.testing.assert_close(b, a, msg=k)  # fp32 default tolerance
    assert out[True].kl[ro.response_mask].gt(0).all()


def test_packed_update_gradients_equal_padded(batch):
    from functools import partial

    from vppo import loss, packing
    from vppo.model import Policy
    from vppo.rollout import model_inputs

    model, ids, ro = batch
    opts = loss.LossOptions(impl="torch")
    t = loss.score(model, ro.select(range(len(ro))), opts, ids=ids, micro=8, dependency=False)
    adv = torch.tensor([1.0, -0.5, 0.3, -1.2, 0.7, 0.2])
    grads = {}
    for packed in (False, True):
        policy = Policy(copy.deepcopy(model)).train()
        fn = partial(
            loss.vppo_loss_linear, labels=t.responses, old_logp=t.old_logp + 0.05 * t.response_mask,
            advantages=adv, token_mask=None, response_mask=t.response_mask, opts=opts,
        )  # fmt: skip
        inputs = model_inputs(t, vision_ids=ids.vision, pad_id=ids.pad)
        if packed:
            inputs = packing.pack(policy.hf, inputs, t.response_mask, t.prompt_len)
        out, _ = policy(inputs, t.prompt_len, fn)
        out.backward()
        grads[packed] = {k: q.grad.clone() for k, q in policy.named_parameters() if q.grad is not None}
    assert set(grads[True]) == set(grads[False]) and any(".visual." in f".{k}" for k in grads[True])
    for k, g in grads[False].items():
        assert g.abs().sum() > 0 or k.endswith("bias"), k
        torch.testing.assert_close(grads[True][k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_micro_batches_by_tokens_cover_rows_in_order_within_the_budget():
    from vppo.packing import micro_batches
    from vppo.trajectory import Trajectory

    lengths = [5, 9, 2, 7, 7, 1, 3, 8]
    attn = (torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]).long()
    t = Trajectory(attn, attn, attn, 4, attn[:, 4:].bool(), [], [], torch.arange(8))
    assert micro_batches(t, 3) == [[0, 1, 2], [3, 4, 5], [6, 7]]
    parts = micro_batches(t, 3, 12, packed=True)
    assert sum(parts, []) == list(range(8))
    assert all(sum(lengths[i] for i in p) <= 12 for p in parts)
    assert parts == [[0], [1, 2], [3], [4, 5, 6], [7]]
    # another rank needs 7: the costliest chunks are split, rows stay in order
    seven = micro_batches(t, 3, 12, packed=True, reduce=lambda x, op: torch.tensor([7]))
    assert len(seven) == 7 and sum(seven, []) == list(range(8))
    with pytest.raises(ValueError, match="cannot make"):
        micro_batches(t, 3, 12, packed=True, reduce=lambda x, op: torch.tensor([9]))
    # padded passes compute P + R = 10 positions per row
    assert micro_batches(t, 3, 25, packed=False) == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_karmarkar_karp_equal_counts_balanced_sums():
    from vppo.packing import karmarkar_karp

    g = torch.Generator().manual_seed(0)
    sizes = torch.randint(50, 3000, (64,), generator=g).tolist()
    parts = karmarkar_karp(sizes, 4)
    assert sorted(sum(parts, [])) == list(range(64)) and all(len(p) == 16 for p in parts)
    sums = [sum(sizes[i] for i in p) for p in parts]
    naive = [sum(sizes[i * 16 : (i + 1) * 16]) for i in range(4)]  # contiguous split
    assert max(sums) - min(sums) < max(naive) - min(naive)
    assert max(sums) - min(sums) <= max(sizes)
    with pytest.raises(ValueError):
        karmarkar_karp([1, 2, 3], 2)


def test_karmarkar_karp_breaks_ties_as_the_released_trainer():
    """Hand-worked with the released conventions (vppo.packing.karmarkar_karp's docstring); the
    former descending-order version gave [[0, 1], [2, 3]] and [[0, 3, 4], [1, 2, 5]] here."""
    from vppo.packing import karmarkar_karp

    # ascending (size, index): 1@1 2@3 | 4@2 5@0 -> partials {3:2 | 1:1} and {0:5 | 2:4}, spread 1
    # each; the tie pops the one whose heaviest group is heavier ({0:5}) first: {0,1}=6, {2,3}=6;
    # equal sums and counts: ordered by members, (2, 4) > (0, 5), so rank 0 gets {2, 3}
    assert karmarkar_karp([5, 1, 4, 2], 2) == [[2, 3], [0, 1]]
    # 2@5 3@0 | 6@2 7@4 | 8@3 9@1: three partials of spread 1; {1:9 | 3:8} first, then {4:7 | 2:6}
    # -> {1,2}=15, {3,4}=15, ordered {3,4} first (members (3, 8) > (1, 9)), spread 0; then the
    # spread-1 partial {0:3 | 5:2} pops first and keeps its place: {0}+{1,2}=18, {5}+{3,4}=17
    assert karmarkar_karp([3, 9, 6, 8, 7, 2], 2) == [[0, 1, 2], [3, 4, 5]]
    # one batch: the i-th smallest in group i, the heaviest group first
    assert karmarkar_karp([4, 4, 1], 3) == [[1], [0], [2]]


def _optimizer_grads(assets, tmp, traj, *extra):
    """The gradients each optimizer step of vppo.train.update sees, for one config."""
    from vppo.train import update

    run = train_setup(assets, tmp, "train.micro_batch=4", *extra)
    opt, seen = run.engine.vppo_guard, []
    real = opt.step

    def spy(*a, **kw):
        seen.append([q.grad.detach().clone() for g in opt.param_groups for q in g["params"]])
        return real(*a, **kw)

    opt.step = spy
    steps = update(run.engine, traj, run.cfg, run.opts, run.ids, run.world)
    return seen, steps


def test_token_budget_and_packed_updates_give_the_row_split_gradient(assets, tmp_path):
    from vppo.train import prepare

    run = train_setup(assets, tmp_path / "gen")
    traj, _ = prepare(run, 1)
    ref, ref_steps = _optimizer_grads(assets, tmp_path / "a", traj)
    assert len(ref) == 2  # 16 rows, 8 per optimizer step, micro-batches of 4 (gas 2)
    lens = traj.attention_mask.sum(-1)
    budget = int(lens[:8].sum()) // 3 + 1  # 3-4 packed micro-batches per step where DeepSpeed counts 2
    for extra in (
        ("train.packing=true",),
        (f"train.max_tokens_per_micro={budget}", "train.packing=true"),
        (f"train.max_tokens_per_micro={traj.input_ids.shape[1] * 3}",),  # 3 padded rows, then 3, then 2
    ):
        got, steps = _optimizer_grads(assets, tmp_path / "_".join(extra).replace("=", ""), traj, *extra)
        assert len(got) == 2, extra
        for a, b in zip(ref, got):
            for x, y in zip(a, b):
                torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-7, msg=str(extra))
        for s, r in zip(steps, ref_steps):
            assert s["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-7)
            assert s["pad_frac_update"] == (0.0 if "train.packing=true" in extra else r["pad_frac_update"])
    assert 0 < ref_steps[0]["pad_frac_update"] < 1


def _worker(tmp, nproc, rollout, out, overrides):
    port = str(29650 + nproc + os.getpid() % 300)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_port", port,
           str(ROOT / "tests" / "dist_balance_worker.py"), str(rollout), str(out), *overrides]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=ROOT,
                       timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return torch.load(out, weights_only=False)


@pytest.mark.slow
def test_two_gloo_ranks_with_balancing_match_one_process_and_shape_per_rank(assets, tmp_path):
    from vppo.config import load_config
    from vppo.train import prepare, shape

    run = train_setup(assets, tmp_path / "gen", "algo.shaping=global")
    traj, _ = prepare(run, 1)
    rollout = tmp_path / "rollout.pt"
    torch.save({"batch": traj, "ids": run.ids}, rollout)
    ov = train_overrides(assets, tmp_path / "w", "algo.shaping=global", "train.balance_batch=true")
    one = _worker(tmp_path, 1, rollout, tmp_path / "one.pt", ov)
    two = _worker(tmp_path, 2, rollout, tmp_path / "two.pt", ov)
    assert len(one["losses"]) == 2
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6)
    for k, v in one["state"].items():
        torch.testing.assert_close(two["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)
    # the released shaping with balancing: per rank, on the rows the partition gave it
    ov = train_overrides(assets, tmp_path / "r", "algo.shaping=released", "train.balance_batch=true")
    rel = _worker(tmp_path, 2, rollout, tmp_path / "rel.pt", ov)
    cfg = load_config(None, ov)
    for step in range(2):
        (mb0, a0), (mb1, a1) = rel["shaped"][0][step], rel["shaped"][1][step]
        assert len(mb0) == len(mb1) == 4
        # the two ranks together hold the rows of the global mini-batch (rows 8s .. 8s+7 of traj)
        glob = sorted(float(x) for x in traj.advantages[8 * step : 8 * step + 8])
        assert sorted(float(x) for x in torch.cat([mb0.advantages, mb1.advantages])) == glob
        # balanced: valid lengths differ by at most the longest row
        l0, l1 = int(mb0.attention_mask.sum()), int(mb1.attention_mask.sum())
        assert abs(l0 - l1) <= int(traj.attention_mask.sum(-1).max())
        for mb, alpha in ((mb0, a0), (mb1, a1)):
            torch.testing.assert_close(alpha, shape(cfg, mb)[1])  # per-rank statistics


def _tokens(t, i):  # the valid tokens of row i: a row's identity whatever its padding
    return t.input_ids[i][t.attention_mask[i].bool()].tolist()


@pytest.mark.slow
def test_two_gloo_ranks_balance_the_whole_rollout_batch_as_released(assets, tmp_path):
    """train.balance_batch=rollout: the Karmarkar-Karp partition of the whole rollout batch (rows in
    rollout order), rank r the r-th part in ascending position, then mini-batches in order."""
    from vppo.packing import karmarkar_karp
    from vppo.train import prepare

    run = train_setup(assets, tmp_path / "gen")
    traj, _ = prepare(run, 1)  # one process: the rows in rollout order
    rollout = tmp_path / "rollout.pt"
    torch.save({"batch": traj, "ids": run.ids}, rollout)
    ov = train_overrides(assets, tmp_path / "w", "train.balance_batch=rollout")
    got = _worker(tmp_path, 2, rollout, tmp_path / "two.pt", ov)
    parts = karmarkar_karp(traj.attention_mask.sum(-1).tolist(), 2)
    assert sorted(len(p) for p in parts) == [8, 8]
    groups = lambda rows: {r // 4 for r in rows}  # noqa: E731  (rollout.n = 4)
    assert any(groups(parts[0]) & groups(p) for p in parts[1:])  # this batch really splits a group
    for rank in range(2):
        for step in range(2):
            mb, _ = got["shaped"][rank][step]
            want = parts[rank][4 * step : 4 * step + 4]
            assert [_tokens(mb, i) for i in range(len(mb))] == [_tokens(traj, i) for i in want], (rank, step)
            torch.testing.assert_close(mb.advantages, traj.advantages[want])


def test_balance_batch_rollout_balances_once_before_the_mini_batches(assets, tmp_path, monkeypatch):
    from vppo import packing
    from vppo.config import load_config
    from vppo.train import prepare, update

    assert load_config(None, ["train.balance_batch=true"]).train.balance_batch == "minibatch"
    assert load_config(None, ["train.balance_batch=false"]).train.balance_batch == "none"
    with pytest.raises(ValueError, match="train.balance_batch"):
        load_config(None, ["train.balance_batch=all"])
    run = train_setup(assets, tmp_path / "gen")
    traj, _ = prepare(run, 1)
    seen = []
    monkeypatch.setattr(packing, "balance", lambda t, world, pad, group: seen.append((len(t), group)) or t)
    for mode, want in (("none", []), ("minibatch", [(8, 4), (8, 4)]), ("rollout", [(16, 4)])):
        seen.clear()
        run = train_setup(assets, tmp_path / mode, f"train.balance_batch={mode}")
        update(run.engine, traj, run.cfg, run.opts, run.ids, run.world)
        assert seen == want, mode


def test_gpu_check_runs_without_a_gpu_and_says_what_it_skipped(tmp_path, monkeypatch, capsys):
    import json

    from bench import case_packing, gpu_check

    small = lambda kinds=("tiny", "7b"), device="cpu", model=None: {  # noqa: E731
        k: {**case_packing.counts(*case_packing.lengths(k)), "time_ratio": 1.0} for k in kinds
    }
    monkeypatch.setattr(case_packing, "measure", small)  # counts only: no timing in a test
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    for k in ("kernel_tests", "kernel_bench", "packing_gpu", "qwen3_vl_gpu"):
        assert res[k] == {"status": "SKIPPED", "reason": "no CUDA device"}, k
    assert res["packing_cpu"]["status"] == "ok" and 0.4 < res["packing_cpu"]["7b"]["pad_frac"] < 0.7
    printed = capsys.readouterr().out
    assert "kernel_tests: SKIPPED (no CUDA device)" in printed and "packing_gpu: SKIPPED" in printed
    assert "qwen3_vl_gpu: SKIPPED (no CUDA device)" in printed
    assert "| packing_cpu | ok | tiny: pad" in (tmp_path / "README_table.md").read_text()


def test_gpu_checks_qwen3_vl_step_on_a_micro_shape_in_fp32():
    """The Qwen3-VL step of make gpu-check (8B-shaped on the GPU) on a micro shape on the CPU: packed
    and padded agree on the response hidden states and every scoring-pass field (images repeat over
    rows, so the DeepStack features go through the shared-image path)."""
    from bench.gpu_check import Q3_MICRO, qwen3_vl_check

    r = qwen3_vl_check(Q3_MICRO, "cpu", torch.float32, grid=4)
    assert r["status"] == "ok", r
    for k in ("hidden", "old_logp", "entropy", "kl", "k3"):
        assert r[f"{k}_max_abs_diff"] < 1e-4, (k, r)
