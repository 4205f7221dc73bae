"""The app's engine (no gradio needed): request checks, side-by-side columns on the shipped shapes world, sidecars
that `generate --from-sidecar` remakes pixel for pixel, and a prior that does not fit the decoder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eclipse_prior.app import default_columns
from eclipse_prior.app.engine import TEXT_COLUMN, Engine, Request, parse_prior_specs
from eclipse_prior.cli import main
from eclipse_prior.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def wrong_width_prior(tmp_path_factory) -> Path:
    from eclipse_prior.models import EclipsePrior

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wrong") / "prior"
    EclipsePrior.from_preset("tiny", 32, None, pooled_only=True).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def engine(tmp_path_factory, wrong_width_prior) -> Engine:
    columns, decoder, clip = default_columns(None, [])
    return Engine([*columns, ("Too narrow", str(wrong_width_prior))], decoder, clip,
                  tmp_path_factory.mktemp("app-out"), device="cpu", local_files_only=True)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def test_columns_draw_side_by_side_and_sidecars_regenerate_exactly(engine, tmp_path, capsys):
    names = [c.name for c in engine.columns]
    assert names == ["ECLIPSE", "Diffusion-Baseline", "Too narrow", TEXT_COLUMN]
    request, results = engine.generate(Request("a purple star and a yellow circle", seed=7, num_images=2, steps=3,
                                               guidance=4.0, prior_steps=3))
    by_name = {r.name: r for r in results}
    assert "width 32" in by_name["Too narrow"].error and not by_name["Too narrow"].images
    drawn = [by_name[n] for n in ("ECLIPSE", "Diffusion-Baseline", TEXT_COLUMN)]
    for result in drawn:
        assert result.error is None and len(result.images) == 2
        assert all(_pixels(p).shape == (64, 64, 3) for p in result.images)  # the shapes decoder's native size
        assert result.total_seconds >= result.prior_seconds > 0
    # same seeds, different priors: different images; a column's two images differ by seed
    assert not np.array_equal(_pixels(drawn[0].images[0]), _pixels(drawn[1].images[0]))
    assert not np.array_equal(_pixels(drawn[0].images[0]), _pixels(drawn[0].images[1]))
    for result in drawn[:2]:
        sidecar = json.loads(result.sidecars[1].read_text())
        assert sidecar["seed"] == 8 and sidecar["steps"] == 3 and sidecar["prompt"] == request.prompt
        assert sidecar["models"]["prior"]["class"] in ("EclipsePrior", "DiffusionPrior")
        out = tmp_path / result.name
        assert main(["generate", "--from-sidecar", str(result.sidecars[1]), "--out", str(out)]) == 0
        assert np.array_equal(_pixels(out / result.images[1].name), _pixels(result.images[1]))
    # the text column names no prior: generate refuses its JSON instead of drawing with another prior
    assert main(["generate", "--from-sidecar", str(drawn[2].sidecars[0]), "--out", str(tmp_path / "t")]) == 2
    assert "not an eclipse-prior image sidecar" in capsys.readouterr().err


def test_text_column_decodes_the_raw_text_embedding(engine):
    """The text column's image is the decoder's output for image_embeds = the CLIP text embedding."""
    from eclipse_prior.pipelines.generate import _decode
    from eclipse_prior.pipelines.kandinsky import KandinskyEmbeds

    _, results = engine.generate(Request("a red circle", seed=3, steps=2))
    text = next(r for r in results if r.name == TEXT_COLUMN)
    pipe = engine.pipe
    with torch.no_grad():
        embeds = KandinskyEmbeds(pipe._encode(["a red circle"]).embeds, pipe.zero_image_embeds(1))
        expected = _decode(engine.base, embeds, torch.Generator("cpu").manual_seed(3), engine.settings(
            engine.check(Request("a red circle", seed=3, steps=2))))
    assert np.array_equal(_pixels(text.images[0]), np.asarray(expected.convert("RGB")))


@pytest.mark.parametrize(("change", "message"), [
    ({"prompt": "   "}, "enter a prompt"),
    ({"prompt": "a red circle " * 10}, "tokens long but this CLIP reads at most 24"),
    ({"prompt": "x" * 1001}, "at most 1000"),
    ({"negative_prompt": "a blue square " * 10}, "negative prompt is"),
    ({"seed": -1}, "seed must be a whole number from 0"),
    ({"seed": 1.5}, "seed must be a whole number"),
    ({"num_images": 5}, "number of images must be a whole number from 1 to 4"),
    ({"steps": 0}, "decoder steps"),
    ({"steps": "many"}, "decoder steps must be a whole number"),
    ({"guidance": 50}, "decoder guidance must be from 1 to 20"),
    ({"size": 70}, "size must be a multiple of 16"),
    ({"size": 4096}, "size must be a whole number from 16 to 128"),
    ({"prior_steps": 1000}, "prior steps"),
])
def test_bad_requests_are_one_line_messages(engine, change, message):
    base = dict(prompt="a red circle", seed=0, num_images=1, steps=2, guidance=4.0)
    with pytest.raises(ConfigError, match=message) as info:
        engine.generate(Request(**{**base, **change}))
    assert "\n" not in str(info.value)


def test_prior_specs_and_startup_errors(tmp_path):
    assert parse_prior_specs(["A=/x/run", "/y/export/"]) == [("A", "/x/run"), ("export", "/y/export/")]
    for bad in (["=x"], ["A="], ["A=x", "A=y"]):
        with pytest.raises(ConfigError):
            parse_prior_specs(bad)
    # a decoder that does not exist is an error at startup (one line, exit 2 from the CLI), not a page message
    from eclipse_prior.app import load_engine
    from eclipse_prior.cli import build_parser
    from eclipse_prior.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="decoder .*nope"):
        load_engine(build_parser().parse_args(["app", "--decoder", str(tmp_path / "nope"), "--offline"]))
    with pytest.raises(ConfigError, match="--max-images must be at least 1"):
        load_engine(build_parser().parse_args(["app", "--max-images", "0"]))


def test_the_core_never_imports_gradio():
    code = ("import sys, eclipse_prior, eclipse_prior.cli as c; c.build_parser(); "
            "import eclipse_prior.app.engine, eclipse_prior.hub, eclipse_prior.training.trainer; "
            "print('gradio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_karlo_decoder_has_a_fixed_size_and_its_sidecars_regenerate(tiny_clip_dir, tmp_path):
    """The other decoder layout: no size choice, a text column built from Karlo's own inputs, sidecars that
    `generate` remakes."""
    from eclipse_prior.models import EclipsePrior
    from eclipse_prior.pipelines.tiny import save_tiny_karlo_decoder

    torch.manual_seed(0)
    EclipsePrior.from_preset("tiny", embedding_dim=32, num_embeddings=77).save_pretrained(tmp_path / "prior")
    decoder = save_tiny_karlo_decoder(tmp_path / "karlo", tiny_clip_dir)
    engine = Engine([("mine", str(tmp_path / "prior"))], str(decoder), None, tmp_path / "out", device="cpu",
                    local_files_only=True)
    assert engine.sizes is None and engine.defaults().size is None
    with pytest.raises(ConfigError, match="fixed"):
        engine.check(Request("a cat", size=48))
    _, (prior, text) = engine.generate(Request("a cat", negative_prompt="a dog", steps=2, seed=1))
    assert prior.error is None and text.error is None and text.name == TEXT_COLUMN
    size = engine.pipe.image_size
    assert Image.open(prior.images[0]).size == Image.open(text.images[0]).size == (size, size)
    assert main(["generate", "--from-sidecar", str(prior.sidecars[0]), "--out", str(tmp_path / "again")]) == 0
    assert np.array_equal(_pixels(tmp_path / "again" / prior.images[0].name), _pixels(prior.images[0]))
