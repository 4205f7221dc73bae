"""`export --push-to-hub`: the model card's metadata and body, and the exact hub calls (only the network client is
replaced, by a recorder that also snapshots the folder it is asked to upload)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from eclipse_prior import hub
from eclipse_prior.cli import main
from eclipse_prior.data.store import write_store
from eclipse_prior.training import train
from test_training import tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")
KANDINSKY_CLIP = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny ECLIPSE run on a store recorded as embedded with Kandinsky's CLIP from a hub dataset's shards."""
    root = tmp_path_factory.mktemp("hub")
    rng = np.random.default_rng(0)
    n, width = 60, 16
    text = rng.normal(size=(n, width)).astype(np.float32)
    arrays = {"image_embeds": text @ rng.normal(size=(width, width)).astype(np.float32), "text_embeds": text,
              "text_states": rng.normal(size=(n, 8, width)).astype(np.float32), "text_mask": np.ones((n, 8), bool)}
    meta = [{"id": f"r{i}", "caption": f"caption {i}", "source": "synthetic"} for i in range(n)]
    source = {"kind": "webdataset", "spec": "hf://datasets/someone/pairs/train-{0000..0003}.tar"}
    write_store(root / "store", arrays, meta, shard_size=30, clip_id=KANDINSKY_CLIP, clip_revision="abc123",
                normalized=False, dtype="fp32", val_fraction=0.2, source=source)
    run = train(tiny_cfg(root / "store", root / "run", steps=4, val_every=2, checkpoint_every=2))
    (run / "eval-val.json").write_text(json.dumps({"prior": str(run), "prior_class": "EclipsePrior",
                                                   "data": str(root / "store"), "split": "val",
                                                   "metrics": {"cos_pred_image": 0.5, "retrieval_r5": None}}))
    return run


class RecordingHub:
    """Stands in for huggingface_hub.HfApi: records each call and what the uploaded folder held at that moment."""

    calls: list[tuple[str, dict]] = []
    uploaded: dict[str, bytes] = {}
    fail: Exception | None = None

    def create_repo(self, **kwargs):
        RecordingHub.calls.append(("create_repo", kwargs))
        if RecordingHub.fail is not None:
            raise RecordingHub.fail
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        RecordingHub.calls.append(("upload_folder", kwargs))
        root = Path(kwargs["folder_path"])
        RecordingHub.uploaded = {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def recording_hub(monkeypatch):
    import huggingface_hub

    RecordingHub.calls, RecordingHub.uploaded, RecordingHub.fail = [], {}, None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHub)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return RecordingHub


def test_export_push_to_hub_calls_and_uploaded_card(run_dir, tmp_path, recording_hub, capsys):
    out = tmp_path / "export"
    out.mkdir()
    (out / "LICENSE").write_text("the user's own file")  # an export folder may hold other files: never uploaded
    argv = ["export", str(run_dir), "--out", str(out), "--push-to-hub", "me/shapes-prior", "--private"]
    assert main(argv) == 0
    local_card = (out / "README.md").read_text()
    assert [name for name, _ in recording_hub.calls] == ["create_repo", "upload_folder"]
    assert recording_hub.calls[0][1] == {"repo_id": "me/shapes-prior", "repo_type": "model", "private": True,
                                         "exist_ok": True}
    upload = recording_hub.calls[1][1]
    assert upload["repo_id"] == "me/shapes-prior" and upload["repo_type"] == "model"
    assert not Path(upload["folder_path"]).exists()  # a staging copy, removed after the upload
    files = recording_hub.uploaded
    assert set(files) == {"config.json", "diffusion_pytorch_model.safetensors", "README.md"}
    # the uploaded weights are the run's EMA prior
    ema = load_file(run_dir / "prior" / "diffusion_pytorch_model.safetensors")
    sent = load_file(out / "diffusion_pytorch_model.safetensors")
    assert files["diffusion_pytorch_model.safetensors"] == (out / "diffusion_pytorch_model.safetensors").read_bytes()
    assert all(torch.equal(sent[k], ema[k]) for k in ema)
    card = files["README.md"].decode()
    meta = hub.card_metadata(card)
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-to-image"
    assert meta["library_name"] == "diffusers"
    assert meta["base_model"] == ["kandinsky-community/kandinsky-2-2-decoder", KANDINSKY_CLIP]
    assert meta["datasets"] == ["someone/pairs"]
    # the body: loss, config, validation and evaluate metrics, loading with ours and the authors' pipeline
    assert "lam * InfoNCE" in card and "| lam | 0.2 |" in card and "| steps | 4 |" in card
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"val"' in line][-1]
    assert f"step {val['step']}" in card and f"{val['cos_pred_image']:.4f}" in card
    assert "eval-val.json" in card and "| 0.5000 |" in card
    assert 'load_prior("me/shapes-prior")' in card and "--decoder kandinsky22" in card
    assert 'PriorTransformer.from_pretrained("me/shapes-prior")' in card and "KandinskyPriorPipeline" in card
    assert str(run_dir.parent) not in card and str(tmp_path) not in card  # no local paths in a public card
    assert "--data store --out run" in card  # the command, its paths cut to their last part
    assert "pushed" in capsys.readouterr().out
    # the export folder is unchanged by the push: its own card, and a plain re-export (no --overwrite) still works
    assert (out / "README.md").read_text() == local_card != card
    assert main(["export", str(run_dir), "--out", str(out)]) == 0


def test_push_failures_are_one_line_errors(run_dir, tmp_path, recording_hub, monkeypatch, capsys):
    out = tmp_path / "export"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "HF_HUB_OFFLINE" in err and str(out) in err
    assert recording_hub.calls == []  # nothing was attempted
    assert (out / "README.md").is_file()  # the export itself is kept
    monkeypatch.delenv("HF_HUB_OFFLINE")
    recording_hub.fail = ConnectionError("[Errno -2] Name or service not known")
    assert main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Name or service not known" in err
    assert main(["export", str(run_dir), "--out", str(out), "--push-to-hub", "not-a-repo-id"]) == 2
    assert "owner/name" in capsys.readouterr().err


def test_card_for_a_diffusion_prior_on_a_local_clip_names_no_hub_base_model(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("objective: diffusion\nlam: 0.2\n")
    (run / "run.json").write_text(json.dumps({"store": {"clip_id": "/somewhere/shapes-clip"}}))
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"_class_name": "DiffusionPrior"}))
    card = hub.hub_model_card(run, export, "me/d", license="mit")
    meta = hub.card_metadata(card)
    assert meta["license"] == "mit" and "base_model" not in meta and "datasets" not in meta
    assert "x0 prediction" in card and "do not run it" in card and "No metrics recorded" in card
    (export / "config.json").write_text(json.dumps({"_class_name": "EclipsePrior"}))  # a pooled-only ECLIPSE prior
    card = hub.hub_model_card(run, export, "me/p")
    assert "pooled text embedding only" in card and "PriorTransformer.from_pretrained" not in card
