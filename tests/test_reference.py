"""Sanity checks of the naive definitions against independent formulas."""

import math

import torch

from kernels import reference as ref


def test_dependency_matches_torch_kl_and_entropy():
    z, w = torch.randn(6, 37, dtype=torch.float64), torch.randn(6, 37, dtype=torch.float64)
    y = torch.randint(0, 37, (6,))
    s = ref.token_dependency(z.float(), w.float(), y, temperature=0.7)
    p, q = torch.softmax(z / 0.7, -1), torch.softmax(w / 0.7, -1)
    kl = (p * (p.log() - q.log())).sum(-1)
    ent = -(p * p.log()).sum(-1)
    torch.testing.assert_close(s.kl, kl.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.entropy, ent.float(), rtol=1e-5, atol=1e-6)
    d = (q.log() - p.log()).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(s.k3, (d.exp() - d - 1).clamp(0, 10).float(), rtol=1e-5, atol=1e-6)


def test_ignored_rows_and_padded_vocab_are_zero_and_finite():
    z = torch.randn(3, 8)
    z[:, 6:] = float("-inf")
    w = torch.randn(3, 8)
    w[:, 6:] = float("-inf")
    s = ref.token_dependency(z, w, torch.tensor([0, -100, 5]))
    for x in s:
        assert torch.isfinite(x).all()
        assert x[1] == 0


def test_topk_counts_and_ties():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 0.0, 9.0], [0.0] * 6])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1] * 6])
    out = ref.topk_token_mask(scores, mask, 0.4)
    assert out[0].tolist() == [False, True, True, False, False, False]  # ceil(0.4*5)=2, pos 5 invalid
    assert out[1].tolist() == [True, True, True, False, False, False]  # ties: lower positions first
    assert int(out[1].sum()) == math.ceil(0.4 * 6)
