"""Training throughput of the released network on an accelerator: plain PyTorch loop vs the trainer, eager vs compile.

Recipes (each its own copy of the same randomly initialised network, timed round-robin in one run):

- `fp32 plain loop`: forward, eclipse loss, backward, `torch.optim.AdamW()` (torch's default implementation for
  the device), noise drawn on the device, no autocast: what anyone writes first.
- `bf16 plain loop` (the baseline of the ratios): the same under `torch.autocast(device, bfloat16)`.
- `bf16 trainer`: what one step of `eclipse-prior train --mixed-precision bf16` does, built from the trainer's own
  pieces: its optimizer (`_make_optimizer`: fused AdamW), its attention-backend choice (`_attention_backend`), its
  per-sample noise drawn on the CPU and copied over (`draw_randomness`), its loss (`objective_loss`) and
  divergence check (a device sync per step), gradient clipping at 1.0 and the EMA update; data loading is left
  out (the `store` section measures it).
- `bf16 trainer + compile`: the same with the step module wrapped in `torch.compile` (what `--compile` does
  through accelerate), at the paper's batch 1024 only; its first call (compilation) is reported separately.
- diagnostics at the largest batch: the trainer recipe without EMA, with its noise drawn on the device instead
  of the CPU (~7 ms of CPU per step at batch 1024 on the 2-core CPU), and with each SDPA backend forced (math,
  memory-efficient, cuDNN, flash: flash takes no additive mask and is expected to be refused), to decide the
  trainer's attention backend on GPUs from figures rather than guesses.

MFU = analytic training FLOPs (`train_throughput.train_flops_per_sample`) x samples/s / the dense bf16 matmul rate
measured in the same run. The paper's recipe (60k steps x batch 1024) is converted into hours at the measured rate.
"""

from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from device_common import interleaved_medians, matmul_rate, median, sync
from train_throughput import synthetic_batch, train_flops_per_sample

PAPER_STEPS, PAPER_BATCH, PAPER_GPU_HOURS = 60_000, 1024, 50


@dataclass(frozen=True)
class DeviceRecipe:
    """One way of running a training step on a device."""

    name: str
    bf16: bool = True
    trainer: bool = False  # the trainer's optimizer, attention choice, CPU noise, clipping, EMA
    compile: bool = False
    ema: bool = True
    cpu_noise: bool = True  # the trainer draws noise on the CPU (device-independent); False: on the device
    backend: SDPBackend | None = None  # force one SDPA backend (diagnostics)


MAIN_RECIPES = (
    DeviceRecipe("fp32 plain loop", bf16=False),
    DeviceRecipe("bf16 plain loop (baseline)"),
    DeviceRecipe("bf16 trainer", trainer=True),
    DeviceRecipe("bf16 trainer + compile", trainer=True, compile=True),
)
DIAGNOSTIC_RECIPES = (
    DeviceRecipe("bf16 trainer, no EMA", trainer=True, ema=False),
    DeviceRecipe("bf16 trainer, noise drawn on the device", trainer=True, cpu_noise=False),
    DeviceRecipe("bf16 trainer, SDPA math", trainer=True, backend=SDPBackend.MATH),
    DeviceRecipe("bf16 trainer, SDPA efficient", trainer=True, backend=SDPBackend.EFFICIENT_ATTENTION),
    DeviceRecipe("bf16 trainer, SDPA cuDNN", trainer=True, backend=SDPBackend.CUDNN_ATTENTION),
    DeviceRecipe("bf16 trainer, SDPA flash", trainer=True, backend=SDPBackend.FLASH_ATTENTION),
)


def make_device_step(
    base: torch.nn.Module,
    recipe: DeviceRecipe,
    data: dict[str, torch.Tensor],
    device: torch.device,
    compile_backend: str = "inductor",
) -> Callable[[], torch.Tensor]:
    """A closure running one optimizer step of `recipe` on its own copy of `base` (on `device`)."""
    from eclipse_prior.losses import eclipse_loss
    from eclipse_prior.training.checkpoint import EMA
    from eclipse_prior.training.config import TrainConfig
    from eclipse_prior.training.trainer import (
        _attention_backend,
        _make_optimizer,
        _PredictionStep,
        draw_randomness,
        objective_loss,
    )

    prior = copy.deepcopy(base).to(device).train()
    cfg = TrainConfig(data="-", out="-", mixed_precision="bf16" if recipe.bf16 else "no", compile=recipe.compile)
    module: torch.nn.Module = _PredictionStep(prior)
    if recipe.compile:
        module = torch.compile(module, backend=compile_backend)
    optimizer = _make_optimizer(prior, cfg) if recipe.trainer else torch.optim.AdamW(prior.parameters(), lr=1e-4)
    ema = EMA(prior, 0.9999) if recipe.trainer and recipe.ema else None
    batch = {k: v.to(device) for k, v in data.items()}
    n = batch["text_embeds"].shape[0]
    batch["caption_ids"] = torch.arange(n, device=device)
    micro = [0]

    def attention() -> contextlib.AbstractContextManager[Any]:
        if recipe.backend is not None:
            return sdpa_kernel(recipe.backend)
        return _attention_backend(device, cfg.mixed_precision) if recipe.trainer else contextlib.nullcontext()

    def step() -> torch.Tensor:
        if recipe.trainer and recipe.cpu_noise:
            noise = draw_randomness(prior, "eclipse", 0, micro[0], n, slice(0, n))["noise"].to(device)
        else:
            noise = torch.randn(batch["text_embeds"].shape, device=device)
        micro[0] += 1
        with attention(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=recipe.bf16):
            pred = module(
                batch["image_embeds"], batch["text_embeds"], batch.get("text_states"), batch.get("text_mask"),
                noise=noise,
            )
        if recipe.trainer:
            loss, _ = objective_loss("eclipse", pred.float(), batch, cfg.lam, cfg.tau)
            if not torch.isfinite(loss):  # the trainer's divergence check (a device sync every micro-step)
                raise RuntimeError("loss diverged")
        else:
            loss = eclipse_loss(pred.float(), batch["image_embeds"], batch["text_embeds"])
        loss.backward()
        if recipe.trainer:
            torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(prior)
        return loss.detach()

    return step


def throughput(
    preset: str,
    batch: int,
    device: torch.device,
    recipes: tuple[DeviceRecipe, ...],
    matmul_flops: float,
    steps: int,
    repeats: int,
    compile_backend: str = "inductor",
) -> list[dict[str, Any]]:
    """Rows of samples/s, MFU and ratio to the first bf16 plain loop in `recipes` (or the first recipe)."""
    from eclipse_prior.models import EclipsePrior

    torch.manual_seed(0)
    base = EclipsePrior.from_preset(preset)
    flops = train_flops_per_sample(base.config)["train"]
    data = synthetic_batch(base.config, batch, seed=1)
    fns: dict[str, Callable[[], Any]] = {}
    first_call: dict[str, float] = {}
    errors: dict[str, str] = {}
    for recipe in recipes:
        try:
            step = make_device_step(base, recipe, data, device, compile_backend)
            sync(device)
            t0 = time.perf_counter()
            step()  # first call: allocation, kernel selection, compilation
            sync(device)
            first_call[recipe.name] = time.perf_counter() - t0
        except Exception as err:  # e.g. a forced SDPA backend that refuses our mask
            errors[recipe.name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            continue

        def run_steps(step: Callable[[], torch.Tensor] = step) -> None:
            for _ in range(steps):
                step()

        fns[recipe.name] = run_steps
    timings = interleaved_medians(fns, device, repeats=repeats, warmup=1) if fns else {}
    base_name = next((r.name for r in recipes if r.name in timings and "baseline" in r.name), next(iter(timings), None))
    rows = []
    for recipe in recipes:
        row: dict[str, Any] = {"preset": preset, "batch": batch, "recipe": recipe.name, "steps_per_repeat": steps}
        if recipe.name in errors:
            rows.append({**row, "error": errors[recipe.name]})
            continue
        step_s = median(timings[recipe.name]) / steps
        rate = batch / step_s
        rows.append(
            {
                **row,
                "params": sum(p.numel() for p in base.parameters()),
                "tokens": base.config.num_embeddings + base.config.additional_embeddings,
                "step_s": step_s,
                "samples_per_s": rate,
                "train_gflop_per_sample": flops / 1e9,
                "mfu": flops * rate / matmul_flops,
                "vs_baseline": median(timings[base_name]) / median(timings[recipe.name]),
                "baseline": base_name,
                "first_call_s": first_call[recipe.name],
                "repeat_s": timings[recipe.name],
            }
        )
    return rows


def run(device: torch.device, smoke: bool = False, compile_backend: str = "inductor") -> dict[str, Any]:
    """The released network (smoke: tiny) at batch 256 and 1024 (smoke: 16), bf16, against dense bf16 matmul."""
    mm = matmul_rate(device, torch.bfloat16, 256 if smoke else 8192, repeats=2 if smoke else 5, inner=2 if smoke else 10)
    preset = "tiny" if smoke else "kandinsky22"
    batches = (16,) if smoke else (256, 1024)
    steps, repeats = (1, 1) if smoke else (5, 3)
    rows: list[dict[str, Any]] = []
    for b in batches:  # compile and the diagnostics at the paper's batch only (each compile costs ~a minute)
        last = b == batches[-1]
        recipes = tuple(r for r in MAIN_RECIPES if last or not r.compile) + (DIAGNOSTIC_RECIPES if last else ())
        if device.type != "cuda":  # the forced GPU kernels do not exist on a CPU
            recipes = tuple(r for r in recipes if r.backend in (None, SDPBackend.MATH))
        rows += throughput(preset, b, device, recipes, mm["flops_per_s"], steps, repeats, compile_backend)
    best = max((r for r in rows if r["batch"] == batches[-1] and "samples_per_s" in r), key=lambda r: r["samples_per_s"])
    from eclipse_prior.models import EclipsePrior

    paper_flops = PAPER_STEPS * PAPER_BATCH * train_flops_per_sample(EclipsePrior.from_preset("kandinsky22").config)["train"]
    hours = PAPER_STEPS * PAPER_BATCH / best["samples_per_s"] / 3600
    return {
        "matmul": mm,
        "rows": rows,
        "paper_recipe": {
            "steps": PAPER_STEPS,
            "batch": PAPER_BATCH,
            "flops": paper_flops,
            "best_recipe": best["recipe"],
            "measured_at_batch": best["batch"],
            "hours_one_device": hours,
            "paper_gpu_hours": PAPER_GPU_HOURS,
            "paper_over_ours": PAPER_GPU_HOURS / hours,
            "note": "smoke run: tiny network, hours are not the paper's network" if smoke else "",
        },
    }


def format_section(r: dict[str, Any]) -> list[str]:
    """Markdown lines: the rows, the matmul ceiling and the paper-recipe line."""
    mm = r["matmul"]
    lines = [
        "| network | batch | recipe | samples/s | MFU (vs bf16 matmul) | vs baseline | first call (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        if "error" in row:
            lines.append(f"| {row['preset']} | {row['batch']} | {row['recipe']} | refused: {row['error']} | | | |")
            continue
        lines.append(
            f"| {row['preset']} ({row['params'] / 1e6:.3g}M, {row['tokens']} tokens) | {row['batch']} | {row['recipe']} "
            f"| {row['samples_per_s']:.0f} | {row['mfu']:.0%} | {row['vs_baseline']:.2f}x | {row['first_call_s']:.1f} |"
        )
    lines += ["", f"Dense {mm['n']}x{mm['n']} bf16 matmul in the same run: {mm['flops_per_s'] / 1e12:.1f} TFLOP/s."]
    p = r["paper_recipe"]
    if p is None:
        return lines
    lines += [
        "",
        f"Paper's recipe ({p['steps']} steps x batch {p['batch']}, {p['flops']:.2e} FLOP) at the best measured rate "
        f"({p['best_recipe']}, batch {p['measured_at_batch']}): {p['hours_one_device']:.2f} h on this one device, "
        f"against the paper's <= {p['paper_gpu_hours']} GPU hours ({p['paper_over_ours']:.0f}x less). {p['note']}",
    ]
    return lines


CPU_COMPILE_RECIPES = (
    DeviceRecipe("fp32 trainer, eager (baseline)", bf16=False, trainer=True),
    DeviceRecipe("fp32 trainer + compile", bf16=False, trainer=True, compile=True),
    DeviceRecipe("bf16 trainer, eager", trainer=True),
    DeviceRecipe("bf16 trainer + compile", trainer=True, compile=True),
)


def cpu_compile(quick: bool = False) -> dict[str, Any]:
    """`train --compile` on this CPU: the trainer's step eager vs torch.compile (inductor), fp32 (the CPU default)
    and bf16, for the shapes (small, batch 64) and released (kandinsky22, batch 16) networks. Run it with a cold
    inductor cache (e.g. TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)) for first-call times that include compilation."""
    cpu = torch.device("cpu")
    mm = matmul_rate(cpu, torch.bfloat16, 2048, repeats=3, inner=1)
    rows = throughput("small", 64, cpu, CPU_COMPILE_RECIPES, mm["flops_per_s"], steps=5, repeats=2 if quick else 5)
    print(json.dumps(rows, default=str), file=sys.stderr, flush=True)  # a long run shows its figures as it goes
    if not quick:
        rows += throughput("kandinsky22", 16, cpu, CPU_COMPILE_RECIPES, mm["flops_per_s"], steps=2, repeats=3)
    return {"matmul": mm, "rows": rows, "threads": torch.get_num_threads()}


def format_cpu_compile(r: dict[str, Any]) -> list[str]:
    """Markdown lines for the CPU compile table (ratios against the eager fp32 step of the same network)."""
    lines = [
        "| network | batch | recipe | samples/s (wall) | vs fp32 eager | first call (s, incl. compilation) |",
        "|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        lines.append(
            f"| {row['preset']} ({row['params'] / 1e6:.1f}M, {row['tokens']} tokens) | {row['batch']} "
            f"| {row['recipe']} | {row['samples_per_s']:.1f} | {row['vs_baseline']:.2f}x | {row['first_call_s']:.1f} |"
        )
    return lines + [
        "",
        f"torch threads {r['threads']}; each step is the trainer's (fused AdamW, its attention choice, clipping, "
        "EMA); recipes timed round-robin in one run, so a burst of load hits all alike.",
    ]
