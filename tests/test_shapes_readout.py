"""Read-out probes: an embedding that encodes each object's attributes is read back; noise is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eclipse_prior.shapes.judge import HEADS, scene_labels
from eclipse_prior.shapes.readout import readout_accuracy
from eclipse_prior.shapes.world import CATEGORIES, sample_scene


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(0)
    return [sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(1200)]


def _one_hot_embeds(scenes) -> torch.Tensor:
    """Every head's label as a one-hot block (an absent second object: zeros), plus a little noise."""
    blocks = []
    for head, n in HEADS.items():
        labels = torch.tensor([scene_labels(s)[head] for s in scenes])
        block = torch.zeros(len(scenes), n)
        present = labels >= 0
        block[present, labels[present]] = 1.0
        blocks.append(block)
    return torch.cat(blocks, dim=1) + 0.01 * torch.randn(len(scenes), sum(HEADS.values()))


def test_linear_probe_reads_an_embedding_that_carries_every_attribute(scenes):
    torch.manual_seed(0)
    acc = readout_accuracy(_one_hot_embeds(scenes), scenes, n_test=200, steps=600)
    for attr, row in acc.items():
        assert row["all"] >= 0.97 and row["two_object"] >= 0.95, (attr, row)


def test_probe_on_noise_is_near_chance_for_two_object_shape(scenes):
    torch.manual_seed(0)
    acc = readout_accuracy(torch.randn(len(scenes), 32), scenes, n_test=200, hidden=64, steps=600)
    # chance: a two-object shape multiset is guessed about 2/36 of the time, one object's colour 1/8
    assert acc["shape"]["two_object"] < 0.2, acc["shape"]
    assert acc["colour"]["one_object"] < 0.4, acc["colour"]


def test_readout_rejects_an_empty_split(scenes):
    with pytest.raises(ValueError, match="n_test"):
        readout_accuracy(torch.randn(len(scenes), 8), scenes, n_test=len(scenes))


def test_readout_cli_probes_the_shipped_clip(tmp_path, capsys):
    import json

    from eclipse_prior.cli import main
    from eclipse_prior.shapes.benchmark import shipped

    if not (shipped("clip") / "config.json").exists():
        pytest.skip("shipped CLIP not built")
    out = tmp_path / "new" / "readout.json"  # its folder does not exist yet
    assert main(["shapes", "readout", "--train", "300", "--test", "200", "--hidden", "0", "--steps", "300",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == report
    (probe,) = report["probes"]
    assert probe["hidden"] == 0 and probe["n_train"] == 300
    acc = probe["accuracy"]
    assert set(acc) == {"colour", "shape", "texture", "size"}
    # the shipped CLIP carries colour, size and shape linearly (300 examples: 0.96 / 0.995 / 0.81 measured; chance
    # 1/8, 1/2 and 1/6 for one object, less for two)
    assert acc["colour"]["all"] > 0.8 and acc["size"]["all"] > 0.9 and acc["shape"]["all"] > 0.6, acc
