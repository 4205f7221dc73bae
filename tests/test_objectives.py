"""The objectives beyond the paper: loss values against direct formulas, the logged gradient-norm ratio, the
closed-form ridge map, and a tiny `eclipse-prior train --objective NAME` run of each."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from tests.test_training import make_store

from eclipse_prior.cli import main
from eclipse_prior.errors import ConfigError
from eclipse_prior.losses import OBJECTIVES, contrastive_loss, hard_negative_loss, image_contrastive_loss
from eclipse_prior.models import EclipsePrior, LinearPrior, ResidualPrior, load_prior
from eclipse_prior.training.linear import fit_ridge
from eclipse_prior.training.trainer import objective_loss

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


def _nce(logits: list[float], positive: int, allowed: list[int]) -> float:
    return -logits[positive] + math.log(sum(math.exp(logits[j]) for j in allowed))


def _direct_image_contrastive(pred, image, tau, ids=None):
    """Loop reference: rows (each prediction over the images) and columns (each image over the predictions)."""
    n = pred.shape[0]
    ok = [[j == i or ids is None or ids[j] != ids[i] for j in range(n)] for i in range(n)]
    rows = [_nce([_cos(pred[i], image[j]) / tau for j in range(n)], i, [j for j in range(n) if ok[i][j]])
            for i in range(n)]
    cols = [_nce([_cos(pred[i], image[j]) / tau for i in range(n)], j, [i for i in range(n) if ok[j][i]])
            for j in range(n)]
    return (sum(rows) / n + sum(cols) / n) / 2


def test_image_contrastive_matches_direct_formula_and_masks_duplicates():
    g = torch.Generator().manual_seed(3)
    pred, image = torch.randn(6, 8, generator=g) * 2, torch.randn(6, 8, generator=g) * 5
    ids = [0, 1, 0, 2, 3, 1]
    for tau in (0.05, 0.5, 1.0):
        assert image_contrastive_loss(pred, image, tau).item() == pytest.approx(
            _direct_image_contrastive(pred, image, tau), rel=1e-5)
        assert image_contrastive_loss(pred, image, tau, caption_ids=ids).item() == pytest.approx(
            _direct_image_contrastive(pred, image, tau, ids), rel=1e-5)
    # hand case: predictions equal to their images, two orthogonal rows: each softmax is e^(1/t) / (e^(1/t) + 1)
    eye = torch.eye(2)
    assert image_contrastive_loss(eye, eye * 3, tau=0.5).item() == pytest.approx(math.log(1 + math.exp(-2)), rel=1e-6)
    with pytest.raises(ConfigError):
        image_contrastive_loss(pred, image[:5])


def test_hard_negatives_keep_only_the_nearest_other_captions():
    # texts: rows 0 and 1 are near each other, 2 and 3 are near each other, the pairs far apart
    text = torch.tensor([[1.0, 0.1, 0.0], [1.0, -0.1, 0.0], [0.0, 1.0, 0.1], [0.0, 1.0, -0.1]])
    g = torch.Generator().manual_seed(4)
    pred, image = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    tau = 0.3
    nearest = {0: 1, 1: 0, 2: 3, 3: 2}
    expected = np.mean([_nce([_cos(pred[i], image[j]) / tau for j in range(4)], i, [i, nearest[i]])
                        for i in range(4)])
    assert hard_negative_loss(pred, image, text, k=1, tau=tau).item() == pytest.approx(expected, rel=1e-5)
    # k >= batch - 1 is every other row: the one-way image InfoNCE over the whole batch
    full = np.mean([_nce([_cos(pred[i], image[j]) / tau for j in range(4)], i, list(range(4))) for i in range(4)])
    assert hard_negative_loss(pred, image, text, k=10, tau=tau).item() == pytest.approx(full, rel=1e-5)
    # the same caption is never a negative: with ids making 0 and 1 one caption, row 0's nearest other is 2 or 3
    ids = [5, 5, 6, 7]
    sims = [_cos(text[0], text[j]) for j in (2, 3)]
    other = (2, 3)[int(np.argmax(sims))]
    row0 = _nce([_cos(pred[0], image[j]) / tau for j in range(4)], 0, [0, other])
    got = hard_negative_loss(pred[[0, 1, 2, 3]], image, text, k=1, tau=tau, caption_ids=ids)
    rows = [row0] + [
        _nce([_cos(pred[i], image[j]) / tau for j in range(4)], i,
             [i, max((j for j in range(4) if j != i and ids[j] != ids[i]), key=lambda j: _cos(text[i], text[j]))])
        for i in (1, 2, 3)
    ]
    assert got.item() == pytest.approx(np.mean(rows), rel=1e-5)
    with pytest.raises(ConfigError):
        hard_negative_loss(pred, image, text, k=0)


@pytest.mark.parametrize("objective", [o for o, kind in OBJECTIVES.items() if kind is not None])
def test_objective_loss_value_and_output_gradient_ratio(objective):
    g = torch.Generator().manual_seed(5)
    n, width = 8, 16
    batch = {"image_embeds": torch.randn(n, width, generator=g) * 4, "text_embeds": torch.randn(n, width, generator=g),
             "caption_ids": torch.tensor([0, 1, 2, 3, 0, 4, 5, 6])}
    pred = torch.randn(n, width, generator=g, requires_grad=True)
    lam, tau = 0.7, 0.1
    loss, terms = objective_loss(objective, pred, batch, lam, tau, hard_negatives=3, grad_ratio=True)
    projection = ((pred - batch["image_embeds"]) ** 2).sum(1).mean()
    second = {
        "text": lambda p: contrastive_loss(p, batch["text_embeds"], tau, batch["caption_ids"]),
        "image": lambda p: image_contrastive_loss(p, batch["image_embeds"], tau, batch["caption_ids"]),
        "hard": lambda p: hard_negative_loss(p, batch["image_embeds"], batch["text_embeds"], 3, tau,
                                             batch["caption_ids"]),
    }[OBJECTIVES[objective]]
    assert loss.item() == pytest.approx((projection + lam * second(pred)).item(), rel=1e-6)
    # the projection gradient in closed form: 2 (pred - target) / n; the contrastive one by autograd
    d_proj = 2 * (pred.detach() - batch["image_embeds"]) / n
    (d_con,) = torch.autograd.grad(second(pred), pred)
    assert terms["grad_ratio"].item() == pytest.approx((d_con.norm() / d_proj.norm()).item(), rel=1e-5)
    loss.backward()  # the ratio's extra backward passes kept the graph for the real one
    assert torch.allclose(pred.grad, d_proj + lam * d_con, atol=1e-6)


def test_fit_ridge_matches_the_closed_form(tmp_path):
    from eclipse_prior.data.store import EmbeddingStore

    store = EmbeddingStore(make_store(tmp_path / "s", n=120, states=False))
    rows = store.split_indices("train")
    batch = store.get_batch(rows)
    x, y = batch["text_embeds"].astype(np.float64), batch["image_embeds"].astype(np.float64)
    alpha = 0.3
    xc, yc = x - x.mean(0), y - y.mean(0)
    penalty = alpha * np.trace(xc.T @ xc) / x.shape[1]
    expected = np.linalg.solve(xc.T @ xc + penalty * np.eye(x.shape[1]), xc.T @ yc)
    weight, bias = fit_ridge(store, rows, alpha)
    assert np.allclose(weight.numpy(), expected, atol=1e-4)
    assert np.allclose(bias.numpy(), y.mean(0) - x.mean(0) @ expected, atol=1e-4)
    # alpha 0 is least squares: the residual is orthogonal to the (centred) inputs
    w0, b0 = fit_ridge(store, rows, 0.0)
    resid = y - (x @ w0.double().numpy() + b0.double().numpy())
    assert np.abs(xc.T @ resid).max() < 1e-2 and np.abs(resid.mean(0)).max() < 1e-4


def test_residual_prior_starts_as_its_linear_map_and_round_trips(tmp_path):
    torch.manual_seed(0)
    kwargs = dict(num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=16, num_embeddings=4)
    prior = ResidualPrior(**kwargs)
    weight, bias = torch.randn(16, 16), torch.randn(16)
    prior.start_from_linear_map(weight, bias)
    text, states = torch.randn(3, 16), torch.randn(3, 4, 16)
    out = prior.generate_embeds(text, states, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, text @ weight + bias, atol=1e-5)
    linear = LinearPrior(embedding_dim=16)
    linear.set_map(weight, bias)
    assert torch.allclose(linear.generate_embeds(text), out, atol=1e-5)
    # after a change to the network the output is map + correction, and save/load keeps both
    with torch.no_grad():
        prior.proj_to_clip_embeddings.bias.fill_(0.5)
    out = prior.generate_embeds(text, states, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, text @ weight + bias + 0.5, atol=1e-5)
    for model in (prior, linear):
        model.save_pretrained(tmp_path / type(model).__name__)
        loaded = load_prior(tmp_path / type(model).__name__)
        assert type(loaded) is type(model)
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value)


@pytest.mark.parametrize("objective", ["ridge", "residual", "image-contrastive", "hard-negatives", "eclipse"])
def test_train_each_objective_through_the_cli(objective, tmp_path, capsys):
    store = make_store(tmp_path / "store", n=96)
    run = tmp_path / "run"
    argv = ["train", "--data", str(store), "--out", str(run), "--objective", objective, "--preset", "tiny",
            "--steps", "4", "--batch-size", "16", "--lr", "1e-3", "--warmup-steps", "1", "--log-every", "2",
            "--val-every", "0", "--report-to", "none", "--hard-negatives", "2"]
    assert main(argv) == 0
    capsys.readouterr()
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished"
    prior = load_prior(run)
    expected = {"ridge": LinearPrior, "residual": ResidualPrior}.get(objective, EclipsePrior)
    assert type(prior) is expected
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    if objective == "ridge":
        # the store's image embedding is a linear map of its text embedding plus noise 0.1 (width 32): the
        # closed-form fit leaves about the noise, 32 * 0.01 = 0.32 per row, on its training rows
        assert rows[-1]["projection"] < 0.5
    else:
        assert [r["step"] for r in rows] == [2, 4]
        for r in rows:
            assert r["grad_ratio"] > 0 and r["lam_grad_ratio"] == pytest.approx(0.2 * r["grad_ratio"])
    text = torch.randn(2, 32)
    states = torch.randn(2, 8, 32) if prior.uses_text_states else None
    assert prior.generate_embeds(text, states).shape == (2, 32)
    if objective in ("ridge", "residual"):  # exported under their own class, with a card that says what they are
        exported = tmp_path / "export"
        assert main(["export", str(run), "--out", str(exported)]) == 0
        config = json.loads((exported / "config.json").read_text())
        assert config["_class_name"] == expected.__name__
        card = (exported / "README.md").read_text()
        assert f"`{expected.__name__}`" in card and "not the released ECLIPSE format" in card
        again = load_prior(exported)
        assert type(again) is expected
        seeded = [m.generate_embeds(text, states, generator=torch.Generator().manual_seed(0)) for m in (again, prior)]
        assert torch.equal(*seeded)  # the export holds the run's final (EMA) weights


def test_ridge_fit_claims_its_run_folder_like_a_trained_run(tmp_path, capsys):
    """A ridge fit into a folder another command holds is a one-line refusal naming the holder, and writes nothing."""
    from eclipse_prior.outputs import claim_dir

    store = make_store(tmp_path / "store", n=32)
    run = tmp_path / "run"
    argv = ["train", "--data", str(store), "--out", str(run), "--objective", "ridge", "--report-to", "none"]
    with claim_dir(run, "someone else"):
        assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "someone else" in err and "\n" not in err
    assert not (run / "prior").exists()
    assert main(argv) == 0 and load_prior(run).config.embedding_dim == 32


def test_size_swap_and_binding_label():
    from eclipse_prior.shapes import parse_caption
    from eclipse_prior.shapes.size_probe import big_first, swap_sizes

    comp = parse_caption("a big red circle and a small blue square")
    swapped = swap_sizes(comp)
    assert swapped == parse_caption("a small red circle and a big blue square").canonical()
    assert big_first(comp) + big_first(swapped) == 1.0
    assert swap_sizes(swapped) == comp.canonical()
