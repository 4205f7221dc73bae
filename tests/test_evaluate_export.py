"""Evaluation metrics against direct formulas, the evaluate CLI, and export_run / the export CLI."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from eclipse_prior.cli import main
from eclipse_prior.data.store import EmbeddingStore
from eclipse_prior.errors import ConfigError, StoreError
from eclipse_prior.evaluation import evaluate_prior
from eclipse_prior.evaluation.embedding_metrics import embedding_metrics
from eclipse_prior.export import export_run
from eclipse_prior.models import EclipsePrior, load_prior
from eclipse_prior.training import train
from eclipse_prior.training.checkpoint import list_checkpoints
from test_training import make_store, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "store", n=120, num_captions=90)


@pytest.fixture(scope="module")
def run_dir(store, tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("runs") / "run"
    return train(tiny_cfg(store, out, steps=6, val_every=3, checkpoint_every=3))


class OraclePrior(torch.nn.Module):
    """A stand-in prior that answers each text embedding with its row's true image embedding (or a fixed map)."""

    def __init__(self, store: EmbeddingStore, answer=None) -> None:
        super().__init__()
        rows = store.get_batch(np.arange(len(store)))
        self.text = torch.from_numpy(rows["text_embeds"])
        self.image = torch.from_numpy(rows["image_embeds"])
        self.answer = answer
        self.config = SimpleNamespace(embedding_dim=store.image_dim, num_embeddings=0)
        self.uses_text_states = False
        self.device = torch.device("cpu")

    def generate_embeds(self, text_embeds, text_states=None, text_mask=None, generator=None, **_):
        if self.answer is not None:
            return self.answer(text_embeds)
        # first row with this exact text (duplicate captions share text and are equally right)
        match = (text_embeds[:, None, :] == self.text[None]).all(-1).float().argmax(dim=1)
        return self.image[match]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def test_metrics_match_direct_formulas():
    rng = np.random.default_rng(1)
    n, e = 23, 16
    pred, image, text = (rng.normal(size=(n, e)) for _ in range(3))
    ids = rng.integers(0, 15, size=n)
    ids[4] = ids[5]  # a rolled pair with identical captions must be skipped
    got = embedding_metrics(*(torch.from_numpy(x) for x in (pred, image, text)), ids, chunk=7)
    j = (np.arange(n) + 1) % n
    keep = ids != ids[j]
    sims = _cos(pred[:, None, :], image[None, :, :])
    order = np.argsort(-sims, axis=1)
    hit = ids[order] == ids[:, None]
    want = {
        "cos_pred_image": _cos(pred, image).mean(),
        "cos_pred_text": _cos(pred, text).mean(),
        "cos_text_image": _cos(text, image).mean(),
        "cos_pred_unrelated": _cos(pred[j], image)[keep].mean(),
        "retrieval_r1": hit[:, 0].mean(),
        "retrieval_r5": hit[:, :5].any(1).mean(),
        "mse": ((pred - image) ** 2).sum(1).mean(),
        "num_samples": n,
    }
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), k


def test_oracle_prior_scores_perfectly_and_a_text_copy_scores_the_baseline(store, tmp_path):
    unique = EmbeddingStore(make_store(tmp_path / "unique", n=50, num_captions=50, states=False))
    perfect = evaluate_prior(OraclePrior(unique), unique, split="all", batch_size=17)
    assert perfect["cos_pred_image"] == pytest.approx(1.0)
    assert perfect["retrieval_r1"] == 1.0 and perfect["retrieval_r5"] == 1.0
    assert perfect["mse"] == pytest.approx(0.0, abs=1e-10)
    assert perfect["num_samples"] == 50
    assert perfect["cos_pred_text"] == pytest.approx(perfect["cos_text_image"])
    # duplicate captions: answering with another image of the same caption still counts as retrieved
    s = EmbeddingStore(store)
    dup = evaluate_prior(OraclePrior(s), s, split="all")
    assert dup["retrieval_r1"] == 1.0 and dup["cos_pred_image"] < 1.0
    copy = evaluate_prior(OraclePrior(s, answer=lambda t: t), s, split="val")
    assert copy["cos_pred_image"] == pytest.approx(copy["cos_text_image"])
    assert copy["cos_pred_text"] == pytest.approx(1.0)
    assert copy["num_samples"] == len(s.split_indices("val"))
    capped = evaluate_prior(OraclePrior(s), str(store), split="train", max_samples=10)
    assert capped["num_samples"] == 10


def test_evaluate_rejects_mismatched_store(store, tmp_path):
    wide = make_store(tmp_path / "wide", n=20, states=False, width=48)
    prior = EclipsePrior.from_preset("tiny", 32, 8)
    with pytest.raises(StoreError, match="48.*32"):
        evaluate_prior(prior, wide)
    with pytest.raises(StoreError, match="text states"):
        evaluate_prior(EclipsePrior.from_preset("tiny", 48, 8), wide)


def test_evaluate_cli_on_run_and_export_writes_json(run_dir, store, tmp_path, capsys):
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(run_dir), "--data", str(store), "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "R@1 of the true image" in out and "cos(predicted, true image)" in out
    data = json.loads(report.read_text())
    assert data["split"] == "val" and data["prior_class"] == "EclipsePrior"
    assert all(np.isfinite(v) for v in data["metrics"].values())
    direct = evaluate_prior(load_prior(run_dir), store)
    assert data["metrics"] == pytest.approx(direct)
    # the last validation of training scored the same EMA weights on the same split
    val = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"split"' in x][-1]
    assert val["cos_pred_image"] == pytest.approx(direct["cos_pred_image"])


def test_export_ema_and_raw_weights_with_model_card(run_dir, store, tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    files = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))  # dotfiles: lock, export record
    assert files == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    exported = load_file(out / "diffusion_pytorch_model.safetensors")
    ema = load_file(run_dir / "prior" / "diffusion_pytorch_model.safetensors")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)
    assert not any(k.startswith(("time_proj", "time_embedding")) for k in exported)  # released layout
    card = (out / "README.md").read_text()
    run = json.loads((run_dir / "run.json").read_text())
    assert run["command"] in card and "| objective | eclipse |" in card and "| lam / tau | 0.2 / 0.01 |" in card
    assert "At step 6" in card and "R@1 of the true image" in card and "synthetic" in card
    # evaluating the export gives what evaluating the run gives
    assert main(["evaluate", str(out), "--data", str(store)]) == 0
    # --no-ema: the raw weights of the last checkpoint; replacing an earlier export is allowed
    export_run(run_dir, out, use_ema=False)
    raw = load_file(list_checkpoints(run_dir / "checkpoints")[-1] / "model.safetensors")
    again = load_prior(out).state_dict()
    assert all(torch.equal(again[k], raw[k]) for k in raw)
    assert "raw (no EMA)" in (out / "README.md").read_text()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    assert not [p for p in out.iterdir() if "tmp" in p.name]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="config.json that eclipse-prior export did not write"):
        export_run(run_dir, tmp_path / "other")
    with pytest.raises(ConfigError, match="not a training run"):
        export_run(tmp_path / "other", tmp_path / "x")


def _strict(text: str):
    def refuse(token):
        raise AssertionError(f"bare {token} in JSON")

    return json.loads(text, parse_constant=refuse)


def _one_line_error(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_evaluate_validates_the_store(run_dir, tmp_path, capsys):
    """NaN and a checksum mismatch are one-line errors (they were scored as nan / silently)."""
    bad = make_store(tmp_path / "nan", n=40)
    shard = bad / "shard-00000" / "image_embeds.npy"
    arr = np.load(shard)
    arr[3, 1] = np.nan
    np.save(shard, arr)
    base = ["evaluate", str(run_dir), "--data", str(bad), "--split", "all"]
    _one_line_error(capsys, base, "NaN", "shard-00000")
    # skipping verification still refuses NaN in the rows it reads
    _one_line_error(capsys, [*base, "--no-verify-store"], "NaN")
    arr[3, 1] = 0.5
    np.save(shard, arr)  # finite again, but no longer the bytes the manifest's checksum describes
    _one_line_error(capsys, base, "checksum", "shard-00000")
    assert main([*base, "--no-verify-store"]) == 0
    capsys.readouterr()


def test_evaluate_numeric_arguments_are_one_line_errors(run_dir, store, capsys):
    base = ["evaluate", str(run_dir), "--data", str(store)]
    _one_line_error(capsys, [*base, "--batch-size", "0"], "--batch-size", ">= 1")
    _one_line_error(capsys, [*base, "--max-samples", "0"], "--max-samples")
    _one_line_error(capsys, [*base, "--steps", "-1"], "--steps")
    with pytest.raises(ConfigError, match="batch_size"):
        evaluate_prior(load_prior(run_dir), store, batch_size=0)


def test_tiny_split_reports_null_with_reason_and_strict_json(run_dir, store, tmp_path, capsys):
    report = tmp_path / "eval.json"
    argv = ["evaluate", str(run_dir), "--data", str(store), "--max-samples", "3", "--json", str(report)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "R@5 needs at least 5 rows" in captured.out and "only 3 rows" in captured.err
    data = _strict(report.read_text())
    assert data["metrics"]["retrieval_r5"] is None and data["metrics"]["num_samples"] == 3
    assert "retrieval_r5" in data["undefined"]
    _one_line_error(capsys, [*argv[:-2], "--max-samples", "1"], "at least 2")
    # all rows share one caption: no unrelated pair -> null, never NaN
    ids = np.zeros(6, dtype=np.int64)
    got = embedding_metrics(torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4), ids)
    assert got["cos_pred_unrelated"] is None
    with pytest.raises(StoreError, match="at least 2"):
        embedding_metrics(torch.randn(1, 4), torch.randn(1, 4), torch.randn(1, 4), ids[:1])


def test_evaluate_notes_a_normalised_store(run_dir, tmp_path, capsys):
    normalized = make_store(tmp_path / "normalized", n=30, normalized=True)
    assert main(["evaluate", str(run_dir), "--data", str(normalized), "--split", "all"]) == 0
    assert "L2-normalised" in capsys.readouterr().err


def test_export_config_is_the_released_one(run_dir, tmp_path):
    """`_class_name: PriorTransformer`, no `_name_or_path`, exactly the released fields; still loads as ours."""
    from test_models import RELEASED_KANDINSKY_CONFIG

    out = export_run(run_dir, tmp_path / "export")
    config = json.loads((out / "config.json").read_text())
    assert set(config) == set(RELEASED_KANDINSKY_CONFIG)
    assert config["_class_name"] == "PriorTransformer"
    sized = {"embedding_dim", "num_embeddings", "num_layers", "num_attention_heads", "attention_head_dim",
             "_diffusers_version"}
    assert {k: v for k, v in config.items() if k not in sized} == {
        k: v for k, v in RELEASED_KANDINSKY_CONFIG.items() if k not in sized
    }
    assert type(load_prior(out)) is EclipsePrior
    assert type(EclipsePrior.from_pretrained(out)) is EclipsePrior
    # a DiffusionPrior is not the released format: it keeps its own class name
    from eclipse_prior.models import DiffusionPrior

    DiffusionPrior.from_preset("tiny", pooled_only=True).save_pretrained(tmp_path / "drun" / "prior")
    dout = export_run(tmp_path / "drun", tmp_path / "dexport")
    dconfig = json.loads((dout / "config.json").read_text())
    assert dconfig["_class_name"] == "DiffusionPrior" and "_name_or_path" not in dconfig
    assert type(load_prior(dout)) is DiffusionPrior


def test_cli_help_does_not_import_torch():
    """`eclipse-prior [CMD] --help` stays fast: CLI modules import torch (and the library) only inside run()."""
    import subprocess
    import sys

    code = (
        "import contextlib, io, sys\n"
        "from eclipse_prior.cli import main\n"
        "for argv in ([], ['embed'], ['train'], ['evaluate'], ['export'], ['generate'], ['benchmark-images']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main([*argv, '--help'])\n"
        "        except SystemExit:\n"
        "            pass\n"
        "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'numpy') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
