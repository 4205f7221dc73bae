"""`eclipse-prior generate` end to end on tiny random models: files written, sidecars, exact regeneration,
one-line errors (offline missing model, wrong width, bad options)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eclipse_prior.cli import main
from eclipse_prior.models import EclipsePrior
from eclipse_prior.pipelines.tiny import save_tiny_kandinsky_decoder, save_tiny_karlo_decoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_clip_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gen_models")
    torch.manual_seed(0)
    EclipsePrior.from_preset("tiny", embedding_dim=32, num_embeddings=77).save_pretrained(root / "prior")
    EclipsePrior.from_preset("tiny", embedding_dim=16, num_embeddings=77).save_pretrained(root / "narrow")
    return {
        "prior": str(root / "prior"),
        "narrow": str(root / "narrow"),
        "clip": str(tiny_clip_dir),
        "kandinsky": str(save_tiny_kandinsky_decoder(root / "kandinsky")),
        "karlo": str(save_tiny_karlo_decoder(root / "karlo", tiny_clip_dir)),
    }


def _kandinsky_args(models: dict[str, str], out: Path) -> list[str]:
    return [
        "generate", "--prior", models["prior"], "--decoder", models["kandinsky"], "--clip", models["clip"],
        "--steps", "2", "--height", "32", "--width", "32", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_prompts_file_writes_images_sidecars_grid_and_regenerates_exactly(models, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n\n# a comment\na blue circle\n")
    out = tmp_path / "out"
    args = [*_kandinsky_args(models, out), "--prompts-file", str(prompts), "--num-images", "1", "--seed", "7"]
    assert main(args) == 0
    pngs = sorted(p for p in out.glob("0*.png"))
    assert [p.name for p in pngs] == ["00000-a-red-square-s7.png", "00001-a-blue-circle-s8.png"]
    assert Image.open(out / "prompts-grid.png").size == (32, 64)  # one row per prompt, one image each
    assert np.abs(_pixels(pngs[0]) - _pixels(pngs[1])).max() > 0  # other seed and prompt, other image

    side = json.loads(pngs[1].with_suffix(".json").read_text())
    assert side["prompt"] == "a blue circle" and side["seed"] == 8 and side["image"] == pngs[1].name
    assert (side["steps"], side["guidance"], side["height"], side["width"]) == (2, 7.5, 32, 32)
    assert side["models"]["prior"]["class"] == "EclipsePrior"
    assert side["models"]["decoder"]["id"] == models["kandinsky"]
    assert side["negative_prompt"] is None and side["dtype"] == "fp32"
    assert set(side["versions"]) >= {"torch", "diffusers", "transformers", "eclipse_prior"}

    regen = tmp_path / "regen"
    assert main(["generate", "--from-sidecar", str(pngs[1].with_suffix(".json")), "--out", str(regen)]) == 0
    assert np.array_equal(_pixels(regen / pngs[1].name), _pixels(pngs[1]))
    assert "regenerated" in capsys.readouterr().out


def test_freeing_the_text_models_gives_the_same_pixels(models, tmp_path):
    common = [*_kandinsky_args(models, tmp_path / "a"), "--prompt", "a red square", "--seed", "3"]
    assert main(common) == 0
    freed = [*_kandinsky_args(models, tmp_path / "b"), "--prompt", "a red square", "--seed", "3"]
    assert main([*freed, "--free-text-models"]) == 0
    name = "00000-a-red-square-s3.png"
    assert np.array_equal(_pixels(tmp_path / "a" / name), _pixels(tmp_path / "b" / name))


def test_karlo_folder_brings_its_own_text_encoder(models, tmp_path):
    out = tmp_path / "karlo"
    args = ["generate", "--prior", models["prior"], "--decoder", models["karlo"], "--prompt", "a red square",
            "--steps", "2", "--super-res-steps", "2", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    png = out / "00000-a-red-square-s0.png"
    assert Image.open(png).size == (32, 32)
    side = json.loads(png.with_suffix(".json").read_text())
    assert side["decoder_kind"] == "karlo" and side["models"]["clip"] is None and side["super_res_steps"] == 2


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    return err


def test_offline_missing_model_is_one_line_naming_id_and_flag(models, tmp_path, capsys):
    args = ["generate", "--prompt", "x", "--offline", "--out", str(tmp_path)]
    assert main([*args, "--decoder", "eclipse-prior-tests/no-such-decoder", "--prior", models["prior"]]) == 2
    err = _one_line_error(capsys)
    assert "eclipse-prior-tests/no-such-decoder" in err and "--decoder PATH" in err
    assert main([*args, "--decoder", models["kandinsky"], "--clip", models["clip"],
                 "--prior", "eclipse-prior-tests/no-such-prior"]) == 2  # fmt: skip
    err = _one_line_error(capsys)
    assert "eclipse-prior-tests/no-such-prior" in err and "--prior PATH" in err


def test_bad_inputs_are_one_line_errors(models, tmp_path, capsys):
    base = _kandinsky_args(models, tmp_path)
    assert main([*base[:2], models["narrow"], *base[3:], "--prompt", "x"]) == 2
    err = _one_line_error(capsys)
    assert "width 16" in err and "width 32" in err
    assert main(base) == 2  # no prompts
    assert "no prompts" in _one_line_error(capsys)
    assert main([*base, "--prompt", "x", "--dtype", "fp16"]) == 2
    assert "fp16 needs a CUDA GPU" in _one_line_error(capsys)
    assert main(["generate", "--from-sidecar", str(tmp_path / "missing.json")]) == 2
    assert "sidecar not found" in _one_line_error(capsys)
    broken = tmp_path / "no_weights"
    shutil.copytree(models["kandinsky"], broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.unlink()
    assert main([*base[:4], str(broken), *base[5:], "--prompt", "x"]) == 2
    assert "safetensors" in _one_line_error(capsys)
    if not torch.cuda.is_available():
        assert main([*base, "--prompt", "x", "--offload", "model"]) == 2
        assert "needs a CUDA GPU" in _one_line_error(capsys)


def test_sidecar_records_weight_digests_and_regeneration_refuses_changed_weights(models, tmp_path, capsys):
    """A local prior retrained in place would silently give another image: the sidecar's sha256 catches it."""
    import hashlib

    prior = tmp_path / "prior"
    shutil.copytree(models["prior"], prior)
    out = tmp_path / "out"
    args = ["generate", "--prior", str(prior), *_kandinsky_args(models, out)[3:], "--prompt", "a red square"]
    assert main(args) == 0
    sidecar = out / "00000-a-red-square-s0.json"
    side = json.loads(sidecar.read_text())
    weights = prior / "diffusion_pytorch_model.safetensors"
    assert side["models"]["prior"]["weights_sha256"] == {weights.name: hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert set(side["models"]["decoder"]["weights_sha256"]) >= {
        "unet/diffusion_pytorch_model.safetensors", "movq/diffusion_pytorch_model.safetensors"}  # fmt: skip
    assert side["models"]["clip"]["weights_sha256"]

    torch.manual_seed(1)  # "training continued": other weights in the same folder
    EclipsePrior.from_preset("tiny", embedding_dim=32, num_embeddings=77).save_pretrained(prior)
    capsys.readouterr()
    regen = ["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "regen")]
    assert main(regen) == 2
    err = _one_line_error(capsys)
    assert "prior" in err and "weights changed" in err and "--allow-changed-weights" in err
    assert main([*regen, "--allow-changed-weights"]) == 0
    assert "weights changed" in capsys.readouterr().err
    assert not np.array_equal(_pixels(tmp_path / "regen" / "00000-a-red-square-s0.png"),
                              _pixels(out / "00000-a-red-square-s0.png"))


def test_sizes_that_are_not_a_decoder_multiple_are_refused(models, tmp_path, capsys):
    """The tiny decoder rounds 50 up to 52; that image would contradict its sidecar, so 50 is an error."""
    base = _kandinsky_args(models, tmp_path)
    args = [*base[: base.index("--height")], "--height", "50", "--width", "32", "--device", "cpu",
            "--out", str(tmp_path), "--prompt", "x"]  # fmt: skip
    assert main(args) == 2
    err = _one_line_error(capsys)
    assert "--height 50" in err and "multiple of 4" in err


def test_arguments_are_checked_before_any_model_is_loaded(tmp_path, capsys):
    """Models that do not exist are never reached: the bad number is reported first (real models take minutes)."""
    missing = ["generate", "--prior", str(tmp_path / "no-prior"), "--decoder", str(tmp_path / "no-decoder"),
               "--prompt", "x", "--out", str(tmp_path)]  # fmt: skip
    for flag in ("--num-images", "--steps", "--prior-steps", "--height"):
        assert main([*missing, flag, "0"]) == 2
        assert f"{flag} must be at least 1" in _one_line_error(capsys)
    assert main(missing) == 2
    assert "no-decoder" in _one_line_error(capsys)  # the same command with good numbers does reach the models


def test_no_torchvision_fallback_notice(models, tmp_path):
    """A fresh process (transformers warns once per process) prints no "requires torchvision" notice."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "eclipse_prior", *_kandinsky_args(models, tmp_path), "--prompt", "x"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "torchvision" not in done.stderr, done.stderr
