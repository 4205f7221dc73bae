"""Generation on an accelerator: prior latency, and end-to-end 512x512 images with the real-size Kandinsky 2.2 decoder.

`prior_latency`: ECLIPSE (one pass) vs the Diffusion-Baseline (25 steps, CFG 4) at the released size, vs the 1B
Kandinsky 2.2 prior (diffusers `PriorTransformer`, 25 steps, CFG 4, sampled by our `sample_diffusers_prior`, the
loop of `KandinskyV22PriorPipeline`), at batch 1 and 16, in fp16 and bf16 (weights cast, as `generate --dtype`
does). Baseline of each ratio: ECLIPSE at the same batch and dtype.

`end_to_end`: `EclipseKandinskyV22Pipeline` (what `eclipse-prior generate` runs: CLIP text encoder -> prior ->
zero-image negative through the CLIP image encoder -> UNet 50 steps with guidance 4 -> MoVQ) at 512x512, batch 1,
fp16, with the real-size decoder and CLIP ViT-bigG-14 towers of `real_models` (random weights), once with ECLIPSE
and once with the 1B prior; latency and peak GPU memory, each without and with `--offload model`
(diffusers' model CPU offload). Baseline: ECLIPSE + decoder without offload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from device_common import interleaved_medians, median, peak_memory, peak_memory_reset, timed

STEPS, GUIDANCE, TEXT_TOKENS = 25, 4.0, 77
SMOKE_STEPS = 2  # smoke runs: prior steps (a CPU's fp16 is slow; only the code path is being checked)


def _priors(device: torch.device, dtype: torch.dtype, smoke: bool) -> tuple[Any, Any, Any, int]:
    """ECLIPSE, Diffusion-Baseline (released size) and the 1B prior on `device` in `dtype`, and their width."""
    from eclipse_prior.models import DiffusionPrior, EclipsePrior
    from real_models import build_big_prior

    preset, width = ("tiny", 32) if smoke else ("kandinsky22", 1280)
    torch.manual_seed(0)
    eclipse = EclipsePrior.from_preset(preset, width, TEXT_TOKENS).to(device, dtype).eval()
    baseline = DiffusionPrior.from_preset(preset, width, TEXT_TOKENS).to(device, dtype).eval()
    return eclipse, baseline, build_big_prior(device, dtype, smoke, width), width


def _text(batch: int, width: int, device: torch.device, dtype: torch.dtype) -> Any:
    from eclipse_prior.pipelines.common import TextEncoding

    gen = torch.Generator().manual_seed(batch)
    mask = torch.zeros(batch, TEXT_TOKENS, dtype=torch.bool)
    mask[:, :12] = True  # a typical short caption
    return TextEncoding(
        torch.randn(batch, width, generator=gen).to(device, dtype),
        torch.randn(batch, TEXT_TOKENS, width, generator=gen).to(device, dtype),
        mask.to(device),
    )


@torch.inference_mode()
def prior_latency(device: torch.device, smoke: bool = False) -> list[dict[str, Any]]:
    """Rows: prior x batch x dtype, seconds per call and the ratio to ECLIPSE at that batch and dtype."""
    rows: list[dict[str, Any]] = []
    for dtype in (torch.float16, torch.bfloat16):
        rows += _latency_rows(device, dtype, smoke)  # one dtype's models at a time
    return rows


def _latency_rows(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[dict[str, Any]]:
    from eclipse_prior.pipelines.common import sample_diffusers_prior
    from real_models import param_count, prior_scheduler

    repeats = 1 if smoke else 5
    steps = SMOKE_STEPS if smoke else STEPS
    eclipse, baseline, big, width = _priors(device, dtype, smoke)
    scheduler = prior_scheduler()
    names = ("ECLIPSE (1 pass)", f"Diffusion-Baseline ({steps} steps, CFG {GUIDANCE:g})",
             f"Kandinsky 2.2 prior, 1B config ({steps} steps, CFG {GUIDANCE:g})")
    params = dict(zip(names, (param_count(eclipse), param_count(baseline), param_count(big)), strict=True))
    rows = []
    for batch in (1, 16):
        cond, uncond = _text(batch, width, device, dtype), _text(batch, width, device, dtype)
        fns: dict[str, Callable[[], Any]] = {
            names[0]: lambda c=cond: eclipse.generate_embeds(c.embeds, c.states, c.mask),
            names[1]: lambda c=cond: baseline.generate_embeds(c.embeds, c.states, c.mask, None, steps, GUIDANCE),
            names[2]: lambda c=cond, u=uncond: sample_diffusers_prior(big, scheduler, c, u, None, steps, GUIDANCE),
        }
        secs = interleaved_medians(fns, device, repeats)
        first = median(secs[names[0]])
        for name, s in secs.items():
            rows.append(
                {
                    "prior": name,
                    "params": params[name],
                    "batch": batch,
                    "dtype": str(dtype).removeprefix("torch."),
                    "latency_s": median(s),
                    "vs_eclipse": median(s) / first,
                    "repeat_s": s,
                }
            )
    return rows


def _pipeline(prior: Any, prior_sched: Any, parts: dict[str, Any]) -> Any:
    from eclipse_prior.pipelines.kandinsky import EclipseKandinskyV22Pipeline

    pipe = EclipseKandinskyV22Pipeline(prior=prior, prior_scheduler=prior_sched, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def end_to_end(device: torch.device, smoke: bool = False) -> list[dict[str, Any]]:
    """Rows: (ECLIPSE | 1B prior) + decoder x (no offload | model offload): latency and peak memory per image."""
    from transformers import CLIPImageProcessor

    from eclipse_prior.models import EclipsePrior
    from real_models import (
        CLIP_IMAGE_PROCESSOR,
        build_big_prior,
        build_decoder,
        clip_towers,
        param_count,
        prior_scheduler,
        tokenizer,
    )

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size, steps = (64, 3) if smoke else (512, 50)
    width = 32 if smoke else 1280
    unet, scheduler, movq = build_decoder(device, dtype, smoke)
    text, vision = clip_towers("tiny" if smoke else "vit-bigg-14", device, dtype)
    parts = {
        "text_encoder": text,
        "tokenizer": tokenizer(),
        "unet": unet,
        "scheduler": scheduler,
        "movq": movq,
        "image_encoder": vision,
        "image_processor": CLIPImageProcessor(**CLIP_IMAGE_PROCESSOR),
    }
    torch.manual_seed(0)
    eclipse = EclipsePrior.from_preset("tiny" if smoke else "kandinsky22", width, TEXT_TOKENS).to(device, dtype).eval()
    big = build_big_prior(device, dtype, smoke, width)
    pipes = {
        "ECLIPSE + decoder": (_pipeline(eclipse, None, parts), param_count(eclipse)),
        "Kandinsky 2.2 1B prior + decoder": (_pipeline(big, prior_scheduler(), parts), param_count(big)),
    }
    decoder_params = param_count(unet) + param_count(movq)
    clip_params = param_count(text) + param_count(vision)

    def generate(pipe: Any) -> Callable[[], Any]:
        return lambda: pipe(
            "a red cube left of a blue sphere", num_inference_steps=steps, guidance_scale=4.0,
            prior_num_inference_steps=SMOKE_STEPS if smoke else STEPS, prior_guidance_scale=GUIDANCE, height=size, width=size,
            output_type="pt",
        )

    rows: list[dict[str, Any]] = []
    repeats = 1 if smoke else 2
    for offload in ("none", "model"):
        if offload == "model" and device.type != "cuda":
            rows += [{"pipeline": n, "offload": offload, "skipped": "model offload needs a CUDA GPU"} for n in pipes]
            continue
        for name, (pipe, prior_params) in pipes.items():
            for other, _ in pipes.values():  # the other pipeline's prior must not count in this one's memory
                if other is not pipe:
                    other.prior.to("cpu")
            if offload == "model":
                pipe.enable_offload("model")
            else:
                pipe.prior.to(device)
            peak_memory_reset(device)
            timed(generate(pipe), device)  # warm-up (kernel selection; offload hooks' first moves)
            secs = [timed(generate(pipe), device) for _ in range(repeats)]
            rows.append(
                {
                    "pipeline": name,
                    "offload": offload,
                    "size": size,
                    "steps": steps,
                    "dtype": str(dtype).removeprefix("torch."),
                    "prior_params": prior_params,
                    "decoder_params": decoder_params,
                    "clip_params": clip_params,
                    "latency_s": median(secs),
                    "repeat_s": secs,
                    "peak_memory_bytes": peak_memory(device),
                }
            )
    base = rows[0]["latency_s"]
    base_mem = rows[0]["peak_memory_bytes"]
    for r in rows:
        if "latency_s" in r:
            r["vs_eclipse_no_offload"] = r["latency_s"] / base
            r["memory_vs_eclipse_no_offload"] = r["peak_memory_bytes"] / base_mem if base_mem else None
    return rows


def format_latency(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines for the prior latency table."""
    lines = ["| prior | params | batch | dtype | latency (ms) | vs ECLIPSE |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['prior']} | {r['params'] / 1e6:.3g}M | {r['batch']} | {r['dtype']} | {r['latency_s'] * 1e3:.1f} "
            f"| {r['vs_eclipse']:.1f}x |"
        )
    return lines


def format_end_to_end(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown lines for the end-to-end table."""
    gib = 2**30
    lines = [
        "| pipeline | offload | image | latency (s) | vs ECLIPSE, no offload | peak GPU memory | memory vs ECLIPSE |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['pipeline']} | {r['offload']} | skipped: {r['skipped']} | | | | |")
            continue
        mem = "n/a (CPU)" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / gib:.1f} GiB"
        mem_ratio = "" if r["memory_vs_eclipse_no_offload"] is None else f"{r['memory_vs_eclipse_no_offload']:.2f}x"
        lines.append(
            f"| {r['pipeline']} | {r['offload']} | {r['size']}px, {r['steps']} steps, {r['dtype']} "
            f"| {r['latency_s']:.2f} | {r['vs_eclipse_no_offload']:.2f}x | {mem} | {mem_ratio} |"
        )
    if rows and "decoder_params" in rows[0]:
        r = rows[0]
        lines += [
            "",
            f"Decoder (UNet + MoVQ) {r['decoder_params'] / 1e9:.2f}B parameters, CLIP towers "
            f"{r['clip_params'] / 1e9:.2f}B, random weights from the released configs (benchmarks/real_models.py).",
        ]
    return lines
