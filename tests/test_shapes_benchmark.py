"""Shapes benchmark: composition metrics against direct computations, the statistics, and a real --quick run."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from eclipse_prior.errors import ConfigError
from eclipse_prior.shapes import DEFAULT_HOLDOUT, composition, parse_caption
from eclipse_prior.shapes.benchmark import (
    ALL_ROWS,
    MAIN_ROWS,
    OBJECTIVE_LABELS,
    ROW_ORACLE,
    ROW_TEXT,
    BenchmarkConfig,
    clip_tau,
    run_benchmark,
    shipped,
    t_interval,
)
from eclipse_prior.shapes.metrics import (
    CompositionBank,
    build_eval_set,
    caption_scores,
    cell_means,
    composition_held_out,
    scene_for,
)
from eclipse_prior.shapes.world import CATEGORIES

needs_clip = pytest.mark.skipif(not (shipped("clip") / "config.json").is_file(), reason="shapes CLIP not shipped")


def test_scene_for_samples_exactly_the_composition_and_twins_differ():
    eval_set = build_eval_set(DEFAULT_HOLDOUT, compositions_per_cell=3, paraphrases=2)
    rng = np.random.default_rng(0)
    assert {c.category for c in eval_set.captions} == set(CATEGORIES)
    for cap in eval_set.captions:
        assert composition(cap.scene).key() == cap.key == parse_caption(cap.text).key()
        comp, category = eval_set.gallery_compositions[cap.key]
        for _ in range(3):
            assert composition(scene_for(comp, category, rng)) == comp
        assert (cap.split == "held-out") == composition_held_out(comp, DEFAULT_HOLDOUT)
    # every evaluated composition brought a distinct twin into the gallery
    evaluated = {c.key for c in eval_set.captions}
    assert len(eval_set.gallery) > len(evaluated)
    assert len(set(eval_set.gallery)) == len(eval_set.gallery)
    # the shape category never states a colour, so it has no held-out compositions
    assert not any(c.category == "shape" and c.split == "held-out" for c in eval_set.captions)


@pytest.mark.parametrize(
    ("caption", "held"),
    [
        ("an orange square", True),
        ("a star and a square", False),
        ("a red circle on the left of a blue triangle", True),  # held-out relation "circle left of triangle"
        ("a blue triangle to the right of a red circle", True),  # the same relation phrased the other way
        ("a red triangle left of a blue circle", False),
        ("a big striped orange square above a small dotted red circle", True),
    ],
)
def test_composition_held_out(caption, held):
    assert composition_held_out(parse_caption(caption), DEFAULT_HOLDOUT) is held


def test_t_interval_against_hand_computed_values():
    stat = t_interval([1.0, 2.0, 3.0, 4.0])
    # t_{0.975, 3} = 3.182446305; sample std = sqrt(5/3)
    half = 3.182446305 * math.sqrt(5 / 3) / 2
    assert stat["mean"] == pytest.approx(2.5)
    assert stat["ci"] == pytest.approx([2.5 - half, 2.5 + half], rel=1e-6)
    assert stat["n"] == 4
    assert t_interval([0.7])["ci"] == [0.7, 0.7]


def test_caption_scores_against_direct_formulas():
    torch.manual_seed(0)
    renders = torch.randn(5, 8, 16)  # 5 compositions x 8 renders
    bank = CompositionBank.from_renders(list("abcde"), renders)
    centre = renders.mean((0, 1))
    keys = ["a", "c", "e", "b"]
    pred = torch.randn(4, 16)
    scores = caption_scores(pred, keys, bank)
    rows = [0, 2, 4, 1]
    for i, r in enumerate(rows):
        expected_cos = torch.nn.functional.cosine_similarity(pred[i].expand(8, -1), renders[r]).mean()
        assert scores["cos_true"][i] == pytest.approx(float(expected_cos), abs=1e-5)
        centred = torch.nn.functional.cosine_similarity((pred[i] - centre).expand(8, -1), renders[r] - centre).mean()
        assert scores["cos_centred"][i] == pytest.approx(float(centred), abs=1e-5)
        sims = torch.nn.functional.cosine_similarity(pred[i].expand(5, -1), bank.mean)
        assert scores["top1"][i] == float(int(sims.argmax()) == r)
    perfect = caption_scores(bank.mean[rows] * 3.0, keys, bank)
    assert perfect["top1"].tolist() == [1.0] * 4


def test_cell_means_by_category_and_split():
    eval_set = build_eval_set(DEFAULT_HOLDOUT, compositions_per_cell=2, paraphrases=1)
    n = len(eval_set.captions)
    values = np.arange(n, dtype=np.float64)
    cells = cell_means({"m": values}, eval_set.captions)["m"]
    for category in CATEGORIES:
        for split in ("seen", "held-out"):
            idx = [i for i, c in enumerate(eval_set.captions) if c.category == category and c.split == split]
            key = f"{category}/{split}"
            assert (key in cells) == bool(idx)
            if idx:
                assert cells[key] == pytest.approx(values[idx].mean())
    # "all" is over the categories with both splits (not shape), so seen and held-out cover the same ones
    seen = [c.split == "seen" and c.category != "shape" for c in eval_set.captions]
    assert cells["all/seen"] == pytest.approx(values[seen].mean())


def test_build_config_file_sets_each_parts_config(tmp_path):
    from eclipse_prior.shapes.build import part_configs
    from eclipse_prior.shapes.clip_train import ClipTrainConfig
    from eclipse_prior.shapes.decoder import DecoderConfig

    path = tmp_path / "build.yaml"
    path.write_text("decoder:\n  grow_steps: 30000\n  grow_attention_levels: [0, 1]\nclip:\n  attribute_weight: 4\n")
    configs = part_configs(path)
    assert set(configs) == {"decoder", "clip"}
    assert configs["decoder"] == DecoderConfig(grow_steps=30000, grow_attention_levels=(0, 1))
    assert configs["clip"] == ClipTrainConfig(attribute_weight=4.0)
    for text, message in (("prior:\n  lam: 0.1\n", "unknown section"), ("decoder:\n  grow_step: 1\n", "grow_step"),
                          ("decoder:\n  grow_steps: many\n", "integer"), ("decoder: 3\n", "mapping"),
                          ("decoder: [\n", "not valid YAML")):
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            part_configs(path)


def test_build_cli_reports_a_bad_config_file_in_one_line(tmp_path, capsys):
    from eclipse_prior.cli import main

    path = tmp_path / "build.yaml"
    path.write_text("decoder:\n  grow_step: 1\n")
    assert main(["shapes", "build", "--part", "decoder", "--config", str(path), "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown field(s)" in err and "grow_step" in err and "\n" not in err
    assert not (tmp_path / "w").exists()


def test_build_device_and_workers_apply_to_clip_and_decoder_over_the_config_file(tmp_path):
    from eclipse_prior.cli.shapes import _placement
    from eclipse_prior.shapes.build import part_configs
    from eclipse_prior.shapes.clip_train import ClipTrainConfig
    from eclipse_prior.shapes.decoder import DecoderConfig

    path = tmp_path / "build.yaml"
    path.write_text("decoder:\n  unet_steps: 7\n")
    placed = _placement(part_configs(path), "cpu", 3)
    assert placed["decoder"] == DecoderConfig(unet_steps=7, device="cpu", render_workers=3)
    assert placed["clip"] == ClipTrainConfig(device="cpu", render_workers=3, loader_workers=3)
    assert _placement({}, None, 1)["clip"].loader_workers == 0  # one worker: batches built inline


@pytest.mark.parametrize("flags, message", [(["--device", "nonsense"], "--device 'nonsense'"),
                                            (["--workers", "0"], "--workers must be >= 1")])
def test_build_cli_rejects_a_bad_device_or_worker_count_in_one_line(flags, message, tmp_path, capsys):
    from eclipse_prior.cli import main

    assert main(["shapes", "build", "--part", "clip", "--out", str(tmp_path / "w"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "w").exists()


def test_unknown_build_part_is_a_config_error(tmp_path):
    from eclipse_prior.shapes.build import build

    with pytest.raises(ConfigError, match="unknown part"):
        build(["clip", "unet"], tmp_path)


@pytest.mark.parametrize("field, value", [("decoder_guidance", -3.0), ("decoder_guidance", 0.5),
                                          ("decoder_steps", 0), ("decode_per_cell", 0), ("seeds", 0)])
def test_benchmark_config_rejects_unusable_settings(tmp_path, field, value):
    cfg = BenchmarkConfig(out=str(tmp_path), **{field: value})
    with pytest.raises(ConfigError, match="must be >= 1"):
        cfg.check()
    BenchmarkConfig(out=str(tmp_path)).check()  # the defaults pass


@needs_clip
def test_build_prior_writes_a_loadable_fp16_eclipse_prior(tmp_path):
    from eclipse_prior.models import EclipsePrior, load_prior
    from eclipse_prior.shapes.build import build_prior

    out = build_prior(tmp_path / "prior", shipped("clip"), tmp_path / "work", log=lambda s: None, steps=3,
                      train_size=64, preset="tiny", warmup=1)
    from safetensors.torch import load_file

    files = list(out.glob("*.safetensors"))
    assert len(files) == 1
    assert {t.dtype for t in load_file(str(files[0])).values()} == {torch.float16}
    prior = load_prior(str(out), local_files_only=True)
    assert isinstance(prior, EclipsePrior)
    run = json.loads((tmp_path / "work" / "runs" / "eclipse-lam0.2-tiny-n64-s0" / "run.json").read_text())
    assert run["status"] == "finished"


@needs_clip
def test_quick_benchmark_real_run(tmp_path, capsys):
    from eclipse_prior.cli import main

    out = tmp_path / "bench"
    assert main(["shapes", "benchmark", "--quick", "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    assert "it/s" not in capsys.readouterr().err  # --no-progress reaches the trainer's bars too
    results = json.loads((out / "results.json").read_text())
    assert results["tau"] == pytest.approx(clip_tau(shipped("clip")))
    assert set(results["main"]) == set(ALL_ROWS) and set(MAIN_ROWS) < set(ALL_ROWS)
    # the main comparison reads per-token text states by default
    assert not results["config"]["pooled_only"]
    run_cfg = (out / "runs" / "eclipse-lam0.2-tiny-n300-s0-st40" / "config.yaml").read_text()
    assert "pooled_only: false" in run_cfg
    for metrics in results["main"].values():
        assert {"top1", "cos_true", "cos_centred"} <= set(metrics)
        for cells in metrics.values():
            assert "shape/held-out" not in cells
            assert {f"{c}/seen" for c in CATEGORIES} <= set(cells)
            for stat in cells.values():
                assert stat["ci"][0] <= stat["mean"] + 1e-12 <= stat["ci"][1] + 2e-12
                assert stat["n"] == 2
                assert -1.0 <= stat["mean"] <= 1.0
    main_rows = results["main"]

    def both(row: str, metric: str) -> float:
        return np.mean([main_rows[row][metric][f"all/{s}"]["mean"] for s in ("seen", "held-out")])

    # the modality gap: the raw text embedding points away from its true images, a true image embedding does not
    assert both(ROW_TEXT, "cos_true") < 0.5 < both(ROW_ORACLE, "cos_true")
    assert both(ROW_ORACLE, "cos_centred") > both(ROW_TEXT, "cos_centred") + 0.3
    # even a briefly trained prior (40 steps) moves predictions from the text cone towards the image cone
    # (measured with per-token text states, cosine / centred cosine: text 0.30 / 0.36, Diffusion-Baseline, which
    # 40 steps move least, 0.39 / 0.39, ECLIPSE and Projection 0.52 / 0.45, image-contrastive and hard negatives
    # 0.50 / 0.42, ridge and residual 0.69 / 0.66, oracle 0.69 / 0.66)
    for label in OBJECTIVE_LABELS.values():
        slow = label == OBJECTIVE_LABELS["diffusion"]
        assert both(label, "cos_centred") > both(ROW_TEXT, "cos_centred") + (0.0 if slow else 0.03)
        assert both(label, "cos_true") > both(ROW_TEXT, "cos_true") + (0.05 if slow else 0.15)
    # retrieval is a proportion of the captions; the text row is deterministic (zero-width interval)
    for row in MAIN_ROWS:
        assert all(0.0 <= v["mean"] <= 1.0 for v in main_rows[row]["top1"].values())
    assert all(v["ci"][0] == v["ci"][1] for v in main_rows[ROW_TEXT]["top1"].values())
    # the training store holds no held-out composition and went through embed
    captions = [json.loads(line) for line in (out / "data" / "images-n300" / "captions.jsonl").read_text().splitlines()]
    assert len(captions) == 300 and not any(c["held_out"] for c in captions)
    assert not any(composition_held_out(parse_caption(c["caption"]), DEFAULT_HOLDOUT) for c in captions)
    manifest = json.loads((out / "data" / "store-n300" / "manifest.json").read_text())
    assert manifest["num_rows"] == 300
    runs = [d for d in (out / "runs").iterdir() if d.is_dir()]
    assert len(runs) == 14  # 7 objectives x 2 seeds
    for spec_dir in runs:
        assert json.loads((spec_dir / "run.json").read_text())["status"] == "finished"
    md = (out / "results.md").read_text()
    for row in ALL_ROWS:
        assert row in md
    from PIL import Image

    for png in ("main_top1.png", "main_cos_true.png"):
        assert Image.open(out / png).size[0] > 100
    if "judge" in results:
        assert "## Goal" in md
        for row in ALL_ROWS:
            for stat in results["main"][row]["judge"].values():
                assert 0.0 <= stat["mean"] <= 1.0
    # the size-binding probe reads the folder's own priors and writes its table
    assert main(["shapes", "size-probe", "--out", str(out), "--seeds", "2", "--train", "300"]) == 0
    probe = json.loads((out / "size_probe.json").read_text())
    assert {"Fresh true render", "ECLIPSE", "Ridge (linear map)"} <= set(probe["rows"])
    for cells in probe["rows"].values():
        assert all(0.0 <= c["accuracy"] <= 1.0 for c in cells.values())
    # a rerun reuses every cached prior, evaluation and decode and reproduces the numbers
    again = run_benchmark(BenchmarkConfig.quick_config(str(out), threads=1), log=lambda s: None, progress=False)
    assert again["main"] == results["main"]


@needs_clip
def test_workers_give_the_same_results_as_one_process(tmp_path):
    """`--workers 2` trains, scores and decodes in two processes; with the same threads per prior every number
    (embedding metrics, ablation rows, judge cells) equals the one-process run's."""
    settings = dict(threads=1, objectives=("projection", "diffusion", "eclipse", "ridge"), lams=(0.2,),
                    diffusion_steps=(2,), ablation_objectives=("projection", "eclipse"), judge_text=False)
    results = {}
    for workers in (2, 1):
        cfg = BenchmarkConfig.quick_config(str(tmp_path / f"w{workers}"), workers=workers, **settings)
        cfg.ablations = True
        logged: list[str] = []
        results[workers] = run_benchmark(cfg, log=logged.append, progress=False)
        if workers == 2:  # every prior and decoded row came from the pool
            assert sum(line.startswith("done ") for line in logged) == 4 * 2 + 2
    assert results[2]["main"] == results[1]["main"]
    assert results[2]["ablations"] == results[1]["ablations"]
    assert "prefetch_s" in results[2]["timings"]


def test_size_probe_of_a_folder_without_runs_is_one_line_and_writes_nothing(tmp_path, capsys):
    from eclipse_prior.cli import main

    assert main(["shapes", "size-probe", "--out", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no runs/" in err and "\n" not in err
    assert not (tmp_path / "none").exists()
