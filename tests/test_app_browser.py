"""`eclipse-prior app` as a user meets it: started on a free local port, driven in headless Chromium (Playwright),
and called through its API with gradio_client. CI installs gradio, playwright and Debian's chromium (.ci/run);
elsewhere these tests skip, naming what is missing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the app extra is not installed (pip install 'eclipse-prior[app]')")
pytest.importorskip("gradio_client", reason="gradio_client is not installed (pip install 'eclipse-prior[app]')")

from eclipse_prior.app.browser import chromium_path, drive, start_app  # noqa: E402
from eclipse_prior.app.engine import TEXT_COLUMN  # noqa: E402
from eclipse_prior.cli import main  # noqa: E402

COLUMNS = ["ECLIPSE", "Diffusion-Baseline", "Too narrow", TEXT_COLUMN]
NARROW = 2  # the column whose prior does not fit the decoder


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The default shapes-world columns plus a prior of the wrong width, which must show as a message."""
    from eclipse_prior.app import default_columns
    from eclipse_prior.models import EclipsePrior

    root = tmp_path_factory.mktemp("app")
    torch.manual_seed(0)
    EclipsePrior.from_preset("tiny", 32, None, pooled_only=True).save_pretrained(root / "narrow")
    priors = [f"{name}={path}" for name, path in default_columns(None, [])[0]] + [f"Too narrow={root / 'narrow'}"]
    running = start_app(root, [arg for p in priors for arg in ("--prior", p)])
    yield running
    running.stop()


@pytest.fixture
def client(app, tmp_path):
    from gradio_client import Client

    return Client(app.url, download_files=str(tmp_path), verbose=False)


def test_page_in_chromium_draws_every_column_without_console_errors(app, tmp_path):
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if chromium_path() is None:
        pytest.skip("no Chromium on PATH (apt-get install chromium)")
    shot = tmp_path / "app.png"
    run = drive(app.url, "a purple star and a yellow circle", num_images=2, screenshot=shot)
    expected = [[(64, 64)] * 2] * len(COLUMNS)  # 2 images per column at the decoder's 64 px
    expected[NARROW] = []
    assert run.columns == expected
    assert run.status.startswith("Drew 2 image(s) per column (seeds 0-1)")
    assert "ms" in run.timings[0] and all("column total" in t for i, t in enumerate(run.timings) if i != NARROW)
    assert "width 32" in run.timings[NARROW] and "Unavailable" in run.timings[NARROW]
    assert run.console_errors == []
    assert run.external_requests == []  # offline: nothing but the app itself was fetched
    with Image.open(shot) as img:
        assert img.format == "PNG" and img.size[0] == 1360


def _predict(client, prompt="a red circle", negative="", seed=5, n=1, steps=3, guidance=3.0, size=64):
    return client.predict(prompt, negative, seed, n, steps, guidance, size, 3, 4.0, api_name="/generate")


def test_api_draws_columns_whose_downloads_regenerate_exactly(client, tmp_path):
    torch.set_num_threads(1)  # the app runs with one thread: same arithmetic, same pixels
    status, *values = _predict(client, n=2)
    assert status.startswith("Drew 2 image(s)")
    columns = [values[i : i + 3] for i in range(0, len(values), 3)]
    assert len(columns) == len(COLUMNS)
    assert not columns[NARROW][0] and "width 32" in columns[NARROW][1]
    for gallery, timing, files in columns[:NARROW] + columns[NARROW + 1 :]:
        assert len(gallery) == 2 and "column total" in timing
        assert all(Image.open(item["image"]).size == (64, 64) for item in gallery)
        assert sorted(Path(f).suffix for f in files) == [".json", ".json", ".png", ".png"]
    gallery, _, files = columns[0]  # ECLIPSE
    sidecar = next(Path(f) for f in files if f.endswith("-s6.json"))
    png = next(Path(f) for f in files if f.endswith("-s6.png"))
    data = json.loads(sidecar.read_text())
    assert data["seed"] == 6 and data["prompt"] == "a red circle" and data["steps"] == 3 and data["height"] == 64
    assert main(["generate", "--from-sidecar", str(sidecar), "--out", str(tmp_path / "again")]) == 0
    again = np.asarray(Image.open(tmp_path / "again" / png.name).convert("RGB"))
    assert np.array_equal(again, np.asarray(Image.open(png).convert("RGB")))


def test_bad_input_is_a_message_and_the_app_keeps_serving(client):
    from gradio_client.exceptions import AppError

    for kwargs, message in (({"prompt": "  "}, "enter a prompt"),
                            ({"prompt": "a red circle " * 10}, "tokens long"),
                            ({"size": 72}, "multiple of 16")):
        status, *values = _predict(client, **kwargs)
        assert status.startswith("**Cannot draw:**") and message in status and "Traceback" not in status
        assert all(v in (None, "", []) for v in values)  # no images from a refused request
    with pytest.raises(AppError, match="maximum"):  # gradio's own bound on the slider, also one line
        _predict(client, n=99)
    status, *_ = _predict(client)
    assert status.startswith("Drew 1 image(s)")
