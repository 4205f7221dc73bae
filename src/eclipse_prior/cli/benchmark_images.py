"""`eclipse-prior benchmark-images`: T2I-CompBench-style scores, PickScore preference and Frechet distance.

Thin: parses flags into a BenchmarkConfig, runs ``eclipse_prior.evaluation.image_benchmark.run_benchmark`` and
prints the summary table.
"""

from __future__ import annotations

import argparse

from eclipse_prior.evaluation import compbench as scorer_ids


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "benchmark-images",
        help="generate images for prompt files (cached) and score them like T2I-CompBench",
        description=(
            "Generate N images per prompt for each prior on one decoder (cached and reused on reruns), score each "
            "category as T2I-CompBench does (BLIP-VQA, detector rule, CLIPScore, 3-in-1), compare priors by "
            "PickScore win rate and optionally measure Frechet distance to a reference image folder. Writes "
            "images/, scores.jsonl (per image), results.json and summary.txt under --out."
        ),
    )
    p.add_argument(
        "--prior",
        action="append",
        required=True,
        dest="priors",
        metavar="P",
        help="a prior (run dir, export folder, hub id), repeatable; NAME=P sets its label",
    )
    p.add_argument("--decoder", required=True, help="kandinsky22, karlo or a decoder folder/hub id")
    p.add_argument("--clip", default=None, help="CLIP id or folder when the decoder folder has none")
    p.add_argument(
        "--prompts",
        nargs="+",
        default=None,
        metavar="DIR_OR_FILE",
        help="prompt files (<category>.txt, one prompt a line) or folders of them, e.g. the reference repository's "
        "examples/dataset (default: the T2I-CompBench val prompts shipped with eclipse-prior)",
    )
    p.add_argument(
        "--split",
        default="val",
        choices=["val", "train", "test"],
        help="in a folder of <category>_<split>.txt files, the split to read (default val)",
    )
    p.add_argument("--images-per-prompt", type=int, default=10, help="images per prompt (paper: 10)")
    p.add_argument("--seed", type=int, default=0, help="image j of every prompt uses seed + j")
    p.add_argument("--out", required=True, help="output folder (images cache, scores, results)")
    p.add_argument("--max-prompts", type=int, default=None, help="first K prompts of each file")
    p.add_argument("--categories", nargs="+", default=None, help="only these categories (file names)")
    g = p.add_argument_group("generation")
    g.add_argument("--steps", type=int, default=None, help="decoder steps (pipeline default if unset)")
    g.add_argument(
        "--guidance", type=float, default=None, help="decoder guidance (pipeline default if unset)"
    )
    g.add_argument("--prior-steps", type=int, default=None, help="diffusion-prior steps")
    g.add_argument("--prior-guidance", type=float, default=None, help="diffusion-prior guidance")
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--device", default="auto", help="auto, cpu or cuda (generation and scorers)")
    g.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="generation precision")
    s = p.add_argument_group("scorers (hub id or local folder)")
    s.add_argument("--vqa-model", default=scorer_ids.DEFAULT_VQA_MODEL, help="BLIP VQA for colour/shape/texture")
    s.add_argument(
        "--detector-model",
        default=scorer_ids.DEFAULT_DETECTOR_MODEL,
        help="OWLv2 (default) or Grounding DINO for spatial",
    )
    s.add_argument("--clipscore-model", default=scorer_ids.DEFAULT_CLIPSCORE_MODEL, help="CLIP for non-spatial")
    s.add_argument("--pickscore-model", default=scorer_ids.DEFAULT_PICKSCORE_MODEL, help="PickScore CLIP")
    s.add_argument(
        "--pickscore-processor",
        default=scorer_ids.DEFAULT_PICKSCORE_PROCESSOR,
        help="processor (tokenizer + image processor) PickScore was trained with",
    )
    s.add_argument("--dino-model", default=scorer_ids.DEFAULT_DINO_MODEL, help="DINOv2 for Frechet distance")
    s.add_argument("--reference-images", default=None, help="folder of real images for Frechet distance")
    s.add_argument(
        "--no-inception",
        action="store_true",
        help="skip Inception FID even when torchmetrics + torch-fidelity are installed",
    )
    s.add_argument("--detection-threshold", type=float, default=0.1, help="minimum detector confidence")
    s.add_argument(
        "--scoring",
        default="reference",
        choices=["reference", "corrected"],
        help="T2I-CompBench rules: the reference code's, quirks included (default; comparable with published "
        "numbers), or corrected (on top of scored, whole-word relations, ...; see docs/compbench-fidelity.md)",
    )
    s.add_argument(
        "--spatial-confidence-weighting",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the reference UniDet formula 0.25*conf1 + 0.25*conf2 + position/2, 0 below 0.5 (default on)",
    )
    s.add_argument(
        "--noun-phrases",
        default="auto",
        choices=["auto", "spacy", "rules"],
        help="auto: shipped spaCy parses of the val prompts, spaCy en_core_web_sm for others when installed "
        "(eclipse-prior[compbench]), else the rule chunker; spacy: require spaCy; rules: the rule chunker only",
    )
    s.add_argument("--bootstrap-resamples", type=int, default=1000)
    s.add_argument("--batch-size", type=int, default=8, help="images per DINOv2 batch")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _check_numbers(args: argparse.Namespace) -> None:
    """One-line errors for counts that cannot work, before any model is loaded."""
    from eclipse_prior.errors import ConfigError

    for name in ("images_per_prompt", "max_prompts", "steps", "prior_steps", "height", "width",
                 "bootstrap_resamples", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not 0 <= args.detection_threshold < 1:
        raise ConfigError(f"--detection-threshold must be in [0, 1), got {args.detection_threshold}")


def run(args: argparse.Namespace) -> int:
    from eclipse_prior.evaluation import image_benchmark as ib

    _check_numbers(args)
    cfg = ib.BenchmarkConfig(
        priors=args.priors,
        decoder=args.decoder,
        prompts=args.prompts,
        out=args.out,
        clip=args.clip,
        images_per_prompt=args.images_per_prompt,
        seed=args.seed,
        max_prompts=args.max_prompts,
        categories=args.categories,
        split=args.split,
        steps=args.steps,
        guidance=args.guidance,
        prior_steps=args.prior_steps,
        prior_guidance=args.prior_guidance,
        height=args.height,
        width=args.width,
        device=args.device,
        dtype=args.dtype,
        vqa_model=args.vqa_model,
        detector_model=args.detector_model,
        clipscore_model=args.clipscore_model,
        pickscore_model=args.pickscore_model,
        pickscore_processor=args.pickscore_processor,
        dino_model=args.dino_model,
        reference_images=args.reference_images,
        detection_threshold=args.detection_threshold,
        scoring=args.scoring,
        spatial_confidence_weighting=args.spatial_confidence_weighting,
        noun_phrases=args.noun_phrases,
        inception=not args.no_inception,
        bootstrap_resamples=args.bootstrap_resamples,
        batch_size=args.batch_size,
    )
    result = ib.run_benchmark(cfg, progress=not args.quiet)
    gen = result.generation
    print(f"images: {gen.generated} generated, {gen.reused} reused from {cfg.out}")
    print(result.summary)
    print(f"results: {cfg.out}/results.json, per-image scores: {cfg.out}/scores.jsonl")
    return 0
