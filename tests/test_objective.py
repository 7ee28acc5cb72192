"""The VPPO math (vppo/objective.py) against small cases worked out by hand.

The worked example (used by several tests): one micro-batch of four responses, T = 3.

  row  reward group  A      valid  dep (k3)         Sbar  n    alpha (released)  A'
  0    1      g0     +1.5   3      0.2  0.0  0.4    0.2   0    0.9               +1.35
  1    0      g0     -0.5   1      0.5  .    .      0.5   1    1.2               -0.60
  2    0      g0     -0.5   0      .    .    .      (excluded: length 0)  1       -0.50
  3    0      g0     -0.5   2      0.1  0.3  .      0.2   0    0.9               -0.45

GRPO on g0 = [1, 0, 0, 0]: mean 1/4, unbiased var ((3/4)^2 + 3 (1/4)^2) / 3 = 1/4, std 1/2.
TAS (released, one micro-batch): lo = 0.2, hi = 0.5 over rows 0, 1, 3; mean(n) = 1/3,
alpha = 0.9 + 0.1 * n / (1/3).
TGF (k = 0.4): ceil(0.4 * 3) = 2 -> row 0 keeps positions 0 and 2; ceil(0.4) = 1 -> row 1 keeps 0;
ceil(0.8) = 1 -> row 3 keeps position 1.
Ratios r = exp(logp - old_logp) and per-token losses (clip 0.8 / 1.28, dual clip 3):
  row 0: r = 1.5 -> max(-1.35*1.5, -1.35*1.28) = -1.728 (clipped high); r = 1.1 (not kept);
         r = 0.5 -> max(-0.675, -1.08) = -0.675 (A > 0: no low clip)
  row 1: r = 4.0 -> max(2.4, 0.768) = 2.4 > l3 = 1.8 -> 1.8 (dual clip)
  row 3: r = 0.9 (not kept); r = 0.7 -> max(0.315, 0.36) = 0.36 (clipped low), < l3 = 1.35
token averaging: (-1.728 - 0.675 + 1.8 + 0.36) / 6 valid tokens = -0.243 / 6 = -0.0405
seq averaging: mean(-2.403 / 3, 1.8 / 1, 0.36 / 2) = 1.179 / 3 = 0.393
logp = [-1, -2, -0.5], [-0.2], [], [-3, -1.5]: mean NLL = 8.2 / 6; x 0.06 = 0.082
entropy = [0.5, 1, 1.5], [2], [], [0.3, 0.9]: mean = 6.2 / 6; x 0.06 = 0.062
"""

import math
import threading
from types import SimpleNamespace

import pytest
import torch

from vppo.objective import (
    LossConfig,
    dependency_scores,
    group_advantages,
    kl_penalty,
    loss_scale,
    policy_loss,
    reference_loss,
    shape_advantages,
    trajectory_alphas,
    trajectory_scores,
)

NAN = float("nan")
VALID = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
DEP = torch.tensor([[0.2, 0.0, 0.4], [0.5, NAN, NAN], [NAN, NAN, NAN], [0.1, 0.3, NAN]])
LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, NAN, NAN], [NAN, NAN, NAN], [-3.0, -1.5, NAN]])
RATIO = torch.tensor([[1.5, 1.1, 0.5], [4.0, 1.0, 1.0], [1.0, 1.0, 1.0], [0.9, 0.7, 1.0]])
ENTROPY = torch.tensor([[0.5, 1.0, 1.5], [2.0, NAN, NAN], [NAN, NAN, NAN], [0.3, 0.9, NAN]])
TOKEN_MASK = torch.tensor([[1, 0, 1], [1, 0, 0], [0, 0, 0], [0, 1, 0]], dtype=torch.bool)
A_SHAPED = torch.tensor([1.35, -0.6, -0.5, -0.45])


def _old_logp():
    return LOGP - RATIO.log()  # NaN where LOGP is NaN (invalid positions are never read)


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    adv = group_advantages(rewards, 4)
    s3 = 1 / math.sqrt(1 / 3)  # group [0, 1, 1, 0]: mean 1/2, var 4 * 1/4 / 3 = 1/3
    expect = [1.5, -0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0, -0.5 * s3, 0.5 * s3, 0.5 * s3, -0.5 * s3]
    torch.testing.assert_close(adv, torch.tensor(expect), rtol=1e-5, atol=1e-6)
    assert adv.dtype == torch.float32
    assert (adv[4:8] == 0).all()  # all-equal rewards: exactly 0


def test_group_advantages_ids_single_member_and_equal_non_binary_rewards():
    # ids need not be consecutive; group 7 has one response (no std): 0; group 3 is 0.1 x 3
    rewards = torch.tensor([0.1, 1.0, 0.1, 5.0, 0.0, 0.1])
    ids = torch.tensor([3, 9, 3, 7, 9, 3])
    adv = group_advantages(rewards, ids)
    r2 = 1 / math.sqrt(0.5)  # group 9 = [1, 0]: mean 1/2, unbiased var 1/2
    torch.testing.assert_close(
        adv, torch.tensor([0.0, 0.5 * r2, 0.0, 0.0, -0.5 * r2, 0.0]), rtol=1e-5, atol=0
    )
    assert adv[[0, 2, 3, 5]].eq(0).all()


@pytest.mark.parametrize(
    "groups, match", [(3, "groups"), (0, "groups"), (torch.tensor([0, 1]), "groups"), (1.5, "groups")]
)
def test_group_advantages_bad_groups(groups, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(torch.zeros(4), groups)


# ----------------------------------------------------------------------------- dependency and TAS


def test_dependency_scores_picks_the_field():
    stats = SimpleNamespace(kl=torch.tensor([1.0]), k3=torch.tensor([2.0]))
    assert dependency_scores(stats, "kl").item() == 1.0
    assert dependency_scores(stats, "k3").item() == 2.0
    with pytest.raises(ValueError, match="kind"):
        dependency_scores(stats, "entropy")
    with pytest.raises(ValueError, match="kl"):
        dependency_scores(SimpleNamespace(k3=1), "kl")


def test_trajectory_scores_by_hand():
    s = trajectory_scores(DEP, VALID)
    torch.testing.assert_close(s, torch.tensor([0.2, 0.5, 0.0, 0.2]))  # length 0 -> 0, NaNs unread


def test_alphas_released_one_micro_batch():
    valid_rows = VALID.any(-1)
    alpha = trajectory_alphas(trajectory_scores(DEP, VALID), "released", b_min=0.9, valid=valid_rows)
    torch.testing.assert_close(alpha, torch.tensor([0.9, 1.2, 1.0, 0.9]))
    shaped = shape_advantages(
        torch.tensor([1.5, -0.5, -0.5, -0.5]), trajectory_scores(DEP, VALID), valid=valid_rows
    )
    torch.testing.assert_close(shaped, A_SHAPED)
    # per-token advantages are scaled row by row
    shaped2 = shape_advantages(torch.full((4, 3), -2.0), trajectory_scores(DEP, VALID), valid=valid_rows)
    torch.testing.assert_close(shaped2, -2.0 * torch.tensor([0.9, 1.2, 1.0, 0.9])[:, None].expand(4, 3))


def test_alphas_released_per_micro_batch_and_mean_zero():
    # micro-batches {0, 1}: mean n = 1/2 -> 0.9 + 0.1 * [0, 2]; {2, 3}: only row 3 valid, n = 0,
    # mean(n) = 0 -> b_min (the released code's 0 * (1 - b_min) / (0 + 1e-8))
    scores, valid_rows = trajectory_scores(DEP, VALID), VALID.any(-1)
    alpha = trajectory_alphas(scores, "released", valid=valid_rows, micro_batch_size=2)
    torch.testing.assert_close(alpha, torch.tensor([0.9, 1.1, 1.0, 0.9]))


def test_alphas_released_divide_by_mean_plus_the_released_epsilon():
    # 16 rows, micro-batches of 8: the second holds the mini-batch's min (0) and max (1); every row
    # of the first sits within a hair of the min (n = 0 but one n = 8e-8, so mean(n) = 1e-8). The
    # released factor 0.9 + 0.1 * n / (mean(n) + 1e-8) is 1.3 for that row; without the epsilon it
    # would be 1.7. Expected values are the released formula evaluated in float64.
    scores = torch.zeros(16)
    scores[7], scores[15] = 8e-8, 1.0
    scores[8:15] = torch.linspace(0.0, 0.9, 7)
    alpha = trajectory_alphas(scores, "released", b_min=0.9, micro_batch_size=8)
    n = scores.double()  # lo = 0, hi = 1
    want = torch.cat([0.9 + 0.1 * n[c] / (n[c].mean() + 1e-8) for c in (slice(0, 8), slice(8, 16))])
    torch.testing.assert_close(alpha, want.float(), rtol=1e-6, atol=1e-6)
    assert float(alpha[7]) == pytest.approx(1.3, abs=1e-6)
    # the same epsilon in the global form (one rank: the whole batch is one group)
    glob = trajectory_alphas(scores, "global", b_min=0.9)
    torch.testing.assert_close(glob, (0.9 + 0.1 * n / (n.mean() + 1e-8)).float(), rtol=1e-6, atol=1e-6)


def test_alphas_static_and_global_single_rank():
    scores, valid_rows = trajectory_scores(DEP, VALID), VALID.any(-1)
    static = trajectory_alphas(scores, "static", b_min=0.9, b_max=1.1, valid=valid_rows)
    torch.testing.assert_close(static, torch.tensor([0.9, 1.1, 1.0, 0.9]))  # 0.9 + 0.2 n
    glob = trajectory_alphas(scores, "global", valid=valid_rows)
    torch.testing.assert_close(glob, torch.tensor([0.9, 1.2, 1.0, 0.9]))


@pytest.mark.parametrize("mode, kw", [("released", {}), ("global", {}), ("static", {"b_max": 1.5})])
@pytest.mark.parametrize("scores", [[0.3, 0.3, 0.3], [0.3, 0.3 + 5e-7, 0.3], [0.7]])
def test_alphas_flat_scores_give_one(mode, kw, scores):
    alpha = trajectory_alphas(torch.tensor(scores), mode, **kw)  # max - min <= 1e-6
    assert alpha.eq(1.0).all()


def test_alphas_global_two_ranks_by_hand():
    # rank 0 holds the worked example, rank 1 holds scores [0.0, 1.0]: lo = 0, hi = 1,
    # n = [0.2, 0.5, -, 0.2] and [0, 1], global mean(n) = 1.9 / 5 = 0.38
    parts = [(trajectory_scores(DEP, VALID), VALID.any(-1)), (torch.tensor([0.0, 1.0]), None)]
    out = _run_ranks(
        lambda r, red: trajectory_alphas(parts[r][0], "global", valid=parts[r][1], reduce=red), 2
    )
    torch.testing.assert_close(
        out[0], torch.tensor([0.9 + 0.02 / 0.38, 0.9 + 0.05 / 0.38, 1.0, 0.9 + 0.02 / 0.38])
    )
    torch.testing.assert_close(out[1], torch.tensor([0.9, 0.9 + 0.1 / 0.38]))


def test_alphas_global_does_not_depend_on_rank_split():
    scores = torch.rand(12)
    whole = trajectory_alphas(scores, "global")
    for world in (2, 3, 4):
        parts = scores.chunk(world)
        out = _run_ranks(lambda r, red, parts=parts: trajectory_alphas(parts[r], "global", reduce=red), world)
        torch.testing.assert_close(torch.cat(out), whole)
    assert abs(float(whole.mean()) - 1.0) < 1e-5  # mean one over the global batch


def _run_ranks(fn, world):
    """Run fn(rank, reduce) on `world` threads with a barrier-based all-reduce between them."""
    barrier, slots, out = threading.Barrier(world), [None] * world, [None] * world
    ops = {"min": torch.minimum, "max": torch.maximum, "sum": torch.add}

    def reduce(rank):
        def red(t, op):
            slots[rank] = t.clone()
            barrier.wait()
            acc = slots[0]
            for x in slots[1:]:
                acc = ops[op](acc, x)
            barrier.wait()
            return acc

        return red

    def run(rank):
        out[rank] = fn(rank, reduce(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(o is not None for o in out)
    return out


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"mode": "paper"}, "mode"),
        ({"b_min": 1.5}, "b_min"),
        ({"mode": "static"}, "b_max"),
        ({"mode": "static", "b_max": 0.5}, "b_max"),
        ({"b_max": 1.2}, "b_max"),
        ({"micro_batch_size": 0}, "micro_batch_size"),
        ({"mode": "global", "micro_batch_size": 2}, "micro_batch_size"),
        ({"reduce": lambda t, op: t}, "reduce"),
        ({"valid": torch.ones(3, dtype=torch.bool)}, "valid"),
    ],
)
def test_alphas_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        trajectory_alphas(torch.rand(4), **kw)


# ----------------------------------------------------------------------------- the objective


def _loss(cfg, **kw):
    logp = LOGP.clone().requires_grad_(True)
    args = dict(entropy=ENTROPY) | kw
    loss, stats = policy_loss(logp, _old_logp(), A_SHAPED, TOKEN_MASK, VALID, cfg, **args)
    loss.backward()
    return loss, stats, logp.grad


def test_policy_loss_token_nll_by_hand():
    loss, stats, grad = _loss(LossConfig())
    assert loss.item() == pytest.approx(-0.0405 + 0.082, abs=1e-6)
    assert stats["pg_loss"] == pytest.approx(-0.0405, abs=1e-6)
    assert stats["entropy_loss"] == pytest.approx(8.2 / 6, abs=1e-6)
    assert stats["clipfrac_high"] == pytest.approx(1 / 6)  # row 0, r = 1.5
    assert stats["clipfrac_low"] == pytest.approx(1 / 6)  # row 3, r = 0.7
    assert stats["clipfrac_dual"] == pytest.approx(1 / 6)  # row 1, r = 4
    assert stats["kept_frac"] == pytest.approx(4 / 6)
    assert stats["valid_tokens"] == 6
    assert all(isinstance(v, float) for v in stats.values())
    # d/dlogp: -0.06 / 6 on every valid token (NLL penalty); only the unclipped kept token
    # (row 0, r = 0.5) adds -A' r / 6 = -0.675 / 6; clipped, dual-clipped, masked tokens add 0
    expect = torch.tensor([[-0.01, -0.01, -0.01 - 0.1125], [-0.01, 0, 0], [0, 0, 0], [-0.01, -0.01, 0]])
    torch.testing.assert_close(grad, expect, rtol=1e-5, atol=1e-7)


def test_policy_loss_seq_and_exact_entropy_by_hand():
    loss, stats, _ = _loss(LossConfig(loss_agg="seq"))
    assert loss.item() == pytest.approx(0.393 + 0.082, abs=1e-6)
    loss, stats, grad = _loss(LossConfig(entropy_mode="exact"))
    assert loss.item() == pytest.approx(-0.0405 + 0.062, abs=1e-6)
    assert stats["entropy_loss"] == pytest.approx(6.2 / 6, abs=1e-6)
    # the exact entropy is an input here: logp only gets the pg gradient
    assert grad[0, 2].item() == pytest.approx(-0.1125, abs=1e-6) and grad[0, 0].item() == 0
    loss, _, _ = _loss(LossConfig(loss_agg="seq", entropy_mode="exact", entropy_coef=0.0))
    assert loss.item() == pytest.approx(0.393, abs=1e-6)


def test_policy_loss_without_dual_clip_and_without_mask():
    # dual clip off: row 1 keeps 2.4 -> (-1.728 - 0.675 + 2.4 + 0.36) / 6
    loss, stats, _ = _loss(LossConfig(dual_clip=None, entropy_coef=0.0))
    assert loss.item() == pytest.approx(0.357 / 6, abs=1e-6)
    assert stats["clipfrac_dual"] == 0
    # token_mask None keeps every valid token: row 0 r = 1.1 -> -1.35 * 1.1 = -1.485, row 3
    # r = 0.9 -> max(0.405, 0.36) = 0.405
    logp = LOGP.clone().requires_grad_(True)
    loss, stats = policy_loss(logp, _old_logp(), A_SHAPED, None, VALID, LossConfig(entropy_coef=0.0))
    assert loss.item() == pytest.approx((-0.243 - 1.485 + 0.405) / 6, abs=1e-6)
    assert stats["kept_frac"] == 1.0
    # inside the clip range l1 == l2 (a tie of the max): the full -A' r / 6 flows back
    loss.backward()
    assert logp.grad[0, 1].item() == pytest.approx(-1.35 * 1.1 / 6, abs=1e-6)
    assert logp.grad[3, 0].item() == pytest.approx(0.45 * 0.9 / 6, abs=1e-6)


def test_policy_loss_kl_term_and_loss_scale():
    ref = LOGP - 0.5  # logp - ref = 0.5 on every valid token: k3 = e^-0.5 + 0.5 - 1
    k3 = math.exp(-0.5) - 0.5
    loss, stats, _ = _loss(LossConfig(kl_coef=0.01), ref_logp=ref, loss_scale=loss_scale(6, 24, 2))
    assert stats["kl_loss"] == pytest.approx(k3, abs=1e-6)
    assert loss.item() == pytest.approx(0.5 * (-0.0405 + 0.082 + 0.01 * k3), abs=1e-6)
    _, stats, _ = _loss(LossConfig(kl_coef=0.01, kl_estimator="k1"), ref_logp=ref)
    assert stats["kl_loss"] == pytest.approx(0.5, abs=1e-6)
    _, stats, _ = _loss(LossConfig(kl_coef=0.01, kl_estimator="k2", loss_agg="seq"), ref_logp=ref)
    assert stats["kl_loss"] == pytest.approx(0.125, abs=1e-6)


def test_loss_scale_values():
    assert loss_scale(6, 24, 2) == 0.5
    assert loss_scale(10, 10, 1) == 1.0
    assert loss_scale(0, 0, 8) == 0.0
    for args, match in [
        ((1, 2, 0), "world_size"),
        ((-1, 2, 1), "micro_tokens"),
        ((3, 2, 1), "global_tokens"),
    ]:
        with pytest.raises(ValueError, match=match):
            loss_scale(*args)


def test_policy_loss_length_zero_batch_and_nan_padding():
    # a micro-batch with no valid token: loss 0, finite zero gradients, stats 0
    logp = torch.full((2, 3), NAN, requires_grad=True)
    loss, stats = policy_loss(
        logp, logp.detach(), torch.tensor([NAN, 1.0]), None, torch.zeros(2, 3, dtype=torch.int64)
    )
    loss.backward()
    assert loss.item() == 0 and stats["kept_frac"] == 0 and stats["valid_tokens"] == 0
    assert logp.grad.eq(0).all()


def test_kl_estimators_closed_form():
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])  # policy
    q = torch.full((4,), 0.25)  # reference
    kl = 0.25 * math.log(2)  # 0.5 ln 2 + 0 + 2 * 0.125 ln(1/2)
    k1 = kl_penalty(p.log(), q.log(), "k1")
    k3 = kl_penalty(p.log(), q.log(), "k3")
    assert float((p * k1).sum()) == pytest.approx(kl, abs=1e-6)  # unbiased under y ~ p
    assert float((p * k3).sum()) == pytest.approx(kl, abs=1e-6)
    torch.testing.assert_close(kl_penalty(p.log(), q.log(), "low_var_kl"), k3)
    # k3 per token: q/p - log(q/p) - 1
    torch.testing.assert_close(
        k3, torch.tensor([0.5 - math.log(0.5) - 1, 0.0, 1 - math.log(2), 1 - math.log(2)])
    )
    torch.testing.assert_close(
        kl_penalty(p.log(), q.log(), "k2"),
        0.5 * torch.tensor([math.log(2), 0, -math.log(2), -math.log(2)]) ** 2,
    )
    for est in ("k1", "k2", "k3"):
        assert kl_penalty(p.log(), p.log(), est).eq(0).all()
    # k3 clamp: ref far above policy -> exp(20) - 21 clamped to 10
    assert kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "k3").item() == 10.0


# ----------------------------------------------------------------------------- reference loss


def test_reference_loss_on_uniform_logits():
    # all-equal logits over V = 4 at temperature 0.5: logp = -ln 4, entropy = ln 4 everywhere
    v, b, t = 4, 4, 3
    logits = torch.full((b, t, v), 3.0, requires_grad=True)
    labels = torch.where(VALID, torch.tensor([[0, 1, 2]]).expand(b, t), -100)
    lp = torch.full((b, t), -math.log(4))
    old = lp - RATIO.log()
    cfg = LossConfig(entropy_mode="exact")
    loss, stats = reference_loss(logits, labels, old, A_SHAPED, TOKEN_MASK, VALID, cfg, temperature=0.5)
    assert stats["pg_loss"] == pytest.approx(-0.0405, abs=1e-6)
    assert stats["entropy_loss"] == pytest.approx(math.log(4), abs=1e-6)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[2].eq(0).all()
    # same through policy_loss with the hand values
    loss2, _ = policy_loss(lp, old, A_SHAPED, TOKEN_MASK, VALID, cfg, entropy=torch.full((b, t), math.log(4)))
    assert loss.item() == pytest.approx(loss2.item(), abs=1e-6)
    with pytest.raises(ValueError, match="labels"):
        reference_loss(logits, labels.masked_fill(VALID, 4), old, A_SHAPED, TOKEN_MASK, VALID, cfg)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "field, value",
    [
        ("clip_low", 1.0),
        ("clip_low", -0.1),
        ("clip_high", -0.1),
        ("clip_high", math.inf),
        ("dual_clip", 1.0),
        ("dual_clip", 0.5),
        ("entropy_coef", -0.01),
        ("entropy_coef", NAN),
        ("entropy_mode", "sampled"),
        ("loss_agg", "sequence"),
        ("kl_coef", -1.0),
        ("kl_estimator", "k4"),
        ("kl_clamp", 0.0),
        ("logratio_clamp", -1.0),
        ("clip_low", "0.2"),
    ],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"old_logp": torch.zeros(4, 2)}, "old_logp"),
        ({"advantages": torch.zeros(3)}, "advantages"),
        ({"token_mask": torch.zeros(4, 3)}, "token_mask"),
        ({"response_mask": torch.ones(4, 2, dtype=torch.bool)}, "response_mask"),
        ({"logp": torch.zeros(4, 3, dtype=torch.int64)}, "logp"),
        ({"cfg": {"clip_low": 0.2}}, "cfg"),
        ({"cfg": LossConfig(entropy_mode="exact")}, "entropy"),
        ({"cfg": LossConfig(kl_coef=0.1)}, "ref_logp"),
        ({"loss_scale": -1.0}, "loss_scale"),
    ],
)
def test_policy_loss_bad_input(kw, match):
    args = (
        dict(
            logp=torch.zeros(4, 3),
            old_logp=torch.zeros(4, 3),
            advantages=torch.zeros(4),
            token_mask=None,
            response_mask=VALID,
            cfg=LossConfig(),
        )
        | kw
    )
    ls = args.pop("loss_scale", 1.0)
    with pytest.raises(ValueError, match=match):
        policy_loss(**args, loss_scale=ls)


def test_truncated_importance_sampling_weights_the_policy_term_by_min_ratio_cap():
    # one row of 4 valid tokens, all kept, A = 1, pi = pi_old (ratio 1): the surrogate of token t
    # is -A * w_t with w_t = min(pi_old / pi_sampler, cap); pg = sum_t -w_t / 4 (token mean)
    logp = torch.tensor([[-1.0, -2.0, -0.5, -3.0]], requires_grad=True)
    old = logp.detach().clone()
    gap = torch.tensor([[math.log(2.0), math.log(0.5), 0.0, math.log(10.0)]])  # log pi_old - log pi_sampler
    sampler = old - gap
    valid = torch.ones(1, 4, dtype=torch.bool)
    adv = torch.tensor([1.0])
    cfg = LossConfig(entropy_coef=0.0, tis_cap=3.0)
    loss, stats = policy_loss(logp, old, adv, None, valid, cfg, sampler_logp=sampler)
    w = torch.tensor([2.0, 0.5, 1.0, 3.0])  # the last is truncated at the cap
    assert float(loss) == pytest.approx(float(-w.sum() / 4), rel=1e-6)
    assert stats["tis_weight_mean"] == pytest.approx(float(w.mean()), rel=1e-6)
    # the weight is a constant: d loss / d logp_t = -A * ratio * w_t / 4 at ratio 1
    loss.backward()
    torch.testing.assert_close(logp.grad, (-w / 4)[None], rtol=1e-6, atol=1e-7)
    # no mismatch: the weights are 1 and the loss is the uncorrected one
    plain, _ = policy_loss(logp.detach(), old, adv, None, valid, LossConfig(entropy_coef=0.0))
    same, st = policy_loss(logp.detach(), old, adv, None, valid, cfg, sampler_logp=old)
    assert float(same) == float(plain) and st["tis_weight_mean"] == 1.0
    with pytest.raises(ValueError, match="sampler_logp is required"):
        policy_loss(logp.detach(), old, adv, None, valid, cfg)
    with pytest.raises(ValueError, match="tis_cap"):
        LossConfig(tis_cap=0.0)
    with pytest.raises(ValueError, match="tis_cap must be >= 1"):  # before, accepted here (not in config)
        LossConfig(tis_cap=0.5)
    assert LossConfig(tis_cap=1.0).tis_cap == 1.0


def test_tis_cap_needs_the_vllm_engine_at_temperature_one():
    from vppo.config import load_config

    with pytest.raises(ValueError, match="algo.tis_cap"):
        load_config(None, ["algo.tis_cap=2.0"])
    with pytest.raises(ValueError, match="algo.tis_cap"):
        load_config(None, ["algo.tis_cap=2.0", "rollout.engine=vllm", "rollout.temperature=0.7"])
    assert load_config(None, ["algo.tis_cap=2.0", "rollout.engine=vllm"]).algo.tis_cap == 2.0
