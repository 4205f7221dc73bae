"""The image benchmark runner: generate once (cached), score like T2I-CompBench, aggregate with uncertainty.

Stages, each resumable:
1. Generation. Every (prior, category, prompt, image) gets a PNG and a JSON sidecar under
   ``out/images/<prior>/<category>/``. Image ``j`` of every prompt uses seed ``seed + j`` for every prior, so priors are
   compared on the same prompts and seeds. An image whose PNG and sidecar exist and whose recorded request (prior,
   decoder, CLIP, prompt, seed, generation settings) equals the current one is reused, never regenerated.
2. Scoring. Per category as T2I-CompBench's reference code (``compbench``; ``scoring="reference"`` by default, its
   quirks included): BLIP-VQA product for colour/shape/texture, the detector rule for spatial, CLIPScore for
   non-spatial (and any other prompt file), the 3-in-1 mean for complex; PickScore for preference when two or more
   priors are compared; DINOv2 (and optionally Inception) Frechet distance to a reference folder. Per-image scores
   go to ``out/scores.jsonl``; a rerun reuses a record whose image hash and scorer settings match.
3. Aggregation: per category and prior the mean with a prompt-level bootstrap 95% interval, the PickScore win-rate
   matrix, the paper's numbers for the decoder, written to ``out/results.json`` and ``out/summary.txt``.

Generation goes through a callable ``(prior, prompt, seed) -> (PIL image, sidecar dict)``, so the cache and the
scoring can run with any generator; :func:`pipeline_generator` is the one backed by ``eclipse_prior.pipelines``.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from eclipse_prior.data.images import open_user_image
from eclipse_prior.errors import ConfigError
from eclipse_prior.evaluation import compbench, frechet, paper_numbers, scorers, stats
from eclipse_prior.outputs import progress as progress_bar

Generator = Callable[[str, str, int], tuple[Image.Image, dict[str, Any]]]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class BenchmarkConfig:
    """Everything a benchmark run depends on; the generation part keys the image cache."""

    priors: list[str]
    decoder: str
    prompts: list[str] | None  # None: the T2I-CompBench val prompts shipped with the package
    out: str
    clip: str | None = None
    images_per_prompt: int = 10
    seed: int = 0
    max_prompts: int | None = None
    categories: list[str] | None = None
    split: str = "val"
    # generation settings (passed to the pipelines; recorded in every sidecar)
    steps: int | None = None
    guidance: float | None = None
    prior_steps: int | None = None
    prior_guidance: float | None = None
    height: int | None = None
    width: int | None = None
    device: str = "auto"
    dtype: str = "fp32"
    # scorers
    vqa_model: str = scorers.DEFAULT_VQA_MODEL
    detector_model: str = scorers.DEFAULT_DETECTOR_MODEL
    clipscore_model: str = scorers.DEFAULT_CLIPSCORE_MODEL
    pickscore_model: str = scorers.DEFAULT_PICKSCORE_MODEL
    pickscore_processor: str = scorers.DEFAULT_PICKSCORE_PROCESSOR
    dino_model: str = scorers.DEFAULT_DINO_MODEL
    reference_images: str | None = None
    detection_threshold: float = 0.1
    scoring: str = "reference"  # the reference's rules, quirks included; "corrected" fixes them
    spatial_confidence_weighting: bool = True
    noun_phrases: str = "auto"
    inception: bool = True
    bootstrap_resamples: int = 1000
    batch_size: int = 8

    def generation_settings(self) -> dict[str, Any]:
        keys = ("steps", "guidance", "prior_steps", "prior_guidance", "height", "width", "dtype")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class ImageItem:
    """One image of the benchmark: who made it, from which prompt and seed, and where it lives."""

    prior: str  # label
    prior_spec: str
    category: str
    prompt_index: int
    prompt: str
    image_index: int
    seed: int
    path: Path

    @property
    def key(self) -> tuple[str, str, int, int]:
        return (self.prior, self.category, self.prompt_index, self.image_index)

    @property
    def sidecar(self) -> Path:
        return self.path.with_suffix(".json")


# ------------------------------------------------------------------------------------------------- planning, cache
def prior_labels(specs: Sequence[str]) -> dict[str, str]:
    """Short unique folder names for priors: ``NAME=PATH`` names it, else the path's or hub id's last part."""
    labels: dict[str, str] = {}
    for spec in specs:
        if "=" in spec and "/" not in spec.split("=", 1)[0]:
            label, path = spec.split("=", 1)
        else:
            label, path = os.path.basename(os.path.normpath(spec)) or "prior", spec
        label = re.sub(r"[^A-Za-z0-9._-]+", "-", label).strip("-.") or "prior"
        base, n = label, 2
        while label in labels:
            label, n = f"{base}-{n}", n + 1
        labels[label] = path
    return labels


def plan_images(
    prompt_sets: Sequence[compbench.PromptSet],
    priors: dict[str, str],
    images_per_prompt: int,
    seed: int,
    out: Path,
) -> list[ImageItem]:
    """All images of the run, prior by prior (so a pipeline is loaded once per prior)."""
    if images_per_prompt < 1:
        raise ConfigError("--images-per-prompt must be at least 1")
    items = []
    for label, spec in priors.items():
        for ps in prompt_sets:
            for i, prompt in enumerate(ps.prompts):
                for j in range(images_per_prompt):
                    path = out / "images" / label / ps.category / f"p{i:04d}_i{j:02d}.png"
                    items.append(ImageItem(label, spec, ps.category, i, prompt, j, seed + j, path))
    return items


def _request(item: ImageItem, base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "prior": item.prior_spec, "prompt": item.prompt, "seed": item.seed}


def _cached(item: ImageItem, request: dict[str, Any]) -> bool:
    if not (item.path.is_file() and item.sidecar.is_file()):
        return False
    try:
        with open(item.sidecar, encoding="utf-8") as f:
            recorded = json.load(f).get("benchmark")
    except (OSError, ValueError, AttributeError):
        return False
    return recorded == json.loads(json.dumps(request))


def _atomic_write_bytes(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, lambda p: p.write_text(text, encoding="utf-8"))


@dataclass
class GenerationReport:
    """How many images a run made and how many it took from the cache."""

    generated: int = 0
    reused: int = 0


def ensure_images(
    items: Sequence[ImageItem], generate: Generator, request_base: dict[str, Any], progress: bool = True
) -> GenerationReport:
    """Generate the images that are missing or were made with other settings; keep the rest.

    The PNG is written first and the sidecar (holding the request) last, both atomically, so an interrupted run
    leaves no image that looks complete.
    """
    report = GenerationReport()
    for item in progress_bar(items, desc="images", unit="img", enabled=progress):
        request = _request(item, request_base)
        if _cached(item, request):
            report.reused += 1
            continue
        image, sidecar = generate(item.prior_spec, item.prompt, item.seed)
        item.path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(item.path, lambda p, im=image: im.save(p, format="PNG"))
        meta = {**sidecar, "benchmark": request}
        _atomic_write_text(item.sidecar, json.dumps(meta, indent=2, sort_keys=True, default=str))
        report.generated += 1
    return report


# ------------------------------------------------------------------------------------------------ real generation
def pipeline_generator(cfg: BenchmarkConfig) -> Generator:
    """A generator backed by ``eclipse_prior.pipelines.generate`` (the ``eclipse-prior generate`` runner).

    Images come one (prompt, seed) at a time with that runner's sidecar (models with revisions, every setting).
    The items are planned prior by prior, so each prior's pipeline is loaded once; the previous one is dropped
    first so two pipelines are never held together.
    """
    from eclipse_prior.pipelines import generate as gen

    keys = ("steps", "guidance", "prior_steps", "prior_guidance", "height", "width")
    settings = gen.GenerationSettings(**{k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None})
    state: dict[str, Any] = {"prior": None, "loaded": None}

    def generate(prior: str, prompt: str, seed: int) -> tuple[Image.Image, dict[str, Any]]:
        if state["prior"] != prior:
            state["loaded"] = None
            gc.collect()
            state["loaded"] = gen.load_pipeline(
                prior, cfg.decoder, cfg.clip, device=cfg.device, dtype=cfg.dtype
            )
            state["prior"] = prior
        ((image, sidecar),) = gen.generate_images(state["loaded"], prompt, [seed], settings)
        return image, sidecar

    return generate


# ------------------------------------------------------------------------------------------------------- scoring
class ScorerSet:
    """The benchmark's judges, each loaded on first use (a run without spatial prompts never loads the detector)
    and kept by model id, so one set can serve several runs (a resumed run, a sweep over settings)."""

    def __init__(self, device: str = "auto") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = device
        self._cache: dict[tuple[Any, ...], Any] = {}

    def _get(self, key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def vqa(self, model: str) -> scorers.BlipVqaScorer:
        return self._get(("vqa", model), lambda: scorers.load_blip_vqa(model, self.device))

    def detector(self, model: str, threshold: float) -> scorers.OwlDetector | scorers.GroundingDinoDetector:
        return self._get(
            ("detector", model, threshold),
            lambda: scorers.load_detector(model, self.device, threshold=threshold),
        )

    def clipscore(self, model: str) -> scorers.ClipSimilarity:
        return self._get(("clipscore", model), lambda: scorers.load_clipscore(model, self.device))

    def pickscore(self, model: str, processor: str) -> scorers.ClipSimilarity:
        return self._get(
            ("pickscore", model, processor), lambda: scorers.load_pickscore(model, processor, self.device)
        )

    def dino(self, model: str) -> scorers.DinoFeatures:
        return self._get(("dino", model), lambda: scorers.load_dino(model, self.device))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _box_dict(box: compbench.Box | None) -> dict[str, float] | None:
    return None if box is None else asdict(box)


def _scorer_settings(
    cfg: BenchmarkConfig, category: str, parse: compbench.Parse, parser: compbench.PromptParser
) -> dict[str, Any]:
    """What a per-image score depends on besides the image: reused only when all of it is unchanged."""
    metric = compbench.CATEGORY_METRIC.get(category, "clipscore")
    s: dict[str, Any] = {
        "metric": metric,
        "scoring": cfg.scoring,
        "parse": parse.source,
        "parser": parser.source_name(parse.source),
    }
    if metric in ("blip_vqa", "3_in_1"):
        s["vqa_model"] = cfg.vqa_model
    if metric in ("spatial", "3_in_1"):
        s.update(
            detector_model=cfg.detector_model,
            detection_threshold=cfg.detection_threshold,
            spatial_confidence_weighting=cfg.spatial_confidence_weighting,
        )
    if metric in ("clipscore", "3_in_1"):
        s["clipscore_model"] = cfg.clipscore_model
    return s


def _attribute(judges: ScorerSet, cfg: BenchmarkConfig, image: Image.Image, parse: compbench.Parse) -> dict[str, Any]:
    questions = compbench.vqa_questions(parse)
    probs = judges.vqa(cfg.vqa_model).yes_probabilities(image, questions)
    return {"questions": questions, "p_yes": probs, "score": compbench.vqa_score(probs, cfg.scoring)}


def _spatial(
    judges: ScorerSet, cfg: BenchmarkConfig, image: Image.Image, parse: compbench.Parse, complex_prompt: bool
) -> dict[str, Any]:
    """Detector boxes for the prompt's two objects, moved to the reference's detector frame, and the spatial rule."""
    query = compbench.spatial_query(parse, complex_prompt, cfg.scoring)
    # under the reference rules a word outside UniDet's class names is never found
    names = [name for name in (query.obj1, query.obj2) if compbench.detectable(name, cfg.scoring)]
    found = judges.detector(cfg.detector_model, cfg.detection_threshold).best_boxes(image, names) if names else []
    by_name = dict(zip(names, found, strict=True))  # the same word twice: the same best box, as in the reference
    width, height = image.size
    box1, box2 = (compbench.to_reference_frame(by_name.get(name), width, height) for name in (query.obj1, query.obj2))
    detail: dict[str, Any] = {
        "query": asdict(query),
        "not_in_detector_vocabulary": [n for n in (query.obj1, query.obj2) if n is not None and n not in by_name],
        "box1": _box_dict(box1),
        "box2": _box_dict(box2),
        "score": compbench.spatial_image_score(
            query.relation, box1, box2, cfg.spatial_confidence_weighting, cfg.scoring
        ),
    }
    if query.obj1 is None or query.obj2 is None or query.relation is None:
        detail["note"] = "the prompt gave no relation or not two objects under the scoring rules: scores 0"
    return detail


def score_item(
    item: ImageItem,
    cfg: BenchmarkConfig,
    judges: ScorerSet,
    parser: compbench.PromptParser,
    prompt_set: compbench.PromptSet,
) -> dict[str, Any]:
    """The category score of one image with the evidence behind it (questions and P(yes), boxes, ...)."""
    image = open_user_image(item.path)
    metric = compbench.CATEGORY_METRIC.get(item.category, "clipscore")
    parse = parser.parse(item.prompt)
    detail: dict[str, Any] = {}
    if metric == "blip_vqa":
        detail["attribute"] = _attribute(judges, cfg, image, parse)
        score = detail["attribute"]["score"]
    elif metric == "spatial":
        detail["spatial"] = _spatial(judges, cfg, image, parse, complex_prompt=False)
        score = detail["spatial"]["score"]
    elif metric == "3_in_1":
        parts = compbench.complex_parts(prompt_set, item.prompt_index, cfg.scoring)
        detail["parts"] = asdict(parts)
        detail["attribute"] = _attribute(judges, cfg, image, parse)
        spatial = non_spatial = None
        if parts.spatial:
            detail["spatial"] = _spatial(judges, cfg, image, parse, complex_prompt=True)
            spatial = detail["spatial"]["score"]
        if parts.non_spatial:
            text = compbench.clipscore_text(parse, complex_prompt=True)
            non_spatial = judges.clipscore(cfg.clipscore_model).scores([image], [text])[0]
            detail["non_spatial"] = {"text": text, "score": non_spatial}
        score = compbench.complex_score(detail["attribute"]["score"], spatial, non_spatial)
    else:
        score = judges.clipscore(cfg.clipscore_model).scores([image], [item.prompt])[0]
    return {"score": float(score), "metric": metric, **detail}


def _load_previous_scores(out: Path) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    """Records of the last finished run (scores.jsonl) and of an interrupted one (scores.partial.jsonl)."""
    found: dict[tuple[str, str, int, int], dict[str, Any]] = {}
    for name in ("scores.jsonl", "scores.partial.jsonl"):
        path = out / name
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    found[(rec["prior"], rec["category"], rec["prompt_index"], rec["image_index"])] = rec
                except (ValueError, KeyError):
                    continue  # a damaged (half-written) line is rescored, not fatal
    return found


def score_images(
    items: Sequence[ImageItem],
    cfg: BenchmarkConfig,
    judges: ScorerSet,
    parser: compbench.PromptParser,
    prompt_sets: Sequence[compbench.PromptSet],
    out: Path,
    with_pickscore: bool,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], int]:
    """Score every image (reusing matching records of a previous run); returns (records, number rescored)."""
    by_cat = {ps.category: ps for ps in prompt_sets}
    previous = _load_previous_scores(out)
    records, rescored = [], 0
    with open(out / "scores.partial.jsonl", "a", encoding="utf-8") as partial:
        for item in progress_bar(items, desc="scoring", unit="img", enabled=progress):
            settings = _scorer_settings(cfg, item.category, parser.parse(item.prompt), parser)
            digest = _sha256(item.path)
            old = previous.get(item.key)
            reusable = old is not None and old.get("sha256") == digest and old.get("settings") == settings
            if (
                reusable
                and with_pickscore
                and old.get("pickscore_model") != [cfg.pickscore_model, cfg.pickscore_processor]
            ):
                reusable = False
            if reusable:
                records.append(old)
                continue
            rec: dict[str, Any] = {
                "prior": item.prior,
                "prior_spec": item.prior_spec,
                "category": item.category,
                "prompt_index": item.prompt_index,
                "prompt": item.prompt,
                "image_index": item.image_index,
                "seed": item.seed,
                "image": str(item.path.relative_to(out)),
                "sha256": digest,
                "settings": settings,
                **score_item(item, cfg, judges, parser, by_cat[item.category]),
            }
            if with_pickscore:
                rec["pickscore"] = judges.pickscore(cfg.pickscore_model, cfg.pickscore_processor).scores(
                    [open_user_image(item.path)], [item.prompt]
                )[0]
                rec["pickscore_model"] = [cfg.pickscore_model, cfg.pickscore_processor]
            records.append(rec)
            rescored += 1
            partial.write(json.dumps(rec, sort_keys=True) + "\n")  # an interrupted scoring resumes from here
            partial.flush()
    _atomic_write_text(out / "scores.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    (out / "scores.partial.jsonl").unlink()
    return records, rescored


# --------------------------------------------------------------------------------------------------- aggregation
def aggregate(
    records: Sequence[dict[str, Any]], n_resamples: int = 1000, seed: int = 0
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{category: {prior: {mean, ci_low, ci_high, n}}}``, intervals from resampling prompts."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["category"], r["prior"]), []).append(r)
    for (cat, prior), recs in groups.items():
        ci = stats.bootstrap_ci(
            [r["score"] for r in recs], [r["prompt_index"] for r in recs], n_resamples=n_resamples, seed=seed
        )
        table.setdefault(cat, {})[prior] = ci.as_dict()
    return table


def preference(records: Sequence[dict[str, Any]], n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """PickScore win rates on items (category, prompt, image index = seed) that every prior has, with
    prompt-level bootstrap 95% intervals."""
    per_prior: dict[str, dict[tuple[str, int, int], float]] = {}
    for r in records:
        if "pickscore" in r:
            per_prior.setdefault(r["prior"], {})[(r["category"], r["prompt_index"], r["image_index"])] = r[
                "pickscore"
            ]
    if len(per_prior) < 2:
        return {}
    common = sorted(set.intersection(*(set(v) for v in per_prior.values())))
    scores = {p: np.array([v[k] for k in common]) for p, v in per_prior.items()}
    prompts = [(cat, i) for cat, i, _ in common]  # resample prompts, as for the category scores
    intervals: dict[str, dict[str, list[float] | None]] = {}
    for a in scores:
        intervals[a] = {}
        for b in scores:
            wins = (scores[a] > scores[b]) + 0.5 * (scores[a] == scores[b])
            ci = stats.bootstrap_ci(wins, prompts, n_resamples=n_resamples, seed=seed) if a != b else None
            intervals[a][b] = None if ci is None else [ci.low, ci.high]
    return {
        "win_rate": stats.win_rate_matrix(scores),
        "win_rate_ci95": intervals,
        "mean_pickscore": {p: float(s.mean()) for p, s in scores.items()},
        "n_items": len(common),
    }


def reference_image_paths(folder: Path) -> list[Path]:
    """Images under the reference folder (recursive); checked before generation so a typo fails at once."""
    if not folder.is_dir():
        raise ConfigError(f"reference image folder {str(folder)!r} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if len(paths) < 2:
        raise ConfigError(f"reference folder {str(folder)!r} needs at least 2 images, found {len(paths)}")
    return paths


def _load_images(paths: Iterable[Path]) -> list[Image.Image]:
    return list(_iter_images(paths))


def _iter_images(paths: Iterable[Path]) -> Iterator[Image.Image]:
    """Through the package's one image decoder: a bad reference image is a one-line error naming it."""
    for p in paths:
        yield open_user_image(p)


def image_quality(
    items: Sequence[ImageItem], cfg: BenchmarkConfig, judges: ScorerSet, reference: Path
) -> tuple[dict[str, Any], list[str]]:
    """Frechet distance of each prior's images to the reference folder on DINOv2 (and Inception) features."""
    notes: list[str] = []
    ref_paths = reference_image_paths(reference)

    def features(paths: Sequence[Path]) -> np.ndarray:
        chunks = [
            judges.dino(cfg.dino_model).features(_load_images(paths[i : i + cfg.batch_size]))
            for i in range(0, len(paths), cfg.batch_size)
        ]
        return np.concatenate(chunks)

    ref_feats = features(ref_paths)
    by_prior: dict[str, list[Path]] = {}
    for it in items:
        by_prior.setdefault(it.prior, []).append(it.path)
    result: dict[str, Any] = {
        "reference": str(reference),
        "n_reference": len(ref_paths),
        "dino": {},
        "inception": {},
    }
    width = ref_feats.shape[1]
    for prior, paths in by_prior.items():
        if len(paths) < 2:
            notes.append(f"Frechet distance skipped for {prior}: needs at least 2 images")
            continue
        result["dino"][prior] = frechet.frechet_distance_features(features(paths), ref_feats)
        if min(len(paths), len(ref_paths)) <= width:
            notes.append(
                f"DINOv2 Frechet distance of {prior} from {len(paths)} images vs {len(ref_paths)} reference images, "
                f"not more than the feature width {width}: biased upward, compare priors only at equal counts"
            )
    if cfg.inception:
        for prior, paths in by_prior.items():
            # images stream from disk: a full benchmark's images would not fit in memory at once
            value, note = frechet.inception_frechet(_iter_images(paths), _iter_images(ref_paths))
            if value is None:
                notes.append(f"{note}: {len(by_prior)} of {len(by_prior)} priors without Inception FID")
                result["inception"] = None
                break
            result["inception"][prior] = value
            result["inception_note"] = note
    return result, notes


# ------------------------------------------------------------------------------------- the reference's own layout
def export_reference_samples(out: Path, dest: Path) -> dict[str, int]:
    """Copy a finished run's images to ``dest/<prior>/<category>/samples/<prompt>_<NNNNNN>.png``, the layout the
    reference scripts read (they take the prompt from the name before the first ``_`` and sort by the number,
    ``prompt_index x images_per_prompt + image_index``), so they can score the very same images.

    Prompts that a file name cannot carry (holding ``_`` or ``/``) are skipped and counted.
    """
    scores = out / "scores.jsonl"
    if not scores.is_file():
        raise ConfigError(f"no scores.jsonl in {str(out)!r}: run benchmark-images there first")
    with open(out / "results.json", encoding="utf-8") as f:
        per_prompt = int(json.load(f)["images_per_prompt"])
    counts = {"copied": 0, "skipped": 0}
    with open(scores, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    for rec in records:
        if "_" in rec["prompt"] or "/" in rec["prompt"] or rec["image_index"] >= per_prompt:
            counts["skipped"] += 1
            continue
        folder = dest / rec["prior"] / rec["category"] / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        number = rec["prompt_index"] * per_prompt + rec["image_index"]
        target = folder / f"{rec['prompt']}_{number:06d}.png"
        _atomic_write_bytes(target, lambda p, src=out / rec["image"]: p.write_bytes(src.read_bytes()))
        counts["copied"] += 1
    return counts


# ---------------------------------------------------------------------------------------------------- reporting
def _fmt(ci: dict[str, Any] | None) -> str:
    return "-" if ci is None else f"{ci['mean']:.4f} [{ci['ci_low']:.4f}, {ci['ci_high']:.4f}]"


def format_summary(results: dict[str, Any]) -> str:
    """A plain-text table per category and prior (95% intervals), paper numbers beside, then preference and FD."""
    priors = results["priors"]
    rows = [["category", "metric", *priors]]
    paper = results.get("paper", {}).get("rows", [])
    rows[0] += [f"paper: {r['model']}" for r in paper]
    for cat, per in results["categories"].items():
        metric = compbench.CATEGORY_METRIC.get(cat, "clipscore")
        line = [cat, metric, *[_fmt(per.get(p)) for p in priors]]
        line += [f"{r['scores'][cat]:.4f}" if cat in r["scores"] else "-" for r in paper]
        rows.append(line)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(
        f"(mean over images, 95% bootstrap interval over prompts; noun phrases: {results['parser']})"
    )
    cb = results.get("compbench")
    if cb:
        lines.append(
            f"(T2I-CompBench scoring: {cb['scoring']} rules; "
            f"{'rules and parser as the reference' if cb['reference_rules'] else 'NOT comparable with published numbers'}"
            f"; scorer models differ, see docs/compbench-fidelity.md)"
        )
    pref = results.get("preference")
    if pref:
        lines += ["", f"PickScore win rate (row beats column, {pref['n_items']} paired images):"]
        w = max(len(p) for p in priors) + 2
        lines.append(" " * w + "".join(p.rjust(w) for p in priors))
        for a in priors:
            cells = [
                "-" if pref["win_rate"][a][b] is None else f"{pref['win_rate'][a][b]:.3f}" for b in priors
            ]
            lines.append(a.ljust(w) + "".join(c.rjust(w) for c in cells))
    quality = results.get("image_quality")
    if quality:
        lines += ["", f"Frechet distance to {quality['reference']} ({quality['n_reference']} images):"]
        for p in priors:
            dino = quality["dino"].get(p)
            inc = (quality.get("inception") or {}).get(p)
            lines.append(
                f"  {p}: DINOv2 {'-' if dino is None else f'{dino:.4f}'}"
                f"  Inception {'-' if inc is None else f'{inc:.4f}'}"
            )
    for note in results.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def compbench_fidelity(
    cfg: BenchmarkConfig, parser: compbench.PromptParser, prompt_sets: Sequence[compbench.PromptSet]
) -> dict[str, Any]:
    """The results header saying how close these scores are to the reference's: scoring mode, parser, scorer
    models, and every reason they cannot be put beside published numbers."""
    prompts = [p for ps in prompt_sets for p in ps.prompts]
    parse_info = parser.describe(prompts)
    why: list[str] = []
    if cfg.scoring != "reference":
        why.append(f"scoring rules {cfg.scoring!r}, not the reference's: not comparable with published numbers")
    if not parse_info["reference_parser"]:
        n = parse_info["prompts_by_source"].get("rules", 0)
        why.append(
            f"{n} prompts parsed by the rule chunker, not spaCy en_core_web_sm: their scores are not comparable "
            "(pip install 'eclipse-prior[compbench]')"
        )
    if not cfg.spatial_confidence_weighting and any(
        compbench.CATEGORY_METRIC.get(ps.category) in ("spatial", "3_in_1") for ps in prompt_sets
    ):
        why.append("spatial confidence weighting off: spatial and complex scores are not the reference's")
    for ps in prompt_sets:
        if ps.category == "complex" and not ps.has_reference_lists:
            why.append(
                f"no 3-in-1 lists beside {ps.path.name} ({ps.path.stem}_spatial.txt, {ps.path.stem}_action.txt): "
                "complex parts chosen by relation words, not the reference's lists"
            )
    return {
        "scoring": cfg.scoring,
        "parser": parse_info,
        "scorer_models": {
            "blip_vqa": cfg.vqa_model,
            "detector": cfg.detector_model,
            "clipscore": cfg.clipscore_model,
        },
        "reference_models": {
            "blip_vqa": "BLIP model_base_vqa_capfilt_large.pth at 480 px (BLIPvqa_eval/configs/vqa.yaml)",
            "detector": "UniDet Unified_learned_OCIM_RS200_6x+2x, confidence threshold 0.5",
            "clipscore": "OpenAI CLIP ViT-B/32",
        },
        "reference_rules": not why,
        "not_comparable_because": why,
        "model_differences": "docs/compbench-fidelity.md lists the differences of the scorer models",
    }


@dataclass
class BenchmarkResult:
    """What ``results.json`` holds, the printed table, and the generation counts."""

    results: dict[str, Any]
    summary: str
    generation: GenerationReport = field(default_factory=GenerationReport)


def run_benchmark(
    cfg: BenchmarkConfig,
    generate: Generator | None = None,
    judges: ScorerSet | None = None,
    progress: bool = True,
) -> BenchmarkResult:
    """Run (or resume) a whole benchmark; ``generate`` replaces the pipelines (tests, custom generators)."""
    if not cfg.priors:
        raise ConfigError("give at least one --prior")
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if cfg.scoring not in compbench.SCORING_MODES:
        raise ConfigError(f"--scoring must be one of {', '.join(compbench.SCORING_MODES)}, not {cfg.scoring!r}")
    skipped_files: list[str] = []
    prompt_sets = compbench.load_prompt_sets(
        cfg.prompts, cfg.categories, cfg.max_prompts, cfg.split, skipped=skipped_files
    )
    if cfg.reference_images:
        reference_image_paths(Path(cfg.reference_images).expanduser())
    parser = compbench.PromptParser(cfg.noun_phrases)
    priors = prior_labels(cfg.priors)
    items = plan_images(prompt_sets, priors, cfg.images_per_prompt, cfg.seed, out)
    request_base = {"decoder": cfg.decoder, "clip": cfg.clip, "generation": cfg.generation_settings()}
    report = ensure_images(items, generate or pipeline_generator(cfg), request_base, progress)

    judges = judges or ScorerSet(cfg.device)
    with_pick = len(priors) >= 2
    notes: list[str] = []
    if skipped_files:
        notes.append(f"skipped {len(skipped_files)} prompt files of T2I-CompBench++ categories not implemented here: "
                     f"{', '.join(skipped_files)}")
    if not with_pick:
        notes.append("PickScore preference skipped: it compares two or more priors")
    records, rescored = score_images(items, cfg, judges, parser, prompt_sets, out, with_pick, progress)
    fidelity = compbench_fidelity(cfg, parser, prompt_sets)
    notes += fidelity["not_comparable_because"]

    results: dict[str, Any] = {
        "config": asdict(cfg),
        "priors": list(priors),
        "prior_specs": priors,
        "decoder": cfg.decoder,
        "clip": cfg.clip,
        "compbench": fidelity,
        "parser": fidelity["parser"]["summary"],
        "images_per_prompt": cfg.images_per_prompt,
        "seed": cfg.seed,
        "prompts": {ps.category: {"file": str(ps.path), "n": len(ps.prompts)} for ps in prompt_sets},
        "generation": {"generated": report.generated, "reused": report.reused},
        "scoring": {"rescored": rescored, "reused": len(records) - rescored},
        "categories": aggregate(records, cfg.bootstrap_resamples, cfg.seed),
        "scorers": {
            k: getattr(cfg, k)
            for k in (
                "vqa_model",
                "detector_model",
                "clipscore_model",
                "pickscore_model",
                "pickscore_processor",
            )
        },
        "spatial": {
            "detection_threshold": cfg.detection_threshold,
            "confidence_weighting": cfg.spatial_confidence_weighting,
            "box_frame": "the reference UniDet input: short side 479, long side at most 480 px",
        },
        "vqa_probability": "p(yes)/(p(yes)+p(no)), teacher-forced answer decoder (as T2I-CompBench vqa_prob)",
    }
    family = paper_numbers.decoder_family(cfg.decoder)
    compbench_files = any(ps.category in compbench.CATEGORIES for ps in prompt_sets)
    if family and compbench_files:
        results["paper"] = {
            "decoder": family,
            "source": "ECLIPSE (arXiv 2312.04655) T2I-CompBench tables",
            "rows": [asdict(r) for r in paper_numbers.PAPER_NUMBERS[family]],
        }
    elif compbench_files:
        notes.append(f"no paper numbers: decoder {cfg.decoder!r} is neither Kandinsky v2.2 nor Karlo")
    if with_pick:
        results["preference"] = preference(records, cfg.bootstrap_resamples, cfg.seed)
    if cfg.reference_images:
        quality, q_notes = image_quality(items, cfg, judges, Path(cfg.reference_images).expanduser())
        results["image_quality"] = quality
        notes += q_notes
    results["notes"] = notes
    summary = format_summary(results)
    _atomic_write_text(out / "results.json", json.dumps(results, indent=2, sort_keys=False, default=str))
    _atomic_write_text(out / "summary.txt", summary + "\n")
    return BenchmarkResult(results, summary, report)
