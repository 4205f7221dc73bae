"""The accelerator benchmark suite runs end to end (`--device cpu --smoke`), and `train --compile` reaches accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_device_suite_smoke_runs_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "benchmarks/run.py", "--device", "cpu", "--smoke", "--threads", "1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "smoke-cpu.json").read_text())
    results = doc["results"]
    assert list(doc["meta"]["section_seconds"]) == ["train", "latency", "e2e", "embed", "store"]
    assert not [k for k, v in results.items() if "error" in v or "skipped" in v]

    train = results["train"]
    rows = {r["recipe"]: r for r in train["rows"] if "samples_per_s" in r}
    base = rows["bf16 plain loop (baseline)"]
    assert base["vs_baseline"] == pytest.approx(1.0)
    for r in rows.values():  # samples/s and MFU follow from the step time and the matmul rate of the same run
        assert r["samples_per_s"] == pytest.approx(r["batch"] / r["step_s"])
        assert r["mfu"] == pytest.approx(r["train_gflop_per_sample"] * 1e9 * r["samples_per_s"]
                                         / train["matmul"]["flops_per_s"])
    assert "bf16 trainer + compile" in rows
    paper = train["paper_recipe"]
    assert paper["flops"] == pytest.approx(9.7e17, rel=0.01)  # 60k steps x 1024 x 15.8 GFLOP

    latency = results["latency"]
    assert len(latency) == 3 * 2 * 2  # priors x batches x dtypes
    eclipse = [r for r in latency if r["prior"].startswith("ECLIPSE")]
    assert all(r["vs_eclipse"] == pytest.approx(1.0) for r in eclipse)

    e2e = results["e2e"]
    measured = [r for r in e2e if "latency_s" in r]
    assert [r["pipeline"] for r in measured] == ["ECLIPSE + decoder", "Kandinsky 2.2 1B prior + decoder"]
    assert [r["offload"] for r in e2e if "skipped" in r] == ["model", "model"]  # offload needs CUDA

    embed = results["embed"]
    assert embed["stored_rows"] == embed["rows"] == 32
    assert embed["embed_over_forward"] == pytest.approx(embed["embed_rows_per_s"] / embed["forward_only_rows_per_s"])

    store = results["store"]
    assert store["store_over_resident"] == pytest.approx(
        store["store_fed_samples_per_s"] / store["device_resident_samples_per_s"]
    )
    md = (tmp_path / "smoke-cpu.md").read_text()
    assert "## 5. `train` from a store" in md and "FAILED" not in md


def test_train_compile_flag_selects_accelerate_dynamo_backend(tmp_path: Path) -> None:
    from eclipse_prior.training.config import TrainConfig
    from eclipse_prior.training.trainer import _make_accelerator, _release

    for flag, backend in ((True, "INDUCTOR"), (False, "NO")):
        cfg = TrainConfig(data="x", out=str(tmp_path), compile=flag, report_to="none")
        accelerator = _make_accelerator(cfg, tmp_path)
        try:
            assert accelerator.state.dynamo_plugin.backend.name == backend
        finally:
            _release(accelerator)
