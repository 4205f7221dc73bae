"""Images -> embed (tiny CLIP) -> train -> evaluate -> export -> reload, all through the CLI, checking values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from eclipse_prior.cli import main
from eclipse_prior.data.store import EmbeddingStore
from eclipse_prior.evaluation import evaluate_prior
from eclipse_prior.models import EclipsePrior, load_prior

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40)}
SHAPES = ["square", "circle", "triangle", "star", "heart", "ring"]


def write_captioned_images(root: Path) -> Path:
    """48 images whose colour follows the caption's colour word (so text predicts image), captions.jsonl."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    lines = []
    for i in range(48):
        colour = list(COLOURS)[i % 4]
        caption = f"a {colour} {SHAPES[(i // 4) % 6]}" + (" on the left" if i >= 24 else "")
        pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 25, size=(32, 32, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:03d}.png")
        lines.append(json.dumps({"file": f"{i:03d}.png", "caption": caption}))
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_images_to_exported_prior_through_the_cli(tiny_clip_dir, tmp_path, capsys):
    images = write_captioned_images(tmp_path / "images")
    store, run, export = tmp_path / "store", tmp_path / "run", tmp_path / "export"
    assert main(["embed", str(images), "--clip", str(tiny_clip_dir), "--out", str(store), "--text-states",
                 "--dtype", "fp32", "--val-fraction", "0.25", "--num-workers", "0", "--no-progress"]) == 0
    s = EmbeddingStore(store)
    assert len(s) == 48 and s.has_text_states and s.text_seq_len == 77 and s.image_dim == 32

    assert main(["train", "--data", str(store), "--out", str(run), "--preset", "tiny", "--steps", "40",
                 "--batch-size", "16", "--lr", "2e-3", "--warmup-steps", "4", "--log-every", "10",
                 "--val-every", "20", "--checkpoint-every", "20", "--ema-decay", "0.5", "--report-to", "none"]) == 0
    report_run, report_export = tmp_path / "run.json", tmp_path / "export.json"
    assert main(["evaluate", str(run), "--data", str(store), "--split", "train", "--json", str(report_run)]) == 0
    assert main(["export", str(run), "--out", str(export)]) == 0
    assert main(["evaluate", str(export), "--data", str(store), "--split", "train",
                 "--json", str(report_export)]) == 0
    out = capsys.readouterr().out
    assert out.count("cos(predicted, true image)") == 2

    # the export is the run's EMA prior, bit for bit, and loads as the same class and config
    exported = load_prior(export)
    assert isinstance(exported, EclipsePrior) and exported.config.num_embeddings == 77
    ema = load_file(run / "prior" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, ema[k]) for k, v in exported.state_dict().items())

    metrics = json.loads(report_run.read_text())["metrics"]
    assert json.loads(report_export.read_text())["metrics"] == metrics
    assert all(np.isfinite(v) for v in metrics.values()) and metrics["num_samples"] == len(s.split_indices("train"))

    # training helped: an untrained prior of the same shape scores far lower on the data it trained on
    torch.manual_seed(0)
    untrained = EclipsePrior.from_preset("tiny", 32, 77)
    before = evaluate_prior(untrained, s, split="train")
    assert metrics["cos_pred_image"] > before["cos_pred_image"] + 0.3
    assert metrics["mse"] < before["mse"]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "split" not in r]
    assert losses[-1] < losses[0]
    card = (export / "README.md").read_text()
    assert "eclipse-prior train --data" in card and str(store.resolve()) in card
