"""Pictures during training: a tiny shapes-world run decodes its validation prompts into the TensorBoard event
file (read back with EventAccumulator) and RUN/val_images/, and writes the training-curves plot."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eclipse_prior.cli import main
from eclipse_prior.errors import ConfigError
from eclipse_prior.shapes.benchmark import make_training_store, shipped
from eclipse_prior.shapes.holdout import load_holdout
from eclipse_prior.training import TrainConfig, train
from eclipse_prior.training.curves import plot_training_curves

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = ["a red circle", "a blue square on the left of a green triangle", "an orange square"]


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes-store")
    return make_training_store(root, 48, shipped("clip"), load_holdout(None), seed=1, log=lambda _: None,
                               progress=False)


def _event_images(run_dir: Path) -> dict[int, list[np.ndarray]]:
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, EventAccumulator

    images: dict[int, list[np.ndarray]] = {}
    for events in sorted((run_dir / "logs").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={IMAGES: 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            assert tag.startswith("val_images")
            for event in acc.Images(tag):
                images.setdefault(event.step, []).append(np.asarray(Image.open(io.BytesIO(event.encoded_image_string))))
    return images


def test_tiny_run_logs_validation_images_and_plots_curves(shapes_store, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# validation prompts\n" + "\n".join(PROMPTS) + "\n")
    argv = ["train", "--data", str(shapes_store), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "4",
            "--batch-size", "16", "--warmup-steps", "1", "--log-every", "1", "--val-every", "0",
            "--checkpoint-every", "4", "--num-workers", "0", "--val-decoder", str(shipped("decoder")),
            "--val-prompts", str(prompts), "--val-images-every", "2", "--val-image-steps", "2"]
    assert main(argv) == 0
    run = tmp_path / "run"
    logged = _event_images(run)
    assert sorted(logged) == [2, 4]  # every 2 steps, the last one included
    for step, summaries in logged.items():
        (summary,) = summaries  # add_images tiles the batch into one row: prompts side by side
        assert summary.shape == (64, 64 * len(PROMPTS), 3)  # each at the decoder's native 64 px
        grid = np.asarray(Image.open(run / "val_images" / f"step-{step:07d}.png").convert("RGB"))
        assert np.array_equal(grid, summary)  # the PNG holds exactly what TensorBoard got
    cells = [logged[4][0][:, 64 * i : 64 * (i + 1)] for i in range(len(PROMPTS))]
    assert not np.array_equal(cells[0], cells[1])  # different prompts draw different images
    assert not np.array_equal(logged[2][0], logged[4][0])  # the prior trained between the two rounds
    assert (run / "val_images" / "prompts.txt").read_text().splitlines() == PROMPTS
    curves = run / "curves.png"
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(curves) as img:
        img.verify()


def test_same_prior_same_images(shapes_store, tmp_path):
    """The images depend on the prior alone: a second decoder object on the same weights draws the same pixels."""
    import torch

    from eclipse_prior.models import EclipsePrior
    from eclipse_prior.training.validation_images import ValidationImages

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\n")
    cfg = TrainConfig(data=str(shapes_store), out=str(tmp_path), val_decoder=str(shipped("decoder")),
                      val_prompts=str(prompts), val_image_steps=2)
    torch.manual_seed(0)
    prior = EclipsePrior.from_preset("tiny", 64, None, pooled_only=True)
    clip = json.loads((shapes_store / "manifest.json").read_text())["clip"]["id"]
    first = ValidationImages(cfg, clip, prior, tmp_path, "cpu").images(prior)
    again = ValidationImages(cfg, clip, prior, tmp_path, "cpu").images(prior)
    assert np.array_equal(first[0], again[0])


def test_bad_validation_settings_fail_before_training(shapes_store, tmp_path, capsys):
    with pytest.raises(ConfigError, match="--val-prompts"):
        train(TrainConfig(data=str(shapes_store), out=str(tmp_path / "r"), val_decoder="kandinsky22"))
    assert main(["train", "--data", str(shapes_store), "--out", str(tmp_path / "r2"), "--steps", "2",
                 "--val-decoder", str(tmp_path), "--val-prompts", str(tmp_path / "missing.txt")]) == 2
    assert "prompts file not found" in capsys.readouterr().err
    assert not (tmp_path / "r2" / "checkpoints").exists()


def test_curves_plot_of_a_run_without_rows_is_skipped(tmp_path):
    assert plot_training_curves(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text(
        "\n".join(json.dumps(r) for r in [{"step": 1, "loss": 2.0, "projection": 1.5, "contrastive": 2.5, "lr": 1e-4},
                                         {"step": 2, "loss": 1.0, "projection": 0.5, "contrastive": 2.5, "lr": 5e-5},
                                         {"step": 2, "split": "val", "cos_pred_image": 0.4, "num_samples": 9}]))
    path = plot_training_curves(tmp_path)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > img.size[1]
