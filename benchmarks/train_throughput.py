"""Training throughput and model-FLOP utilisation (MFU) of the ECLIPSE prior, fp32 and bf16, against a plain loop.

What is compared (each variant has its own copy of the same randomly initialised network and its own AdamW;
all are timed round-robin together with dense matmuls of both dtypes, so every ratio comes from one run):

- `fp32 plain loop` (the baseline): forward, eclipse loss, backward, `torch.optim.AdamW()` step, in fp32, the
  way anyone would first write it (on a CPU torch then runs AdamW as a per-parameter Python loop and picks the
  fused flash-attention kernel for `scaled_dot_product_attention`).
- `bf16 autocast`: the same loop under `torch.autocast("cpu", torch.bfloat16)`, which is what
  `eclipse-prior train --mixed-precision bf16` did through accelerate until it adopted "+ fast" (686b1ca).
- `... + fast`: fused AdamW (`fused=True`: one kernel over all parameters) and the math attention backend
  (`sdpa_kernel(SDPBackend.MATH)`: two bmm and a softmax). On this CPU the flash-attention kernel's backward
  with an additive float mask and 32-wide heads took ~25% of a bf16 step for <3% of its FLOPs; bmm + softmax
  computes the same attention in a fraction of that.

FLOPs are counted analytically (`train_flops_per_sample`, formula in its docstring) and MFU is achieved FLOP/s
divided by `torch.matmul` FLOP/s of the same dtype on 2048x2048 matrices in the same run. Figures are given by
CPU time (steady on a shared machine) and by wall time (what a user waits).

Loss curves: `loss_curves` trains the shapes-size network on a fixed synthetic task in fp32 and in bf16 with the
fast recipe from identical initial weights, noise and batches, and reports the largest relative gap of the
smoothed curves beside the gap between two fp32 runs that differ only in their noise seed (the run-to-run
noise the bf16 gap should stay within).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from common import fmt_rate, interleaved, load_average, matmul_call


def train_flops_per_sample(config: Any) -> dict[str, int]:
    """Training FLOPs of one sample of an `EclipsePrior` config (multiply-add = 2 FLOPs, backward = 2x forward).

    With W = heads x head_dim, E = embedding width, L = text tokens, T = L + additional_embeddings tokens,
    N layers, F = 4W (GELU feed-forward):
      matmul parameter-tokens P = N * 12 W^2 * T        (Q, K, V, out: 4 W^2; feed-forward: 2 W F = 8 W^2)
                                + E W L                 (per-token text states -> W, on the L text tokens)
                                + 2 E W + W E           (pooled text and noise in, prd token out: one token each)
      attention A = 4 N T^2 W per forward              (Q K^T and attention x V)
      training FLOPs = 6 P + 3 A = 6 P + 12 N T^2 W.
    Layer norms, GELU, softmax and the loss are left out (memory-bound, <1% of the FLOPs), as MFU conventionally
    does. The input projections' backward is counted at 2x although their inputs need no gradient (<2%).
    """
    w = config.num_attention_heads * config.attention_head_dim
    e, seq, n = config.embedding_dim, config.num_embeddings, config.num_layers
    t = seq + config.additional_embeddings
    param_tokens = n * 12 * w * w * t + e * w * seq + 3 * e * w
    attention = 4 * n * t * t * w
    return {"matmul_param_tokens": param_tokens, "attention_fwd": attention, "train": 6 * param_tokens + 3 * attention}


def matmul_params(model: torch.nn.Module) -> int:
    """Weights of every nn.Linear (checks `train_flops_per_sample`'s 12 W^2 per layer + projections)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def synthetic_batch(config: Any, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """A fixed batch shaped like a store's: raw-scale embeddings, per-token states, captions of varied length."""
    gen = torch.Generator().manual_seed(seed)
    e, seq = config.embedding_dim, config.num_embeddings
    out = {
        "image_embeds": torch.randn(batch, e, generator=gen),
        "text_embeds": torch.randn(batch, e, generator=gen),
    }
    if seq:
        out["text_states"] = torch.randn(batch, seq, e, generator=gen)
        lengths = torch.randint(2, seq + 1, (batch,), generator=gen)
        out["text_mask"] = torch.arange(seq)[None, :] < lengths[:, None]
    return out


@dataclass(frozen=True)
class Recipe:
    """One way of running a training step."""

    name: str
    bf16: bool
    fast: bool  # fused AdamW + math attention backend

    @property
    def dtype(self) -> torch.dtype:
        """The dtype whose matmul rate is this recipe's ceiling."""
        return torch.bfloat16 if self.bf16 else torch.float32


RECIPES = (
    Recipe("fp32 plain loop (baseline)", bf16=False, fast=False),
    Recipe("fp32 + fast", bf16=False, fast=True),
    Recipe("bf16 autocast", bf16=True, fast=False),
    Recipe("bf16 autocast + fast", bf16=True, fast=True),
)


def attention_backend(fast: bool) -> contextlib.AbstractContextManager[Any]:
    """The math SDPA backend for the fast recipe; torch's own choice otherwise."""
    return sdpa_kernel(SDPBackend.MATH) if fast else contextlib.nullcontext()


def make_step(
    model: torch.nn.Module, recipe: Recipe, batches: Iterator[dict[str, torch.Tensor]], lr: float = 1e-4
) -> tuple[Callable[[], float], torch.optim.Optimizer]:
    """A closure running one full optimizer step (forward, eclipse loss, backward, AdamW) of `recipe`, and
    its optimizer."""
    from eclipse_prior.losses import eclipse_loss

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, fused=True if recipe.fast else None)

    def step() -> float:
        batch = next(batches)
        with attention_backend(recipe.fast):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
                pred = model.training_prediction(
                    batch["image_embeds"],
                    batch["text_embeds"],
                    batch.get("text_states"),
                    batch.get("text_mask"),
                    noise=batch["noise"],
                )
            loss = eclipse_loss(pred.float(), batch["image_embeds"], batch["text_embeds"])
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, optimizer


def _repeat(batch: dict[str, torch.Tensor], noise_seed: int) -> Iterator[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(noise_seed)
    while True:
        yield {**batch, "noise": torch.randn(batch["text_embeds"].shape, generator=gen)}


def throughput(preset: str, batch: int, repeats: int, recipes: tuple[Recipe, ...] = RECIPES) -> list[dict[str, Any]]:
    """Rows of samples/s and MFU for each recipe on `preset` at `batch`, baseline and matmul in the same rounds."""
    from eclipse_prior.models import EclipsePrior

    torch.manual_seed(0)
    base = EclipsePrior.from_preset(preset)
    flops = train_flops_per_sample(base.config)
    w = base.config.num_attention_heads * base.config.attention_head_dim
    e, n = base.config.embedding_dim, base.config.num_layers
    expected = n * 12 * w * w + 4 * e * w if base.config.num_embeddings else n * 12 * w * w + 3 * e * w
    if matmul_params(base) != expected:
        raise RuntimeError(f"FLOP formula out of date: {matmul_params(base)} matmul weights, formula {expected}")
    data = synthetic_batch(base.config, batch, seed=1)
    fns: dict[str, Callable[[], Any]] = {}
    for recipe in recipes:
        fns[recipe.name] = make_step(copy.deepcopy(base), recipe, _repeat(data, noise_seed=2))[0]
    mm: dict[torch.dtype, int] = {}
    for dtype in {r.dtype for r in recipes}:
        call, mm[dtype] = matmul_call(dtype)
        fns[f"matmul {dtype}"] = call
    load_before = load_average()
    timings = interleaved(fns, repeats=repeats, warmup=1)
    load_after = load_average()
    base_t = timings[recipes[0].name]
    rows = []
    for recipe in recipes:
        t = timings[recipe.name]
        mm_t = timings[f"matmul {recipe.dtype}"]
        mm_cpu = mm[recipe.dtype] / mm_t.cpu_s
        mm_wall = mm[recipe.dtype] / mm_t.wall_s
        rows.append(
            {
                "preset": preset,
                "params": sum(p.numel() for p in base.parameters()),
                "tokens": base.config.num_embeddings + base.config.additional_embeddings,
                "batch": batch,
                "recipe": recipe.name,
                "samples_per_s": batch / t.wall_s,
                "samples_per_cpu_s": batch / t.cpu_s,
                "train_gflop_per_sample": flops["train"] / 1e9,
                "matmul_gflops_cpu": mm_cpu / 1e9,
                "matmul_gflops_wall": mm_wall / 1e9,
                "mfu_cpu": flops["train"] * batch / t.cpu_s / mm_cpu,
                "mfu_wall": flops["train"] * batch / t.wall_s / mm_wall,
                "speedup_cpu": base_t.cpu_s / t.cpu_s,
                "speedup_wall": base_t.wall_s / t.wall_s,
                "repeats": repeats,
                "load_avg": [round(load_before, 1), round(load_after, 1)],
                "step_wall_s": t.wall,
            }
        )
    return rows


def _smooth(xs: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def max_rel_gap(a: list[float], b: list[float], window: int = 10) -> float:
    """Largest |a - b| / |a| over the moving averages (window steps) of two loss curves."""
    sa, sb = _smooth(a, window), _smooth(b, window)
    return max(abs(x - y) / abs(x) for x, y in zip(sa, sb, strict=True))


def loss_curves(steps: int, preset: str = "small", batch: int = 64) -> dict[str, Any]:
    """fp32 vs bf16(+fast) loss curves from identical weights/noise/batches; fp32 noise-seed gap as reference."""
    from eclipse_prior.models import EclipsePrior

    torch.manual_seed(0)
    base = EclipsePrior.from_preset(preset)
    cfg = base.config
    gen = torch.Generator().manual_seed(3)
    pool = 16 * batch
    text = torch.randn(pool, cfg.embedding_dim, generator=gen)
    mix = torch.randn(cfg.embedding_dim, cfg.embedding_dim, generator=gen) / cfg.embedding_dim**0.5
    image = 3 * torch.tanh(text @ mix) + 0.1 * torch.randn(pool, cfg.embedding_dim, generator=gen)
    states = text[:, None, :] + 0.5 * torch.randn(pool, cfg.num_embeddings, cfg.embedding_dim, generator=gen)
    mask = torch.arange(cfg.num_embeddings)[None, :] < torch.randint(2, cfg.num_embeddings + 1, (pool, 1), generator=gen)

    def stream(noise_seed: int) -> Iterator[dict[str, torch.Tensor]]:
        order = torch.Generator().manual_seed(4)
        noise = torch.Generator().manual_seed(noise_seed)
        while True:
            idx = torch.randperm(pool, generator=order)[:batch]
            yield {
                "image_embeds": image[idx],
                "text_embeds": text[idx],
                "text_states": states[idx],
                "text_mask": mask[idx],
                "noise": torch.randn(batch, cfg.embedding_dim, generator=noise),
            }

    runs = {
        "fp32": (RECIPES[0], 5),
        "bf16": (RECIPES[3], 5),
        "fp32_other_noise": (RECIPES[0], 6),
    }
    curves = {}
    for name, (recipe, noise_seed) in runs.items():
        step = make_step(copy.deepcopy(base), recipe, stream(noise_seed), lr=1e-3)[0]
        curves[name] = [step() for _ in range(steps)]
    bf16_gap = max_rel_gap(curves["fp32"], curves["bf16"])
    noise_gap = max_rel_gap(curves["fp32"], curves["fp32_other_noise"])
    return {
        "preset": preset,
        "batch": batch,
        "steps": steps,
        "smoothing_window": 10,
        "max_rel_gap_bf16_vs_fp32": bf16_gap,
        "max_rel_gap_fp32_noise_seed": noise_gap,
        "bf16_within_noise": bf16_gap <= noise_gap,
        "loss_first_last": {k: [v[0], v[-1]] for k, v in curves.items()},
        "curves": curves,
    }


def run(quick: bool = False) -> dict[str, Any]:
    """Throughput rows for the released (kandinsky22, batch 64; quick: 16) and shapes (small, batch 64) sizes,
    and the fp32/bf16 loss curves."""
    rows = throughput("kandinsky22", 16 if quick else 64, repeats=2 if quick else 4)
    rows += throughput("small", 64, repeats=5 if quick else 20)
    curves = loss_curves(steps=40 if quick else 100)
    return {"rows": rows, "loss_curves": curves}


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines for the throughput table."""
    lines = [
        "| network | recipe | samples/s (wall) | samples/CPU-s | MFU (CPU time) | MFU (wall) | vs baseline (CPU / wall) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} ({r['params'] / 1e6:.1f}M, {r['tokens']} tokens, batch {r['batch']}) | {r['recipe']} "
            f"| {fmt_rate(r['samples_per_s'])} | {fmt_rate(r['samples_per_cpu_s'])} | {r['mfu_cpu']:.0%} "
            f"| {r['mfu_wall']:.0%} | {r['speedup_cpu']:.2f}x / {r['speedup_wall']:.2f}x |"
        )
    return lines


def main() -> None:
    """`python benchmarks/train_throughput.py [--quick] [--threads N]`: print the table and curve gap as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = run(args.quick)
    print("\n".join(format_rows(out["rows"])))
    print(json.dumps({k: v for k, v in out["loss_curves"].items() if k != "curves"}, indent=1))


if __name__ == "__main__":
    main()

