"""Prior latency per prompt: ECLIPSE (one pass) vs the Diffusion-Baseline (25 steps, CFG 4) vs Kandinsky's 1B prior.

The paper's efficiency claim is that a non-diffusion prior needs one forward pass where a diffusion prior needs
`steps x 2` (classifier-free guidance doubles the batch). This measures it on this machine at the released size
(kandinsky22 preset: width 1280, 77 text tokens; random weights, which do not change the cost) and reports ratios
from one run. The 1B Kandinsky v2.2 prior (diffusers `PriorTransformer`: 20 layers, 32 heads x 64, width 1280) is
too slow to sample in full on a CPU, so one of its passes is measured at batch 1 (quick: 2 of its 20 layers, scaled
by 10) and the 25-step guided latency is estimated as 25 x 2 x that; its FLOP ratio is computed analytically
(and checked against torch's FLOP counter on the small priors).

Usage: `python benchmarks/prior_latency.py [--quick]`; `run(quick)` returns the rows for the benchmark suite.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

STEPS, GUIDANCE = 25, 4.0
TEXT_TOKENS, WIDTH = 77, 1280
# diffusers PriorTransformer defaults = kandinsky-community/kandinsky-2-2-prior with embedding_dim 1280.
KANDINSKY_PRIOR = dict(
    num_attention_heads=32,
    attention_head_dim=64,
    num_layers=20,
    embedding_dim=WIDTH,
    num_embeddings=TEXT_TOKENS,
    additional_embeddings=4,
    dropout=0.0,
    time_embed_act_fn="silu",
    norm_in_type=None,
    embedding_proj_norm_type=None,
    encoder_hid_proj_type="linear",
    added_emb_type="prd",
)


def transformer_flops(
    layers: int, inner: int, tokens: int, width: int, text_tokens: int, time_mlp: bool
) -> int:
    """Forward FLOPs of one PriorTransformer-style pass for one sample (multiply-add = 2 FLOPs).

    Per layer: Q, K, V, out projections 8*d^2*T, attention scores and mixing 4*T^2*d, GELU feed-forward
    (4x) 16*d^2*T. Plus the input projections (text states, pooled text, noise), the read-out of the prd
    token, and for diffusion priors the timestep MLP (two d x d layers).
    """
    per_layer = 24 * inner * inner * tokens + 4 * tokens * tokens * inner
    inputs = 2 * text_tokens * width * inner + 2 * 2 * width * inner
    readout = 2 * inner * width
    time = 2 * 2 * inner * inner if time_mlp else 0
    return layers * per_layer + inputs + readout + time


def _median_seconds(fn: Callable[[], Any], repeats: int, warm_up: bool = True) -> float:
    if warm_up:  # first-call allocation and kernel selection
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _counted_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _text(batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    embeds = torch.randn(batch, WIDTH, generator=generator)
    states = torch.randn(batch, TEXT_TOKENS, WIDTH, generator=generator)
    mask = torch.zeros(batch, TEXT_TOKENS, dtype=torch.bool)
    mask[:, :12] = True  # a typical short caption
    return embeds, states, mask


def _big_prior(num_layers: int) -> Any:
    """The 1B configuration, allocated without the slow random init (values do not change the cost)."""
    from diffusers import PriorTransformer

    with torch.device("meta"):
        model = PriorTransformer(**{**KANDINSKY_PRIOR, "num_layers": num_layers})
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    return model


def _big_prior_pass(
    layers: int, embeds: torch.Tensor, states: torch.Tensor, mask: torch.Tensor, repeats: int
) -> tuple[float, int]:
    """Seconds of one batch-1 pass of the 1B prior and its parameter count, from a `layers`-deep copy.

    Both scale linearly in depth (the blocks are identical; the rest is under 2% of the cost), so a shallow
    copy measured and scaled to 20 layers keeps the quick run short and its memory small.
    """
    big = _big_prior(layers)
    t = torch.tensor(500)

    def call() -> Any:
        return big(
            torch.randn(1, WIDTH), t, proj_embedding=embeds, encoder_hidden_states=states, attention_mask=mask
        )

    seconds = _median_seconds(call, repeats) * KANDINSKY_PRIOR["num_layers"] / layers
    per_block = sum(p.numel() for p in big.transformer_blocks[0].parameters())
    params = sum(p.numel() for p in big.parameters()) + per_block * (KANDINSKY_PRIOR["num_layers"] - layers)
    return seconds, params


def run(quick: bool = False, threads: int | None = None) -> list[dict[str, Any]]:
    """Measure and return one row per prior, with latency and FLOP ratios against ECLIPSE.

    `threads` sets torch's intra-op threads for the run (on a shared, oversubscribed CPU one thread is far
    steadier than several: spinning threads wait for descheduled ones); None keeps torch's default.
    """
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(quick)
    finally:
        torch.set_num_threads(previous_threads)


@torch.inference_mode()
def _measure(quick: bool) -> list[dict[str, Any]]:
    from eclipse_prior.models import DiffusionPrior, EclipsePrior

    repeats = 3 if quick else 10
    gen = torch.Generator().manual_seed(0)
    embeds, states, mask = _text(1, gen)
    torch.manual_seed(0)
    eclipse = EclipsePrior.from_preset("kandinsky22").eval()
    baseline = DiffusionPrior.from_preset("kandinsky22").eval()
    inner = eclipse.config.num_attention_heads * eclipse.config.attention_head_dim
    tokens = TEXT_TOKENS + eclipse.config.additional_embeddings

    def eclipse_call() -> Any:
        return eclipse.generate_embeds(embeds, states, mask, generator=gen)

    def baseline_call() -> Any:
        return baseline.generate_embeds(embeds, states, mask, gen, STEPS, GUIDANCE)

    eclipse_s = _median_seconds(eclipse_call, repeats)
    # 50 network passes amortise first-call costs, and ECLIPSE's warm-up already ran the same shapes.
    baseline_s = _median_seconds(baseline_call, 1 if quick else 3, warm_up=False)
    eclipse_flops = transformer_flops(eclipse.config.num_layers, inner, tokens, WIDTH, TEXT_TOKENS, False)
    baseline_tokens = TEXT_TOKENS + baseline.config.additional_embeddings
    baseline_pass = transformer_flops(
        baseline.config.num_layers, inner, baseline_tokens, WIDTH, TEXT_TOKENS, True
    )
    baseline_flops = STEPS * 2 * baseline_pass
    counted_eclipse = _counted_flops(eclipse_call)
    # every step costs the same: count one guided step and multiply
    counted_baseline = STEPS * _counted_flops(
        lambda: baseline.generate_embeds(embeds, states, mask, gen, 1, GUIDANCE)
    )

    big_layers = 2 if quick else KANDINSKY_PRIOR["num_layers"]
    big_pass_s, big_params = _big_prior_pass(big_layers, embeds, states, mask, 1 if quick else 2)
    big_inner = KANDINSKY_PRIOR["num_attention_heads"] * KANDINSKY_PRIOR["attention_head_dim"]
    big_tokens = TEXT_TOKENS + KANDINSKY_PRIOR["additional_embeddings"]
    big_flops = STEPS * 2 * transformer_flops(20, big_inner, big_tokens, WIDTH, TEXT_TOKENS, True)
    big_s = STEPS * 2 * big_pass_s  # CFG doubles the batch; on a CPU the cost is close to linear in batch

    def params(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    return [
        {
            "prior": "ECLIPSE (1 pass)",
            "params": params(eclipse),
            "latency_s": eclipse_s,
            "latency_ratio": 1.0,
            "flops": eclipse_flops,
            "flops_counted": counted_eclipse,
            "flop_ratio": 1.0,
            "measured": "full sampling",
            "threads": torch.get_num_threads(),
        },
        {
            "prior": f"Diffusion-Baseline ({STEPS} steps, CFG {GUIDANCE:g})",
            "params": params(baseline),
            "latency_s": baseline_s,
            "latency_ratio": baseline_s / eclipse_s,
            "flops": baseline_flops,
            "flops_counted": counted_baseline,
            "flop_ratio": baseline_flops / eclipse_flops,
            "measured": "full sampling",
            "threads": torch.get_num_threads(),
        },
        {
            "prior": f"Kandinsky v2.2 prior, 1B config ({STEPS} steps, CFG {GUIDANCE:g})",
            "params": big_params,
            "latency_s": big_s,
            "latency_ratio": big_s / eclipse_s,
            "flops": big_flops,
            "flops_counted": None,
            "flop_ratio": big_flops / eclipse_flops,
            "measured": f"1 pass at batch 1 ({big_layers}/20 layers) x {STEPS} steps x 2 (estimate)",
            "threads": torch.get_num_threads(),
        },
    ]


def main() -> None:
    """Print the rows as a table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats; 2 of the 1B prior's 20 layers")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    rows = run(args.quick, args.threads)
    print(f"torch threads: {rows[0]['threads']}")
    print(f"{'prior':58} {'params':>8} {'latency':>9} {'x ECLIPSE':>10} {'GFLOP':>9} {'FLOP x':>8}  measured")
    for r in rows:
        counted = "" if r["flops_counted"] is None else f" (counted {r['flops_counted'] / 1e9:.2f})"
        print(
            f"{r['prior']:58} {r['params'] / 1e6:7.1f}M {r['latency_s']:8.3f}s {r['latency_ratio']:9.1f}x "
            f"{r['flops'] / 1e9:9.2f} {r['flop_ratio']:7.0f}x  {r['measured']}{counted}"
        )


if __name__ == "__main__":
    main()
