"""Training from a real store vs from batches already on the device (does the loader keep the accelerator busy?).

A synthetic store shaped like the paper's (width 1280, 77 per-token text states, fp16) is written through the
public store API (`write_store`, read back by `EmbeddingStore`), and `eclipse-prior train`'s `train()` runs on it
(released preset, bf16, the default loader, no validation); its samples/s is read from `metrics.jsonl` (the
trainer's own log, which excludes checkpoints and validation), leaving out the first log window (start-up).
Baseline: the trainer's step (`device_train`'s "bf16 trainer" recipe: same optimizer, attention choice, CPU noise,
clipping, EMA) on one batch that already sits on the device. Ratio = store-fed rate / device-resident rate.
The store (4096 rows in the store's own layout, size reported) stays in the page cache, as a store on a local
disk would after the first epoch.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from device_common import interleaved_medians, median


def write_synthetic_store(path: Path, rows: int, width: int, tokens: int, seed: int = 0) -> Any:
    """A finished fp16 store of `rows` random rows with text states, through `write_store`."""
    from eclipse_prior.data.store import write_store

    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, tokens + 1, rows)
    arrays = {
        "image_embeds": rng.standard_normal((rows, width), dtype=np.float32).astype(np.float16),
        "text_embeds": rng.standard_normal((rows, width), dtype=np.float32).astype(np.float16),
        "text_states": rng.standard_normal((rows, tokens, width), dtype=np.float32).astype(np.float16),
        "text_mask": np.arange(tokens)[None, :] < lengths[:, None],
    }
    meta = [{"id": f"row-{i}", "caption": f"caption {i}", "source": "synthetic"} for i in range(rows)]
    return write_store(
        path, arrays, meta, shard_size=max(1, rows // 4), clip_id="synthetic", clip_revision="none",
        normalized=False, dtype="fp16", val_fraction=0.0,
    )


def run(device: torch.device, smoke: bool = False) -> dict[str, Any]:
    """Store-fed `train()` samples/s vs the same step on device-resident batches."""
    from device_train import MAIN_RECIPES, make_device_step
    from eclipse_prior.models import EclipsePrior
    from eclipse_prior.training import TrainConfig, train
    from train_throughput import synthetic_batch

    preset, width, tokens = ("tiny", 32, 77) if smoke else ("kandinsky22", 1280, 77)
    rows, batch, log_every, windows = (256, 16, 2, 3) if smoke else (4096, 1024, 10, 4)
    tmp = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        write_synthetic_store(tmp / "store", rows, width, tokens)
        store_bytes = sum(f.stat().st_size for f in (tmp / "store").rglob("*") if f.is_file())
        cfg = TrainConfig(
            data=str(tmp / "store"), out=str(tmp / "run"), preset=preset, steps=log_every * windows,
            batch_size=batch, mixed_precision="bf16", log_every=log_every, val_every=0,
            checkpoint_every=10**9, report_to="none", warmup_steps=0,
        )
        train(cfg)
        logged = [json.loads(line) for line in (tmp / "run" / "metrics.jsonl").read_text().splitlines()]
        store_rates = [r["samples_per_s"] for r in logged if "samples_per_s" in r][1:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(cfg.seed)
    base = EclipsePrior.from_preset(preset, width, tokens)
    trainer_recipe = next(r for r in MAIN_RECIPES if r.name == "bf16 trainer")
    step = make_device_step(base, trainer_recipe, synthetic_batch(base.config, batch, seed=1), device)

    def steps() -> None:
        for _ in range(log_every):
            step()

    secs = interleaved_medians({"resident": steps}, device, repeats=windows - 1)["resident"]
    resident = batch * log_every / median(secs)
    store_rate = median(store_rates)
    return {
        "preset": preset,
        "rows": rows,
        "batch": batch,
        "store_bytes_per_row": store_bytes / rows,
        "train_samples_per_s": store_rates,
        "store_fed_samples_per_s": store_rate,
        "device_resident_samples_per_s": resident,
        "store_over_resident": store_rate / resident,
    }


def format_row(r: dict[str, Any]) -> list[str]:
    """Markdown lines for the store-vs-resident table."""
    return [
        "| network | batch | store rows | device-resident batches (samples/s, baseline) | `train` from the store "
        "(samples/s) | store / resident |",
        "|---|---|---|---|---|---|",
        f"| {r['preset']} | {r['batch']} | {r['rows']} x {r['store_bytes_per_row'] / 1e3:.0f} KB "
        f"| {r['device_resident_samples_per_s']:.0f} | {r['store_fed_samples_per_s']:.0f} "
        f"| {r['store_over_resident']:.0%} |",
    ]
