"""`eclipse-prior demo`: its fixed prompts, and a real reduced run writing grid.png and report.md."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eclipse_prior.shapes import DEFAULT_HOLDOUT, composition, parse_caption
from eclipse_prior.shapes.benchmark import MAIN_ROWS, shipped
from eclipse_prior.shapes.demo import COLUMNS, PROMPTS, category_of
from eclipse_prior.shapes.metrics import composition_held_out, scene_for


def test_demo_prompts_parse_and_render_as_their_composition():
    rng = np.random.default_rng(0)
    held = []
    for prompt in PROMPTS:
        comp = parse_caption(prompt)
        for _ in range(3):
            assert composition(scene_for(comp, category_of(comp), rng)) == comp
        held.append(composition_held_out(comp, DEFAULT_HOLDOUT))
    # seen and held-out compositions both appear, and every category is shown
    assert 2 <= sum(held) < len(PROMPTS)
    assert {category_of(parse_caption(p)) for p in PROMPTS} >= {"colour", "spatial", "size", "complex"}


@pytest.mark.skipif(not (shipped("clip") / "config.json").is_file(), reason="shapes CLIP not shipped")
def test_quick_demo_writes_report_and_grid(tmp_path):
    from PIL import Image

    from eclipse_prior.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    report = (out / "report.md").read_text()
    for name in COLUMNS:
        assert f"**{name}**" in report
    for row in MAIN_ROWS:
        assert row in report
    assert "(held-out)" in report
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["seeds"] == 1
    # the demo store came from the embed path with the held-out compositions withheld
    captions = [json.loads(line) for line in (out / "data" / "images-n200" / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 200 and not any(c["held_out"] for c in captions)
    if (shipped("decoder") / "unet").is_dir():
        grid = Image.open(out / "grid.png")
        width, height = grid.size
        assert height == 16 + 3 * 98  # header + three prompts of 96 px + padding
        assert width == 330 + len(COLUMNS) * 98
        pixels = np.asarray(grid.convert("RGB"))[16:, 330:]
        assert pixels.std() > 5  # decoded images, not blank cells
        # pictures during ECLIPSE's training: its held-out prompts decoded at steps 6, 12, 18 and 20
        rounds = sorted(p.relative_to(out / "runs").as_posix() for p in (out / "runs").glob("*/val_images/step-*.png"))
        eclipse_run = "eclipse-lam0.2-tiny-n200-s0-st20-pooled"  # the demo's priors read the pooled embedding
        assert [r.split("/")[0] for r in rounds] == [eclipse_run] * 4
        assert [r.split("/")[-1] for r in rounds] == [f"step-{s:07d}.png" for s in (6, 12, 18, 20)]
        assert (out / "val_prompts.txt").read_text().splitlines() == list(PROMPTS[1:4])  # all three held out
        logged = list((out / "runs" / eclipse_run / "logs").rglob("events.out.tfevents.*"))
        assert logged
        assert len(list((out / "runs").glob("*/curves.png"))) == 3
    else:
        assert "not written" in report
