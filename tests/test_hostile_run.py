"""Hostile and clumsy inputs to train, evaluate, export and generate, table-driven per command.

Each case asserts its outcome class: a one-line error with exit status 2, or the correct result (with the note
that says what was skipped). Every case also asserts that nothing outside the command's output folder changed
(a snapshot of the test's whole tree before and after). Plus a kill -9 during training, a full disk, and a
second `train` on a folder the first still holds.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from eclipse_prior.cli import main
from eclipse_prior.models import EclipsePrior, load_prior
from eclipse_prior.outputs import LOCK_NAME
from eclipse_prior.training import train
from eclipse_prior.training.checkpoint import list_checkpoints
from test_training import kill_train_after_checkpoint, make_store, tiny_cfg

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = ["--preset", "tiny", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2", "--log-every", "1",
         "--val-every", "0", "--report-to", "none", "--ema-decay", "0.9", "--no-progress"]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    """Every file and folder under `root` (but `skip`) with a digest of its bytes: what "untouched" means.

    Lock files are left out: every claim of a folder rewrites its holder record, which is their purpose.
    """
    found = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents) or path.name == LOCK_NAME:
            continue
        rel = str(path.relative_to(root))
        found[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_line_error(capsys, rc: int, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("eclipse-prior "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("hostile_store") / "store", n=64)


@pytest.fixture(scope="module")
def finished_run(store, tmp_path_factory) -> Path:
    """6 steps, checkpoints at 2, 4, 6 (all kept): the run the resume cases damage copies of."""
    out = tmp_path_factory.mktemp("hostile_runs") / "run"
    return train(tiny_cfg(store, out, steps=6, checkpoint_every=2, keep_checkpoints=3, progress=False))


# --------------------------------------------------------------------------------------------------- train


@dataclass
class Case:
    name: str
    setup: Callable[[Path, Path], list[str]]  # (tmp_path, store) -> argv; the output folder is tmp_path / "out"
    needles: tuple[str, ...]


def _flags(store: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(store), "--out", str(out), *TRAIN, "--steps", "2", *extra]


def _yaml_config(tmp: Path, store: Path, fields: dict) -> list[str]:
    config = tmp / "train.yaml"
    config.write_text(yaml.safe_dump({"preset": "tiny", "steps": 2, "data": str(store), **fields}))
    return ["train", "--config", str(config), "--out", str(tmp / "out")]


def _latin1_config(tmp: Path, store: Path) -> list[str]:
    (tmp / "train.yaml").write_bytes(f"data: {store}\npreset: tiny\n# caf\xe9\n".encode("latin-1"))
    return ["train", "--config", str(tmp / "train.yaml"), "--out", str(tmp / "out")]


def _damaged_init(tmp: Path, store: Path) -> list[str]:
    EclipsePrior.from_preset("tiny", 32, 8).save_pretrained(tmp / "init")
    (tmp / "init" / "config.json").write_text('{"_class_name": "EclipsePrior", "num_layers": "two"}')
    return _flags(store, tmp / "out", "--init-from", str(tmp / "init"))


def _file_as_out(tmp: Path, store: Path) -> list[str]:
    (tmp / "out").write_text("my notes")
    return _flags(store, tmp / "out")


def _empty_dir(tmp: Path, store: Path) -> list[str]:
    (tmp / "out").mkdir()
    return _flags(store, tmp / "out", "--resume")


def _edited_saved_config(tmp: Path, store: Path) -> list[str]:
    assert main(_flags(store, tmp / "out")) == 0
    saved = yaml.safe_load((tmp / "out" / "config.yaml").read_text())
    (tmp / "out" / "config.yaml").write_text(yaml.safe_dump({**saved, "batch_size": "eight"}))
    return ["train", "--out", str(tmp / "out"), "--resume", "--steps", "3"]


TRAIN_REFUSALS = [
    Case("lr-nan", lambda t, s: _flags(s, t / "out", "--lr", "nan"), ("lr", "finite")),
    Case("lr-inf", lambda t, s: _flags(s, t / "out", "--lr", "inf"), ("lr", "finite")),
    Case("negative-steps", lambda t, s: _flags(s, t / "out", "--steps", "-5"), ("steps", ">= 1")),
    Case("negative-batch", lambda t, s: _flags(s, t / "out", "--batch-size", "-8"), ("batch_size", ">= 1")),
    Case("batch-beyond-memory", lambda t, s: _flags(s, t / "out", "--batch-size", str(10**11)), ("GiB", "free")),
    Case("zero-tau", lambda t, s: _flags(s, t / "out", "--tau", "0"), ("tau", "> 0")),
    Case("negative-lam", lambda t, s: _flags(s, t / "out", "--lam", "-0.5"), ("lam", ">= 0")),
    Case("nan-grad-clip", lambda t, s: _flags(s, t / "out", "--grad-clip", "nan"), ("grad_clip", "finite")),
    Case("yaml-wrong-type", lambda t, s: _yaml_config(t, s, {"steps": "ten"}), ("steps", "integer")),
    Case("yaml-nan", lambda t, s: _yaml_config(t, s, {"lr": float("nan")}), ("lr", "finite")),
    Case("yaml-list-for-number", lambda t, s: _yaml_config(t, s, {"lam": [0.2]}), ("lam", "number")),
    Case("yaml-not-utf8", _latin1_config, ("train.yaml", "UTF-8")),
    Case("negative-seed", lambda t, s: _flags(s, t / "out", "--seed", "-1"), ("seed",)),
    Case("out-is-a-file", _file_as_out, ("not a folder",)),
    Case("out-is-the-store", lambda t, s: _flags(s, s), ("inside the store",)),
    Case("out-inside-the-store", lambda t, s: _flags(s, s / "runs" / "a"), ("inside the store",)),
    # refused after the run folder was claimed (created): the folder is removed again
    Case("unknown-preset", lambda t, s: _flags(s, t / "out", "--preset", "huge"), ("unknown preset",)),
    Case("damaged-init-from", _damaged_init, ("num_layers", "integer")),
    Case("resume-nonexistent", lambda t, s: _flags(s, t / "out", "--resume"), ("holds no run", "drop --resume")),
    Case("resume-empty-folder", _empty_dir, ("holds no run",)),
    Case("resume-edited-config", _edited_saved_config, ("batch_size", "integer")),
]


@pytest.mark.parametrize("case", TRAIN_REFUSALS, ids=lambda c: c.name)
def test_train_refusals_are_one_line_and_touch_nothing(case, store, tmp_path, capsys):
    work = tmp_path / "work"
    work.mkdir()
    argv = case.setup(work, store)
    capsys.readouterr()
    before, out_before = snapshot(tmp_path), snapshot(work / "out") if (work / "out").is_dir() else None
    store_before = snapshot(store)
    one_line_error(capsys, main(argv), *case.needles)
    assert snapshot(tmp_path) == before  # the output folder included: a refused run writes nothing, anywhere
    assert snapshot(store) == store_before
    assert (snapshot(work / "out") if (work / "out").is_dir() else None) == out_before


def test_claim_run_refuses_a_held_folder_and_removes_a_folder_it_created(tmp_path):
    from types import SimpleNamespace

    from eclipse_prior.outputs import OutputBusyError, claim_dir
    from eclipse_prior.training.resume import claim_run

    one_process = SimpleNamespace(is_main_process=True, num_processes=1, device=torch.device("cpu"))
    with claim_dir(tmp_path / "held", "holder"):
        with pytest.raises(OutputBusyError, match=f"pid {os.getpid()}"):
            with claim_run(tmp_path / "held", one_process, "second"):
                pass
    with pytest.raises(RuntimeError, match="failed"):
        with claim_run(tmp_path / "new", one_process, "train"):
            raise RuntimeError("failed before writing anything")
    assert not (tmp_path / "new").exists()
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with claim_run(tmp_path / "kept", one_process, "train"):
            raise RuntimeError("failed")
    assert (tmp_path / "kept").is_dir()  # a folder that existed before is never removed


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])


DAMAGE = {  # what is done to checkpoints/ of a finished 6-step run -> the step resume must restart from
    "truncated-model": (lambda c: _truncate(c / "step-00000006" / "model.safetensors"), 4),
    "empty-ema": (lambda c: (c / "step-00000006" / "ema.safetensors").write_bytes(b""), 4),
    "garbled-state": (lambda c: (c / "step-00000006" / "state.json").write_text('{"step": 6, "ema'), 4),
    "state-not-object": (lambda c: (c / "step-00000006" / "state.json").write_text("[6]"), 4),
    "missing-state": (lambda c: (c / "step-00000006" / "state.json").unlink(), 4),
    "two-damaged": (lambda c: [_truncate(c / f"step-0000000{s}" / "optimizer.safetensors") for s in (4, 6)], 2),
    "checkpoints-a-file": (lambda c: (shutil.rmtree(c), c.write_text("x")), None),
    "stray-files-and-dirs": (lambda c: [(c / "notes.txt").write_text("x"), (c / "step-latest").mkdir(),
                                        (c / "step-00000099").write_text("not a folder"),
                                        (c / ".tmp-step-00000008-1").mkdir(), (c / "step-7").mkdir()], 6),
}


@pytest.mark.parametrize("damage", list(DAMAGE), ids=str)
def test_resume_falls_back_past_damaged_checkpoints(damage, finished_run, tmp_path, capsys):
    """Resumed from the newest readable checkpoint, the run ends with the weights of the uninterrupted run."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    spoil, restart = DAMAGE[damage]
    spoil(run / "checkpoints")
    capsys.readouterr()
    if restart is None:  # nothing to resume from: one line, nothing changed
        before = snapshot(tmp_path)
        one_line_error(capsys, main(["train", "--out", str(run), "--resume"]), "checkpoints", "not a folder")
        assert snapshot(tmp_path) == before
        return
    assert main(["train", "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"from step-{restart:08d} (step {restart})" in err, err
    if restart < 6:
        assert "damaged" in err and "falling back" in err and "Traceback" not in err
    final = load_file(run / "checkpoints" / "step-00000006" / "model.safetensors")
    expected = load_file(finished_run / "checkpoints" / "step-00000006" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=0, atol=1e-6)
    assert [r["step"] for r in _metrics(run) if "loss" in r] == list(range(1, 7))


def test_resume_with_no_readable_checkpoint_is_one_line(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    for ckpt in list_checkpoints(run / "checkpoints"):
        (ckpt / "rng.safetensors").write_bytes(b"\0" * 7)
    before = snapshot(tmp_path)
    capsys.readouterr()
    rc = main(["train", "--out", str(run), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("eclipse-prior train: error: none of the 3 checkpoint(s)"), err
    assert all(line.startswith("note: checkpoint") for line in err[:-1])  # one note per skipped checkpoint
    assert snapshot(tmp_path) == before


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_partial_last_metrics_line_is_dropped_with_a_note(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "checkpoints" / "step-00000006")  # killed after step 6's log line was half-written
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 0.')
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume"]) == 0
    err = capsys.readouterr().err
    assert "dropped 1 unreadable line" in err and "Traceback" not in err
    assert [r["step"] for r in _metrics(run)] == list(range(1, 7))  # every line parses again


def test_resume_refuses_a_store_changed_in_place_unless_allowed(tmp_path, capsys):
    store = make_store(tmp_path / "store", n=48)
    run = tmp_path / "run"
    assert main(["train", "--data", str(store), "--out", str(run), *TRAIN, "--steps", "2"]) == 0
    fingerprint = json.loads((run / "run.json").read_text())["data_fingerprint"]
    assert fingerprint["rows"] == 48 and len(fingerprint["manifest_sha256"]) == 64
    for rows, seed, needles in ((48, 1, ("manifest.json differs",)), (56, 0, ("rows 48 -> 56",))):
        shutil.rmtree(store)
        make_store(store, n=rows, seed=seed)  # re-embedded in place: same path, other rows
        capsys.readouterr()
        before = snapshot(tmp_path)
        rc = main(["train", "--out", str(run), "--resume", "--steps", "3"])
        one_line_error(capsys, rc, "changed since the run started", "--allow-changed-data", *needles)
        assert snapshot(tmp_path) == before
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--allow-changed-data"]) == 0
    assert "continuing on it (--allow-changed-data)" in capsys.readouterr().err
    info = json.loads((run / "run.json").read_text())
    assert info["data_fingerprint"]["rows"] == 56 and info["status"] == "finished"
    assert "allow-changed-data" not in info["resolved_command"]  # a one-off override, not a setting of the run


def test_second_train_on_a_held_folder_is_refused_naming_the_holder(store, tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-m", "eclipse_prior", *_flags(store, run)[:-2], "--steps", "100000",
         "--checkpoint-every", "100000"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() and holder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert holder.poll() is None, holder.stderr.read().decode()[-2000:]
        config_before = (run / "config.yaml").read_bytes()
        capsys.readouterr()
        for extra in ([], ["--resume"]):  # a new run and a resume are both refused while it runs
            rc = main([*_flags(store, run), *extra])
            one_line_error(capsys, rc, f"pid {holder.pid}", "in use")
        assert (run / "config.yaml").read_bytes() == config_before
    finally:
        holder.kill()
        holder.wait()
    assert main([*_flags(store, run), "--resume"]) == 0  # the kernel released the lock of the killed holder


def test_kill_9_then_damaged_newest_checkpoint_resumes_to_the_uninterrupted_weights(store, tmp_path):
    """kill -9 after checkpoint 20, the newest checkpoint then found truncated: resume from 10 ends exactly where a
    run that was never interrupted ends."""
    killed = tmp_path / "killed"
    args = ["--steps", "30", "--checkpoint-every", "10", "--keep-checkpoints", "3"]
    kill_train_after_checkpoint([*_flags(store, killed)[1:-2], *args], killed / "checkpoints" / "step-00000020")
    newest = list_checkpoints(killed / "checkpoints")[-1]
    assert newest.name == "step-00000020"  # killed within milliseconds of its checkpoint, 10 steps before the end
    _truncate(newest / "model.safetensors")

    kw = dict(steps=30, checkpoint_every=10, keep_checkpoints=3, progress=False)
    train(tiny_cfg(store, killed, resume=True, **kw))
    straight = train(tiny_cfg(store, tmp_path / "straight", **kw))
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = load_file(killed / "checkpoints" / "step-00000030" / name)
        b = load_file(straight / "checkpoints" / "step-00000030" / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=f"{name}:{k}")
    assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]


def test_full_disk_during_train_is_one_line_and_resumable(store, tmp_path):
    """A file-size limit makes the first checkpoint write fail (EFBIG, as ENOSPC would): one line, exit 2, no
    half-written checkpoint; the same command with --resume then finishes the run."""
    run = tmp_path / "run"

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (48_000, 48_000))  # config, logs fit; weights do not

    done = subprocess.run([sys.executable, "-m", "eclipse_prior", *_flags(store, run)], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=limit, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines[-1].startswith("eclipse-prior train: error:"), done.stderr
    assert "Traceback" not in done.stderr and "file too large" in lines[-1]
    assert not list((run / "checkpoints").iterdir()) if (run / "checkpoints").is_dir() else True
    assert not [p for p in run.rglob(".*tmp*")]
    assert main([*_flags(store, run), "--resume"]) == 0
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step-00000002"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_is_one_line(store, tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        one_line_error(capsys, main(_flags(store, parent / "run")), "permission denied")
    finally:
        parent.chmod(0o755)


# --------------------------------------------------------------------------------------------------- export


def _export_argv(run: Path, out: Path, *extra: str) -> list[str]:
    return ["export", str(run), "--out", str(out), *extra]


def test_export_into_a_cloned_repository_keeps_every_foreign_file(finished_run, tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / ".git" / "objects").mkdir(parents=True)
    (repo / ".git" / "config").write_text("[core]\n")
    (repo / "LICENSE").write_text("MIT")
    (repo / "samples").mkdir()
    (repo / "samples" / "cat.png").write_bytes(b"\x89PNG fake")
    foreign = snapshot(repo)
    assert main(_export_argv(finished_run, repo)) == 0
    after = snapshot(repo)
    assert {k: v for k, v in after.items() if k in foreign} == foreign  # not one byte of theirs changed
    assert {"config.json", "diffusion_pytorch_model.safetensors", "README.md"} <= set(after)
    assert not [k for k in after if "tmp" in k]
    assert not (repo / LOCK_NAME).exists()  # the folder is the user's: the export's lock file goes with it
    assert load_prior(repo).config.embedding_dim == 32
    # exporting again replaces our own files without --overwrite
    assert main(_export_argv(finished_run, repo, "--no-ema")) == 0
    raw = load_file(finished_run / "checkpoints" / "step-00000006" / "model.safetensors")
    assert all(torch.equal(v, raw[k]) for k, v in load_prior(repo).state_dict().items())
    assert {k: v for k, v in snapshot(repo).items() if k in foreign} == foreign


EXPORT_REFUSALS = [
    ("foreign-config", lambda out: (out.mkdir(), (out / "config.json").write_text('{"theirs": 1}')),
     ("config.json", "--overwrite")),
    ("foreign-weights", lambda out: (out.mkdir(), (out / "diffusion_pytorch_model.safetensors").write_bytes(b"w")),
     ("diffusion_pytorch_model.safetensors", "--overwrite")),
    ("foreign-readme-folder", lambda out: (out / "README.md").mkdir(parents=True), ("README.md",)),
    ("out-is-a-file", lambda out: out.write_text("notes"), ("not a folder",)),
]


@pytest.mark.parametrize("name,setup,needles", EXPORT_REFUSALS, ids=[c[0] for c in EXPORT_REFUSALS])
def test_export_refusals_touch_nothing(name, setup, needles, finished_run, tmp_path, capsys):
    out = tmp_path / "out"
    setup(out)
    before = snapshot(tmp_path)
    one_line_error(capsys, main(_export_argv(finished_run, out)), *needles)
    assert snapshot(tmp_path) == before


def test_export_overwrite_replaces_only_the_named_files(finished_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "LICENSE").write_text("MIT")
    assert main(_export_argv(finished_run, out, "--overwrite")) == 0
    assert json.loads((out / "config.json").read_text())["_class_name"] == "PriorTransformer"
    assert (out / "LICENSE").read_text() == "MIT"


def test_export_of_damaged_runs_is_one_line(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "prior" / "config.json").write_text('{"_class_name": "EclipsePrior", "num_layers": ')
    one_line_error(capsys, main(_export_argv(run, tmp_path / "a")), "config.json", "not valid JSON")
    assert not (tmp_path / "a").exists()
    shutil.copytree(finished_run / "prior", run / "prior", dirs_exist_ok=True)
    for ckpt in list_checkpoints(run / "checkpoints"):
        (ckpt / "model.safetensors").write_bytes(b"")
    one_line_error(capsys, main(_export_argv(run, tmp_path / "b", "--no-ema")), "no readable checkpoint")
    # --no-ema with only the newest checkpoint damaged takes the previous one's raw weights
    shutil.rmtree(run / "checkpoints")
    shutil.copytree(finished_run / "checkpoints", run / "checkpoints")
    _truncate(run / "checkpoints" / "step-00000006" / "model.safetensors")
    assert main(_export_argv(run, tmp_path / "c", "--no-ema")) == 0
    raw4 = load_file(run / "checkpoints" / "step-00000004" / "model.safetensors")
    assert all(torch.equal(v, raw4[k]) for k, v in load_prior(tmp_path / "c").state_dict().items())


def test_pooled_only_export_says_what_it_is_and_loads(store, tmp_path):
    run = train(tiny_cfg(store, tmp_path / "run", steps=2, pooled_only=True, progress=False))
    out = tmp_path / "export"
    assert main(_export_argv(run, out)) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "EclipsePrior" and config["num_embeddings"] == 0  # not the released class
    card = (out / "README.md").read_text()
    assert "pooled-only" in card and "load_prior" in card and "authors' pipeline" in card
    exported, trained = load_prior(out), load_prior(run)
    text = torch.randn(3, 32, generator=torch.Generator().manual_seed(0))
    a = exported.generate_embeds(text, generator=torch.Generator().manual_seed(1))
    b = trained.generate_embeds(text, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- evaluate


def _damaged_copy(src: Path, dst: Path, spoil: Callable[[Path], object]) -> Path:
    shutil.copytree(src, dst)
    spoil(dst)
    return dst


def _prior_config(folder: Path, **fields) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))


PRIOR_DAMAGE = [
    ("config-not-json", lambda p: (p / "config.json").write_text("{ nope"), ("config.json", "not valid JSON")),
    ("config-binary", lambda p: (p / "config.json").write_bytes(b"\xff\xfe\x00\x01"), ("UTF-8",)),
    ("config-a-list", lambda p: (p / "config.json").write_text("[]"), ("JSON object",)),
    ("config-wrong-type", lambda p: _prior_config(p, embedding_dim="wide"), ("embedding_dim", "integer")),
    ("config-negative", lambda p: _prior_config(p, num_layers=-2), ("num_layers", ">= 0")),
    ("config-missing-keys", lambda p: (p / "config.json").write_text('{"_class_name": "EclipsePrior"}'), ("prior",)),
    ("weights-pickle", lambda p: (p / "diffusion_pytorch_model.safetensors").write_bytes(b"\x80\x04\x95 pickle"),
     ("safetensors",)),
    ("weights-truncated", lambda p: _truncate(p / "diffusion_pytorch_model.safetensors"), ("safetensors",)),
]
STORE_DAMAGE = [
    ("manifest-not-json", lambda s: (s / "manifest.json").write_text("{"), ("manifest.json",)),
    ("manifest-no-shards", lambda s: _edit_manifest(s, shards=None), ("shards",)),
    ("manifest-wrong-type", lambda s: _edit_manifest(s, image_dim="32"), ("image_dim",)),
    ("shard-truncated", lambda s: _truncate(s / "shard-00000" / "text_embeds.npy"), ("text_embeds.npy",)),
]


def _edit_manifest(store: Path, **fields) -> None:
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, **fields}))


@pytest.mark.parametrize("name,spoil,needles", PRIOR_DAMAGE + STORE_DAMAGE,
                         ids=[c[0] for c in PRIOR_DAMAGE + STORE_DAMAGE])
def test_evaluate_damaged_inputs_are_one_line(name, spoil, needles, finished_run, store, tmp_path, capsys):
    prior, data = finished_run / "prior", store
    if name in {case[0] for case in PRIOR_DAMAGE}:
        prior = _damaged_copy(finished_run / "prior", tmp_path / "prior", spoil)
    else:
        data = _damaged_copy(store, tmp_path / "store", spoil)
    before = snapshot(tmp_path)
    one_line_error(capsys, main(["evaluate", str(prior), "--data", str(data), "--json", str(tmp_path / "m.json")]),
                   *needles)
    assert snapshot(tmp_path) == before


def test_evaluate_bad_values_are_one_line(finished_run, store, tmp_path, capsys):
    base = ["evaluate", str(finished_run), "--data", str(store)]
    one_line_error(capsys, main([*base, "--guidance", "nan"]), "--guidance")
    one_line_error(capsys, main([*base, "--seed", "-1"]), "--seed")
    one_line_error(capsys, main([*base, "--json", str(tmp_path)]), "is a folder")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def decoder(tmp_path_factory) -> Path:
    from eclipse_prior.pipelines.tiny import save_tiny_kandinsky_decoder

    return save_tiny_kandinsky_decoder(tmp_path_factory.mktemp("hostile_decoder") / "kandinsky")


SHAPES = Path(__file__).resolve().parents[1] / "src" / "eclipse_prior" / "shapes" / "weights"


def _generate(prior: Path, decoder: Path, clip: Path, out: Path, *extra: str) -> list[str]:
    return ["generate", "--prior", str(prior), "--decoder", str(decoder), "--clip", str(clip), "--steps", "1",
            "--device", "cpu", "--offline", "--out", str(out), *extra]


def test_generate_sizes_beyond_the_decoder_are_one_line_with_a_memory_estimate(decoder, tiny_clip_dir, tmp_path,
                                                                                capsys):
    prior = tmp_path / "prior"
    EclipsePrior.from_preset("tiny", embedding_dim=32, num_embeddings=77).save_pretrained(prior)
    big = ["--height", "4096", "--width", "4096", "--prompt", "a red square"]
    before = snapshot(tmp_path)
    # the tiny decoder records no sample_size: refused because the estimate exceeds the free memory
    one_line_error(capsys, main(_generate(prior, decoder, tiny_clip_dir, tmp_path / "a", *big)), "GiB", "free")
    # the shipped shapes decoder (64 px): refused by its own size, with the estimate
    one_line_error(capsys, main(_generate(SHAPES / "prior", SHAPES / "decoder", SHAPES / "clip", tmp_path / "b", *big)),
                   "beyond what this decoder supports", "128", "GiB")
    assert snapshot(tmp_path) == before


def test_generate_reports_the_text_a_long_prompt_loses(tmp_path, capsys):
    words = " ".join(f"{c} square" for c in ["red", "blue", "green", "yellow"] * 5)
    argv = _generate(SHAPES / "prior", SHAPES / "decoder", SHAPES / "clip", tmp_path / "out", "--height", "64",
                     "--width", "64", "--prompt", words)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "this part was cut: 'yellow square red square" in err, err  # the shapes tokenizer keeps 24 tokens


def test_generate_hand_edited_sidecar_and_damaged_prior_are_one_line(decoder, tiny_clip_dir, tmp_path, capsys):
    prior = tmp_path / "prior"
    EclipsePrior.from_preset("tiny", embedding_dim=32, num_embeddings=77).save_pretrained(prior)
    out = tmp_path / "out"
    assert main(_generate(prior, decoder, tiny_clip_dir, out, "--height", "32", "--width", "32", "--prompt", "a")) == 0
    sidecar = json.loads((out / "00000-a-s0.json").read_text())
    edits = {
        "seed": ({"seed": "7"}, "seed"),
        "seed-range": ({"seed": 2**70}, "seed"),
        "steps": ({"steps": "many"}, "steps"),
        "guidance-nan": ({"guidance": float("nan")}, "guidance"),
        "height": ({"height": [64]}, "height"),
        "dtype": ({"dtype": 16}, "dtype"),
        "models": ({"models": {"prior": "x"}}, "models.prior"),
        "prompt": ({"prompt": None}, "prompt"),
    }
    capsys.readouterr()
    for name, (change, field) in edits.items():
        edited = tmp_path / f"{name}.json"
        edited.write_text(json.dumps({**sidecar, **change}))
        one_line_error(capsys, main(["generate", "--from-sidecar", str(edited)]), str(edited), field)
        assert not edited.with_name(f"{name}-regen.png").exists()
    (tmp_path / "prompts.txt").write_bytes("a caf\xe9 on the left\n".encode("latin-1"))
    for extra, needle in ((["--prompts-file", str(tmp_path / "prompts.txt")], "UTF-8"),
                          (["--prompt", "a", "--seed", "-3"], "--seed"),
                          (["--prompt", "a", "--num-images", str(10**9)], "GiB"),
                          (["--prompt", "a", "--out", str(tmp_path / "prompts.txt")], "is a file")):
        argv = [*_generate(prior, decoder, tiny_clip_dir, tmp_path / "x"), *extra]
        one_line_error(capsys, main(argv), needle)
    (prior / "config.json").write_text('{"_class_name": 3}')
    one_line_error(capsys, main(_generate(prior, decoder, tiny_clip_dir, tmp_path / "x", "--prompt", "a")), "prior")
    assert not (tmp_path / "x").exists()


def test_non_interactive_training_prints_plain_progress_lines(store, tmp_path, capsys):
    """Off a terminal (stderr captured here) the trainer's bar is whole lines, no carriage-return frames;
    progress=False (what the shapes benchmark passes) prints none."""
    train(tiny_cfg(store, tmp_path / "a", steps=3))
    err = capsys.readouterr().err
    assert "\r" not in err and [line for line in err.splitlines() if line.startswith("train:")], err
    train(tiny_cfg(store, tmp_path / "b", steps=3, progress=False))
    assert "train:" not in capsys.readouterr().err
    assert np.isfinite([r["loss"] for r in _metrics(tmp_path / "b")]).all()
