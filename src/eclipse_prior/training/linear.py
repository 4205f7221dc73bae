"""Closed-form ridge regression from pooled text to image embeddings on a store (`--objective ridge`, and the
starting map of `--objective residual`).

Sums of x, y, x^T x and x^T y are accumulated in float64 over chunks of the memory-mapped store, so any store
size fits in memory; the intercept is not penalised.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eclipse_prior.errors import StoreError
from eclipse_prior.training.config import TrainConfig

_CHUNK = 65_536


def fit_ridge(store: Any, rows: np.ndarray, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W (in, out) and b minimising sum ||x W + b - y||^2 + alpha * (tr(C) / in) * ||W||^2 over `rows`.

    C is the centred second-moment matrix of the text embeddings, so `alpha` is relative to its mean
    eigenvalue and means the same for any CLIP's embedding norm.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:
        raise StoreError("ridge fit: no training rows")
    sx = sy = sxx = sxy = None
    for start in range(0, len(rows), _CHUNK):
        batch = store.get_batch(rows[start : start + _CHUNK])
        x = np.asarray(batch["text_embeds"], dtype=np.float64)
        y = np.asarray(batch["image_embeds"], dtype=np.float64)
        if sx is None:
            sx, sy, sxx, sxy = x.sum(0), y.sum(0), x.T @ x, x.T @ y
        else:
            sx, sy, sxx, sxy = sx + x.sum(0), sy + y.sum(0), sxx + x.T @ x, sxy + x.T @ y
    n = len(rows)
    mx, my = sx / n, sy / n
    cxx = sxx - n * np.outer(mx, mx)
    cxy = sxy - n * np.outer(mx, my)
    penalty = alpha * max(np.trace(cxx) / cxx.shape[0], 1e-12)
    weight = np.linalg.solve(cxx + penalty * np.eye(cxx.shape[0]), cxy)
    bias = my - mx @ weight
    return torch.from_numpy(weight).float(), torch.from_numpy(bias).float()


def train_ridge(cfg: TrainConfig, command: str | None = None) -> Path:
    """`train` for the ridge objective: fit, then write the same run folder layout as a trained prior."""
    from eclipse_prior.config import save_config
    from eclipse_prior.evaluation.embedding_metrics import evaluate_prior
    from eclipse_prior.losses import projection_loss
    from eclipse_prior.models import LinearPrior
    from eclipse_prior.outputs import claim_dir, write_json_atomic
    from eclipse_prior.training.resume import check_run_dir, refuse_if_held, truncate_metrics
    from eclipse_prior.training.trainer import (
        _append_jsonl,
        _open_store,
        _store_summary,
        _val_rows,
        resolved_command,
        save_prior_atomic,
    )

    run_dir = Path(cfg.out)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun: one closed-form fit, by rank 0
        return run_dir
    refuse_if_held(run_dir)
    check_run_dir(cfg, run_dir)
    with claim_dir(run_dir, command or resolved_command(cfg)):  # the same exclusion as a trained run
        store = _open_store(cfg)
        train_rows = store.split_indices("train")
        if len(train_rows) == 0:
            raise StoreError(f"store {cfg.data} has no rows in its train split")
        t0 = time.perf_counter()
        weight, bias = fit_ridge(store, train_rows, cfg.ridge_alpha)
        prior = LinearPrior(embedding_dim=store.image_dim)
        prior.set_map(weight, bias)
        prior.eval()
        seconds = time.perf_counter() - t0
        sample = store.get_batch(train_rows[: min(len(train_rows), 4096)])
        with torch.no_grad():
            pred = prior(torch.from_numpy(np.asarray(sample["text_embeds"], dtype=np.float32)))
            fit = projection_loss(pred, torch.from_numpy(np.asarray(sample["image_embeds"], dtype=np.float32))).item()
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        save_prior_atomic(prior, run_dir / "prior")
        metrics_path = run_dir / "metrics.jsonl"
        truncate_metrics(metrics_path, -1)
        _append_jsonl(metrics_path, {"step": 0, "loss": fit, "projection": fit, "fit_seconds": seconds})
        if cfg.val_every and _val_rows(store, cfg) >= 2:
            metrics = evaluate_prior(prior, store, split="val", seed=cfg.seed, max_samples=cfg.val_max_samples,
                                     verify_store=False)
            _append_jsonl(metrics_path, {"step": 0, "split": "val", **metrics})
        info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        invoked = command or resolved_command(cfg)
        info.setdefault("command", invoked)
        info.setdefault("invocations", []).append({"command": invoked, "start_step": 0})
        info.update(resolved_command=resolved_command(cfg), store=_store_summary(store, cfg.data),
                    prior_class="LinearPrior", prior_config=dict(prior.config),
                    parameters=sum(p.numel() for p in prior.parameters()), world_size=1, global_batch=len(train_rows),
                    status="finished")
        write_json_atomic(run_dir / "run.json", info)
        print(f"ridge map fitted on {len(train_rows)} rows in {seconds:.2f}s (train projection loss {fit:.4g})",
              file=sys.stderr)
    return run_dir
