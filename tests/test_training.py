"""Training: schedule, data order, checkpoints, SIGKILL + resume, config precedence and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from eclipse_prior.cli import main
from eclipse_prior.data.store import write_store
from eclipse_prior.losses import DEFAULT_TAU
from eclipse_prior.models import DiffusionPrior, EclipsePrior, load_prior
from eclipse_prior.training import TrainConfig, train
from eclipse_prior.training.checkpoint import list_checkpoints
from eclipse_prior.training.trainer import DataOrder, lr_factor, resolved_command

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WIDTH, LENGTH = 32, 8


def make_store(
    path: Path,
    n: int = 96,
    states: bool = True,
    normalized: bool = False,
    num_captions: int = 80,
    seed: int = 0,
    width: int = WIDTH,
) -> Path:
    """A store whose image embedding is a fixed linear map of the text embedding plus noise (learnable)."""
    rng = np.random.default_rng(seed)
    caption_of = [i % num_captions for i in range(n)]
    base = rng.normal(size=(num_captions, width)).astype(np.float32)
    text = base[caption_of]
    weights = rng.normal(size=(width, width)).astype(np.float32) / np.sqrt(width)
    image = text @ weights + 0.1 * rng.normal(size=(n, width)).astype(np.float32)
    if normalized:
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        image /= np.linalg.norm(image, axis=1, keepdims=True)
    arrays = {"image_embeds": image, "text_embeds": text}
    if states:
        arrays["text_states"] = rng.normal(size=(n, LENGTH, width)).astype(np.float32)
        mask = np.ones((n, LENGTH), bool)
        mask[:, 6:] = rng.random((n, 2)) < 0.5
        arrays["text_mask"] = mask
    meta = [{"id": f"row-{i}", "caption": f"caption {c}", "source": "synthetic"} for i, c in enumerate(caption_of)]
    write_store(
        path, arrays, meta, shard_size=40, clip_id="synthetic", clip_revision="0", normalized=normalized,
        dtype="fp32", val_fraction=0.2,
    )
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "store")


def tiny_cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        data=str(store), out=str(out), preset="tiny", steps=6, batch_size=8, lr=1e-3, warmup_steps=2,
        log_every=1, val_every=0, checkpoint_every=3, report_to="none", ema_decay=0.9,
    )
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [lr_factor(s, 4, 20) for s in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert factors[4] == 1.0 and all(a >= b for a, b in zip(factors[4:], factors[5:], strict=False))
    assert lr_factor(19, 4, 20) == pytest.approx(0.5 * (1 + np.cos(np.pi * 15 / 16)))
    assert lr_factor(20, 4, 20) == pytest.approx(0.0)


def test_data_order_covers_each_epoch_and_ranks_do_not_overlap():
    rows = np.arange(10, 33)
    order = DataOrder(rows, seed=3)
    stream = np.concatenate([order.global_batch(m, 6) for m in range(8)])  # 48 rows: 2 epochs + 2
    assert sorted(stream[:23]) == list(rows) and sorted(stream[23:46]) == list(rows)
    assert not np.array_equal(stream[:23], stream[23:46])  # reshuffled per epoch
    again = DataOrder(rows, seed=3)
    assert np.array_equal(again.global_batch(5, 6), order.global_batch(5, 6))  # a function of the step alone
    assert order.position(5, 6) == {"epoch": 1, "offset": 7, "micro_step": 5}
    # 2 ranks x batch 3 read exactly the rows of 1 rank x batch 6, disjointly
    for m in range(8):
        g = order.global_batch(m, 6)
        assert np.array_equal(np.concatenate([g[0:3], g[3:6]]), g)


def test_tau_default_matches_losses():
    assert TrainConfig().tau == DEFAULT_TAU


def test_run_dir_layout_checkpoints_and_prior(store, tmp_path):
    cfg = tiny_cfg(store, tmp_path / "run", steps=7, checkpoint_every=2, keep_checkpoints=2, val_every=4,
                   report_to="tensorboard")
    run = train(cfg)
    ckpts = list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000006", "step-00000007"]  # last 2 kept, final step saved
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    for c in ckpts:  # safetensors + JSON only: nothing to unpickle
        assert sorted(p.suffix for p in c.iterdir()) == [".json"] + [".safetensors"] * 4
    state = json.loads((ckpts[-1] / "state.json").read_text())
    assert state["step"] == 7 and state["data_position"]["micro_step"] == 7 and state["world_size"] == 1
    # prior/ is the EMA of the last checkpoint, loadable by load_prior(run_dir)
    prior = load_prior(run)
    assert isinstance(prior, EclipsePrior) and prior.config.embedding_dim == WIDTH
    assert prior.config.num_embeddings == LENGTH
    ema = load_file(ckpts[-1] / "ema.safetensors")
    for k, v in prior.state_dict().items():
        assert torch.equal(v, ema[k]), k
    raw = load_file(ckpts[-1] / "model.safetensors")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # EMA differs from the raw weights
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["steps"] == 7 and saved["preset"] == "tiny" and saved["tau"] == DEFAULT_TAU
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "finished" and info["store"]["rows"] == 96 and info["global_batch"] == 8
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train_rows] == list(range(1, 8))
    assert all(r["loss"] == pytest.approx(r["projection"] + 0.2 * r["contrastive"], rel=1e-5) for r in train_rows)
    assert [r["step"] for r in rows if r.get("split") == "val"] == [4, 7]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "logs").rglob("*"))
    # a finished run resumed is a no-op that keeps its weights
    cfg.resume = True
    train(cfg)
    assert all(torch.equal(v, load_prior(run).state_dict()[k]) for k, v in prior.state_dict().items())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def kill_train_after_checkpoint(train_flags: list[str], checkpoint: Path) -> None:
    """Run `eclipse-prior train` in a real subprocess and SIGKILL it as soon as `checkpoint` is complete."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "eclipse_prior", "train", *train_flags], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = checkpoint / "state.json"
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]


def test_sigkill_after_checkpoint_then_resume_equals_uninterrupted(store, tmp_path):
    """A real subprocess killed with SIGKILL right after a checkpoint, resumed, ends where an uninterrupted run does."""
    killed = tmp_path / "killed"
    args = dict(steps=40, checkpoint_every=10, keep_checkpoints=2, grad_accum=2, batch_size=6, num_workers=2)
    flags = [
        "--data", str(store), "--out", str(killed), "--preset", "tiny", "--steps", "40", "--batch-size", "6",
        "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1", "--val-every", "0", "--checkpoint-every", "10",
        "--keep-checkpoints", "2", "--grad-accum", "2", "--num-workers", "2", "--report-to", "none",
        "--ema-decay", "0.9",
    ]
    kill_train_after_checkpoint(flags, killed / "checkpoints" / "step-00000010")
    done = list_checkpoints(killed / "checkpoints")
    assert done and int(done[-1].name.split("-")[1]) < 40  # really interrupted

    train(tiny_cfg(store, killed, lr=1e-3, resume=True, **args))
    straight = train(tiny_cfg(store, tmp_path / "straight", lr=1e-3, **args))

    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = _weights(killed / "checkpoints" / "step-00000040" / name)
        b = _weights(straight / "checkpoints" / "step-00000040" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name}:{k}")
    losses = [[json.loads(x)["loss"] for x in (r / "metrics.jsonl").read_text().splitlines()]
              for r in (killed, straight)]
    assert len(losses[0]) == 40 and losses[0] == pytest.approx(losses[1], abs=1e-6)
    # resuming records both invocations
    assert [i["start_step"] for i in json.loads((killed / "run.json").read_text())["invocations"]][-1] > 0


def test_objectives_precision_and_accumulation(store, tmp_path):
    run = train(tiny_cfg(store, tmp_path / "diff", objective="diffusion", steps=3, pooled_only=True,
                         val_every=3, mixed_precision="bf16", grad_accum=2))
    prior = load_prior(run)
    assert isinstance(prior, DiffusionPrior) and not prior.uses_text_states
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set(rows[0]) == {"step", "loss", "projection", "lr", "samples_per_s"}
    val = rows[-1]
    assert val["split"] == "val" and np.isfinite([v for k, v in val.items() if k != "split"]).all()
    run = train(tiny_cfg(store, tmp_path / "proj", objective="projection", steps=2))
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == first["projection"]


def test_yaml_config_flags_override_and_resolved_command(store, tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"preset": "tiny", "steps": 2, "batch_size": 4, "lam": 0.3, "log_every": 1,
                                      "val_every": 0, "report_to": "none", "data": str(store)}))
    out = tmp_path / "run"
    assert main(["train", "--config", str(config), "--out", str(out), "--lam", "0.4", "--no-verify-store"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lam"] == 0.4 and saved["batch_size"] == 4 and saved["verify_store"] is False
    cmd = json.loads((out / "run.json").read_text())["command"]
    assert "--lam 0.4" in cmd and "--no-verify-store" in cmd and "--batch-size 4" in cmd
    assert resolved_command(TrainConfig(data="s", out="o")) == "eclipse-prior train --data s --out o"


def _fails(capsys, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_one_line_errors(store, tmp_path, capsys):
    base = ["train", "--data", str(store), "--steps", "1", "--report-to", "none", "--val-every", "0"]
    _fails(capsys, [*base, "--out", str(tmp_path / "a"), "--preset", "kandinsky22"], "1280", "32")
    _fails(capsys, [*base, "--out", str(tmp_path / "b"), "--preset", "huge"], "unknown preset", "tiny")
    _fails(capsys, [*base, "--out", str(tmp_path / "c"), "--preset", "tiny", "--init-from", "nobody/no-such-prior",
                    "--offline"], "nobody/no-such-prior", "local folder")
    _fails(capsys, [*base, "--out", str(tmp_path / "d"), "--mixed-precision", "fp16"], "fp16")
    assert main([*base, "--out", str(tmp_path / "e"), "--preset", "tiny"]) == 0
    capsys.readouterr()
    _fails(capsys, [*base, "--out", str(tmp_path / "e"), "--preset", "tiny"], "--resume")
    _fails(capsys, [*base, "--out", str(tmp_path / "e"), "--preset", "small", "--resume"], "preset", "'tiny'")

    normalized = make_store(tmp_path / "normalized", n=30, states=False, normalized=True)
    _fails(capsys, ["train", "--data", str(normalized), "--out", str(tmp_path / "f"), "--preset", "tiny"],
           "normalised", "--allow-normalized-store")
    assert main(["train", "--data", str(normalized), "--out", str(tmp_path / "g"), "--preset", "tiny", "--steps",
                 "1", "--report-to", "none", "--val-every", "0", "--allow-normalized-store"]) == 0
    capsys.readouterr()
    assert load_prior(tmp_path / "g").config.num_embeddings == 0  # no text states -> pooled-only

    wide = make_store(tmp_path / "wide", n=20, states=False, width=48)
    _fails(capsys, ["train", "--data", str(wide), "--out", str(tmp_path / "h"), "--init-from", str(tmp_path / "g"),
                    "--report-to", "none"], "48", "32")

    bad = make_store(tmp_path / "nan", n=20, states=False)
    shard = bad / "shard-00000" / "image_embeds.npy"
    arr = np.load(shard)
    arr[3, 1] = np.nan
    np.save(shard, arr)
    _fails(capsys, ["train", "--data", str(bad), "--out", str(tmp_path / "i")], "NaN", "shard-00000")
    arr[3, 1] = 0.5
    np.save(shard, arr)
    _fails(capsys, ["train", "--data", str(bad), "--out", str(tmp_path / "j")], "checksum", "shard-00000")
    _fails(capsys, ["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "k")], "nowhere")
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**manifest, "shards": [], "num_rows": 0}))
    _fails(capsys, ["train", "--data", str(bad), "--out", str(tmp_path / "l")], "empty")
    _fails(capsys, ["train", "--data", str(bad), "--out", str(tmp_path / "m"), "--no-verify-store"], "empty")


def _strict_json_lines(path: Path) -> list[dict]:
    def refuse(token):
        raise AssertionError(f"bare {token} in {path}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines() if line.strip()]


def test_resume_reuses_the_runs_saved_config(store, tmp_path, capsys):
    """`train --out RUN --resume --steps N` continues RUN with the settings it was started with."""
    out = tmp_path / "run"
    assert main(["train", "--data", str(store), "--out", str(out), "--preset", "tiny", "--steps", "2",
                 "--batch-size", "4", "--lam", "0.3", "--report-to", "none", "--val-every", "0"]) == 0
    assert main(["train", "--out", str(out), "--resume", "--steps", "3"]) == 0
    capsys.readouterr()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["steps"], saved["preset"], saved["batch_size"], saved["lam"]) == (3, "tiny", 4, 0.3)
    assert [r["step"] for r in _strict_json_lines(out / "metrics.jsonl") if "loss" in r][-1] == 3
    # a fixed setting changed by a flag is still refused, naming the saved value
    _fails(capsys, ["train", "--out", str(out), "--resume", "--batch-size", "8"], "batch_size", "4 -> 8")


def test_validation_uses_val_steps_and_guidance_and_writes_strict_json(store, tmp_path, capsys):
    run = train(tiny_cfg(store, tmp_path / "d", objective="diffusion", steps=2, val_every=2, val_steps=2,
                         val_guidance=1.5, val_max_samples=3))
    assert "only 3 rows" in capsys.readouterr().err  # a tiny val split is announced
    val = [r for r in _strict_json_lines(run / "metrics.jsonl") if r.get("split") == "val"][-1]
    from eclipse_prior.evaluation import evaluate_prior

    direct = evaluate_prior(load_prior(run), store, num_inference_steps=2, guidance_scale=1.5, max_samples=3)
    assert val["cos_pred_image"] == pytest.approx(direct["cos_pred_image"], abs=1e-6)
    assert val["retrieval_r5"] is None  # undefined with 3 rows (was trivially 1.0)
    other = evaluate_prior(load_prior(run), store, num_inference_steps=2, guidance_scale=4.0, max_samples=3)
    assert other["cos_pred_image"] != pytest.approx(direct["cos_pred_image"], abs=1e-6)
    # one val row: validation is skipped with a note instead of trivial metrics
    run1 = train(tiny_cfg(store, tmp_path / "e", steps=1, val_every=1, val_max_samples=1))
    assert "validation skipped" in capsys.readouterr().err
    assert not [r for r in _strict_json_lines(run1 / "metrics.jsonl") if r.get("split") == "val"]
