"""`eclipse-prior generate`: prompts -> prior -> unCLIP decoder -> PNGs with JSON sidecars and a grid."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `generate` command."""
    p = subparsers.add_parser(
        "generate",
        help="generate images with a prior and the Kandinsky v2.2 or Karlo decoder",
        description=(
            "Generate images: CLIP text -> prior -> image embedding -> unCLIP decoder. Writes one PNG and one JSON "
            "sidecar (every setting, seed, model ids and revisions) per image and a grid; --from-sidecar remakes "
            "an image exactly. Hub ids of the real models are defaults; local folders work everywhere."
        ),
    )
    p.add_argument(
        "--prior",
        help="EclipsePrior/DiffusionPrior run dir, export folder or hub id, or an original diffusion prior "
        "(kandinsky-community/kandinsky-2-2-prior, kakaobrain/karlo-v1-alpha); default: the released ECLIPSE "
        "prior of the decoder",
    )
    p.add_argument(
        "--decoder",
        default="kandinsky22",
        help="kandinsky22, karlo, a hub id or a folder in the Kandinsky 2.2 (unet/ movq/ scheduler/) or Karlo "
        "layout (default: kandinsky22)",
    )
    p.add_argument(
        "--clip",
        help="CLIP hub id or folder for the text encoder (needed when the decoder folder has none; default for "
        "kandinsky22: laion/CLIP-ViT-bigG-14-laion2B-39B-b160k)",
    )
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="text file with one prompt per line ('#' lines skipped)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default: 1)")
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the first image; image k gets seed+k (default: 0)"
    )
    p.add_argument("--steps", type=int, help="decoder steps (default: 50 Kandinsky, 25 Karlo)")
    p.add_argument("--guidance", type=float, help="decoder guidance (default: 7.5 Kandinsky, 8.0 Karlo)")
    p.add_argument(
        "--prior-steps", type=int, default=25, help="diffusion prior steps (ECLIPSE ignores; default 25)"
    )
    p.add_argument(
        "--prior-guidance",
        type=float,
        default=4.0,
        help="diffusion prior guidance (ECLIPSE ignores; default 4.0)",
    )
    p.add_argument("--super-res-steps", type=int, default=7, help="Karlo super-resolution steps (default: 7)")
    p.add_argument("--height", type=int, help="image height (Kandinsky; default 512)")
    p.add_argument("--width", type=int, help="image width (Kandinsky; default 512)")
    p.add_argument("--negative-prompt", help="negative prompt (default: Kandinsky zero-image embedding)")
    p.add_argument(
        "--out", help="output folder (default: out/generate; with --from-sidecar: beside the sidecar)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="fp16 needs a GPU")
    p.add_argument(
        "--offload",
        choices=["none", "model", "sequential"],
        default="none",
        help="diffusers CPU offload (GPU only)",
    )
    p.add_argument(
        "--free-text-models",
        action="store_true",
        help="make all prior embeddings first, then free the prior and text encoder before decoding",
    )
    p.add_argument("--offline", action="store_true", help="use only local folders and the Hugging Face cache")
    p.add_argument("--from-sidecar", metavar="FILE", help="regenerate the image a JSON sidecar describes")
    p.add_argument(
        "--allow-changed-weights",
        action="store_true",
        help="with --from-sidecar: regenerate even if a local model's weight files changed since (the image "
        "will differ; default: refuse)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Parse, build the pipeline, generate, print where things went."""
    from eclipse_prior.errors import ConfigError
    from eclipse_prior.pipelines.generate import (
        KANDINSKY_SIZE,
        GenerationSettings,
        check_generation_numbers,
        check_guidance,
        check_images_fit,
        check_seed,
        load_pipeline,
        read_prompts,
        regenerate,
        run_generation,
    )

    local_only = True if args.offline else None
    if args.from_sidecar:
        device = None if args.device == "auto" else args.device
        png = regenerate(
            args.from_sidecar,
            out=args.out,
            device=device,
            local_files_only=local_only,
            allow_changed_weights=args.allow_changed_weights,
        )
        print(f"regenerated {png}")
        return 0
    # everything that can be checked without the models is checked before loading them (minutes for real ones)
    check_generation_numbers(
        args.steps, args.prior_steps, args.super_res_steps, args.num_images, args.height, args.width
    )
    check_guidance(guidance=args.guidance, prior_guidance=args.prior_guidance)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise ConfigError(f"--out {args.out} is a file, not a folder; choose another output folder")
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += read_prompts(args.prompts_file)
    if not prompts:
        raise ConfigError("no prompts: pass --prompt TEXT (repeatable) or --prompts-file FILE")
    loaded = load_pipeline(
        args.prior,
        args.decoder,
        args.clip,
        device=args.device,
        dtype=args.dtype,
        offload=args.offload,
        free_text_models=args.free_text_models,
        local_files_only=local_only,
    )
    settings = GenerationSettings(
        steps=args.steps,
        guidance=args.guidance,
        prior_steps=args.prior_steps,
        prior_guidance=args.prior_guidance,
        height=args.height,
        width=args.width,
        negative_prompt=args.negative_prompt,
        super_res_steps=args.super_res_steps,
    )
    check_seed(args.seed, len(prompts) * args.num_images)
    check_images_fit(len(prompts) * args.num_images, args.height or KANDINSKY_SIZE, args.width or KANDINSKY_SIZE)
    grid_name = f"{Path(args.prompts_file).stem}-grid" if args.prompts_file else "grid"
    out = args.out or "out/generate"
    result = run_generation(loaded, prompts, out, args.num_images, args.seed, settings, grid_name)
    print(f"wrote {len(result.images)} images with JSON sidecars to {out}; grid {result.grid}")
    return 0
