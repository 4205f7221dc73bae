"""Losses checked against direct formulas and a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch

from eclipse_prior.errors import ConfigError
from eclipse_prior.losses import (
    DEFAULT_TAU,
    contrastive_loss,
    eclipse_loss,
    eclipse_loss_terms,
    projection_loss,
)


def _direct_infonce(pred, text, tau, ids=None):
    """Loop-by-loop reference: -log exp(s_ii) / sum_{j allowed} exp(s_ij), mean over i."""
    n = pred.shape[0]
    total = 0.0
    for i in range(n):
        s = [
            float(torch.dot(pred[i], text[j]) / (pred[i].norm() * text[j].norm())) / tau
            for j in range(n)
        ]
        allowed = [j for j in range(n) if j == i or ids is None or ids[j] != ids[i]]
        denom = sum(math.exp(s[j]) for j in allowed)
        total += -math.log(math.exp(s[i]) / denom)
    return total / n


def test_projection_loss_hand_case():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    # rows: 1 + 4 = 5 and 4 + 9 = 13 -> mean 9; over elements (1 + 4 + 4 + 9) / 4 = 4.5
    assert projection_loss(pred, target).item() == pytest.approx(9.0)
    assert projection_loss(pred, target, reduction="mean").item() == pytest.approx(4.5)


def test_projection_reductions_differ_by_width():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(8, 64, generator=g), torch.randn(8, 64, generator=g)
    s = projection_loss(pred, target)
    m = projection_loss(pred, target, reduction="mean")
    assert s.item() == pytest.approx(((pred - target) ** 2).sum(1).mean().item(), rel=1e-6)
    assert s.item() == pytest.approx(64 * m.item(), rel=1e-6)
    with pytest.raises(ConfigError):
        projection_loss(pred, target, reduction="none")


def test_contrastive_hand_case():
    pred = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # cos: row 0 -> [1, 1/sqrt2], row 1 -> [0, 1/sqrt2]; tau 0.5 doubles them.
    r2 = math.sqrt(2.0)
    row0 = math.log(1 + math.exp(r2 - 2))
    row1 = math.log(1 + math.exp(-r2))
    expected = (row0 + row1) / 2
    assert expected == pytest.approx(0.33008, abs=1e-4)
    assert contrastive_loss(pred, text, tau=0.5).item() == pytest.approx(expected, rel=1e-6)
    # The same caption twice: each row's only other text is masked out, leaving -log(1) = 0.
    assert contrastive_loss(pred, text, tau=0.5, caption_ids=[7, 7]).item() == pytest.approx(0.0, abs=1e-7)


def test_contrastive_random_matches_direct_formula():
    g = torch.Generator().manual_seed(1)
    pred, text = torch.randn(6, 16, generator=g) * 3, torch.randn(6, 16, generator=g)
    for tau in (DEFAULT_TAU, 0.07, 1.0):
        assert contrastive_loss(pred, text, tau=tau).item() == pytest.approx(
            _direct_infonce(pred, text, tau), rel=1e-5
        )


def test_duplicate_captions_are_not_negatives():
    g = torch.Generator().manual_seed(2)
    pred, text = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    ids = [0, 1, 0, 2, 1, 3]
    got = contrastive_loss(pred, text, tau=0.1, caption_ids=torch.tensor(ids)).item()
    assert got == pytest.approx(_direct_infonce(pred, text, 0.1, ids), rel=1e-5)
    assert got < contrastive_loss(pred, text, tau=0.1).item()
    # Unique ids change nothing.
    assert contrastive_loss(pred, text, tau=0.1, caption_ids=list(range(6))).item() == pytest.approx(
        contrastive_loss(pred, text, tau=0.1).item(), rel=1e-6
    )
    with pytest.raises(ConfigError):
        contrastive_loss(pred, text, caption_ids=[0, 1])


def test_contrastive_is_cosine_scale_invariant():
    g = torch.Generator().manual_seed(3)
    pred, text = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    a = contrastive_loss(pred, text, tau=0.2)
    b = contrastive_loss(pred * 10, text * 0.1, tau=0.2)
    assert a.item() == pytest.approx(b.item(), rel=1e-5)


def test_eclipse_loss_combines_terms_and_backpropagates():
    g = torch.Generator().manual_seed(4)
    pred = torch.randn(4, 8, generator=g, requires_grad=True)
    img, text = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    terms = eclipse_loss_terms(pred, img, text, lam=0.3, tau=0.1, caption_ids=[0, 0, 1, 2])
    expected = projection_loss(pred, img) + 0.3 * contrastive_loss(pred, text, 0.1, [0, 0, 1, 2])
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    total = eclipse_loss(pred, img, text, lam=0.3, tau=0.1, caption_ids=[0, 0, 1, 2])
    assert total.item() == pytest.approx(terms["loss"].item(), rel=1e-6)
    total.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    # lam = 0 is the Projection baseline; the contrastive value is still reported.
    t0 = eclipse_loss_terms(pred, img, text, lam=0.0)
    assert t0["loss"].item() == pytest.approx(t0["projection"].item())
    assert t0["contrastive"].item() > 0
