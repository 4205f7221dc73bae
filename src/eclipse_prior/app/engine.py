"""What the web app runs, without gradio: load a decoder, its CLIP and several priors once; check a request;
draw one column per prior on the same prompt and seeds, and write each image with its `generate` sidecar.

One pipeline (decoder + CLIP) is shared; a column swaps its prior in before drawing, so N priors cost N small
networks, not N decoders. Prior columns draw exactly as ``generate`` does (per image: a CPU generator seeded with
the image's seed, the prior's ``prepare_embeds``, then the decoder), and their sidecars are ``generate``'s own,
so ``eclipse-prior generate --from-sidecar`` remakes the same pixels. The text-embedding column gives the
decoder the raw CLIP text embedding instead of a prior's output (the modality gap a prior bridges); there is no
prior to name, so its JSON has its own format, which ``generate`` refuses rather than draw something else.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from eclipse_prior.errors import ConfigError, EclipsePriorError, ModelNotFoundError

TEXT_COLUMN = "Text embedding (no prior)"
TEXT_SIDECAR_FORMAT = "eclipse-prior-app-text-embedding/1"
MAX_PROMPT_CHARS = 1000
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class Limits:
    """Ranges the page offers and the server enforces (the API can send anything)."""

    max_images: int = 4
    max_steps: int = 100
    max_guidance: float = 20.0
    max_prior_steps: int = 100


@dataclass
class Column:
    """One side-by-side column: a prior (or the raw text embedding) and how to record it in sidecars."""

    name: str
    prior: Any = None
    prior_scheduler: Any = None
    loaded: Any = None  # generate.LoadedPipeline carrying this column's model records
    error: str | None = None  # why the prior could not be used; shown in its column

    @property
    def is_text(self) -> bool:
        return self.name == TEXT_COLUMN


@dataclass
class Request:
    """One click of Generate: what the page sent, checked by :meth:`Engine.check`."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    num_images: int = 1
    steps: int = 25
    guidance: float = 4.0
    size: int | None = None  # Kandinsky only (square)
    prior_steps: int = 25
    prior_guidance: float = 4.0


@dataclass
class ColumnResult:
    """A column's images (PNG paths, each with its JSON beside it) and timings, or the message why not."""

    name: str
    images: list[Path] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    prior_seconds: float = 0.0
    total_seconds: float = 0.0
    error: str | None = None


def parse_prior_specs(specs: list[str]) -> list[tuple[str, str]]:
    """``NAME=PATH`` (or a bare PATH, named by its last part) -> (name, spec); names must be unique."""
    out: list[tuple[str, str]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec.rstrip("/")).name or spec, spec
        name, path = name.strip(), path.strip()
        if not name or not path:
            raise ConfigError(f"--prior {spec!r}: expected NAME=PATH (a run dir, export folder or hub id)")
        if name in (n for n, _ in out) or name == TEXT_COLUMN:
            raise ConfigError(f"--prior name {name!r} is used twice; give each prior its own NAME=")
        out.append((name, path))
    return out


def _one_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _loads(spec: str, local_files_only: bool | None) -> bool:
    """Whether a prior loads on its own (to tell a bad prior from a bad decoder or CLIP)."""
    from eclipse_prior.pipelines.generate import load_any_prior, resolve_model

    try:
        load_any_prior(Path(resolve_model(spec, "prior", None, local_files_only).path), torch.float32,
                       local_files_only)
    except EclipsePriorError:
        return False
    return True


class Engine:
    """The loaded models and the drawing; thread-safe (one request draws at a time)."""

    def __init__(self, priors: list[tuple[str, str | None]], decoder: str, clip: str | None, out_dir: str | Path,
                 device: str = "cpu", dtype: str = "fp32", local_files_only: bool | None = None,
                 text_column: bool = True, limits: Limits = Limits(),
                 default_steps: int | None = None, default_guidance: float | None = None) -> None:
        from eclipse_prior.pipelines.common import IncompatibleModelsError, check_widths
        from eclipse_prior.pipelines.generate import (
            LoadedPipeline,
            load_any_prior,
            load_pipeline,
            resolve_model,
        )

        self.limits, self.out_dir, self.lock = limits, Path(out_dir), threading.Lock()
        self.default_steps, self.default_guidance = default_steps, default_guidance
        self.columns: list[Column] = []
        base = None
        for name, spec in priors:
            try:
                if base is None:  # the first prior that fits builds the shared pipeline (decoder + CLIP)
                    if spec is not None:  # a prior that cannot load is this column's problem, not the app's
                        load_any_prior(Path(resolve_model(spec, "prior", None, local_files_only).path),
                                       torch.float32, local_files_only)
                    base = load_pipeline(spec, decoder, clip, device=device, dtype=dtype,
                                         local_files_only=local_files_only)
                    column = Column(name, base.pipe.prior, base.pipe.prior_scheduler, base)
                else:
                    record = resolve_model(spec, "prior", None, local_files_only)
                    prior, scheduler = load_any_prior(Path(record.path), base.pipe.text_encoder.dtype,
                                                      local_files_only)
                    check_widths(prior, base.pipe.text_encoder, base.pipe.decoder_embedding_width,
                                 "Karlo" if base.kind == "karlo" else "Kandinsky v2.2")
                    column = Column(name, prior.to(base.pipe.device), scheduler,
                                    LoadedPipeline(base.pipe, base.kind, {**base.models, "prior": record},
                                                   type(prior).__name__, base.device, base.dtype))
            except (IncompatibleModelsError, ModelNotFoundError, ConfigError) as err:
                if base is None and not isinstance(err, IncompatibleModelsError) \
                        and (spec is None or _loads(spec, local_files_only)):
                    raise  # the decoder, the CLIP or the decoder's default prior failed: nothing can be drawn
                column = Column(name, error=f"prior {spec or '(the decoder default)'} cannot be used: "
                                            f"{_one_line(err)}")
            self.columns.append(column)
        if base is None:
            raise ConfigError("no prior fits the decoder: " + "; ".join(c.error or "" for c in self.columns))
        self.base = base
        self.pipe, self.kind = base.pipe, base.kind
        if text_column:
            self.columns.append(Column(TEXT_COLUMN, loaded=base))  # its sidecars drop the prior (see _column)
        self._requests = 0

    # ---- what the page needs to know -------------------------------------------------------------------------
    @property
    def sizes(self) -> tuple[int, int, int] | None:
        """(multiple, native, largest) square sizes for Kandinsky; None when the decoder's size is fixed."""
        if self.kind == "karlo":
            return None
        from eclipse_prior.pipelines.generate import kandinsky_size_multiple
        from eclipse_prior.training.validation_images import native_size

        multiple, native = kandinsky_size_multiple(self.pipe.movq), native_size(self.pipe, self.kind)
        return multiple, native, max(2 * native, 1024 if native >= 512 else 2 * native)

    def defaults(self) -> Request:
        """The page's initial settings: the given defaults, else the decoder's paper settings (Kandinsky 50 steps,
        guidance 7.5; Karlo 25, 8.0), at the decoder's native size."""
        from eclipse_prior.pipelines.generate import DECODERS

        preset = DECODERS[self.kind]
        sizes = self.sizes
        return Request(prompt="", steps=min(self.default_steps or preset.steps, self.limits.max_steps),
                       guidance=self.default_guidance or preset.guidance, size=sizes[1] if sizes else None)

    # ---- checking ------------------------------------------------------------------------------------------------
    def check(self, request: Request) -> Request:
        """A cleaned copy of the request, or a ConfigError saying what to change (shown in the page)."""
        lim = self.limits
        prompt = (request.prompt or "").strip()
        negative = (request.negative_prompt or "").strip()
        if not prompt:
            raise ConfigError("enter a prompt")
        for what, text in (("prompt", prompt), ("negative prompt", negative)):
            if len(text) > MAX_PROMPT_CHARS:
                raise ConfigError(f"the {what} is {len(text)} characters long; at most {MAX_PROMPT_CHARS}")
            tokens = len(self.pipe.tokenizer(text, truncation=False).input_ids)
            if tokens > self.pipe.tokenizer.model_max_length:
                raise ConfigError(f"the {what} is {tokens} tokens long but this CLIP reads at most "
                                  f"{self.pipe.tokenizer.model_max_length}; shorten it")

        def integer(name: str, value: Any, low: int, high: int) -> int:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a whole number, got {value!r}") from None
            if not number.is_integer() or not low <= number <= high:
                raise ConfigError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
            return int(number)

        def real(name: str, value: Any, low: float, high: float) -> float:
            try:
                number = float(value)
            except (TypeError, ValueError):
                raise ConfigError(f"{name} must be a number, got {value!r}") from None
            if not low <= number <= high:
                raise ConfigError(f"{name} must be from {low:g} to {high:g}, got {value!r}")
            return number

        size = None
        if self.sizes is not None:
            multiple, native, largest = self.sizes
            size = native if request.size in (None, "") else integer("size", request.size, multiple, largest)
            if size % multiple:
                raise ConfigError(f"size must be a multiple of {multiple} for this decoder, got {size}")
        elif request.size not in (None, "", self.pipe.image_size):
            raise ConfigError(f"the Karlo decoder draws at a fixed {self.pipe.image_size} px")
        return Request(prompt=prompt, negative_prompt=negative,
                       seed=integer("seed", request.seed, 0, MAX_SEED),
                       num_images=integer("number of images", request.num_images, 1, lim.max_images),
                       steps=integer("decoder steps", request.steps, 1, lim.max_steps),
                       guidance=real("decoder guidance", request.guidance, 1.0, lim.max_guidance),
                       size=size,
                       prior_steps=integer("prior steps", request.prior_steps, 1, lim.max_prior_steps),
                       prior_guidance=real("prior guidance", request.prior_guidance, 1.0, lim.max_guidance))

    # ---- drawing -------------------------------------------------------------------------------------------------
    def settings(self, request: Request) -> Any:
        from eclipse_prior.pipelines.generate import GenerationSettings

        return GenerationSettings(steps=request.steps, guidance=request.guidance, prior_steps=request.prior_steps,
                                  prior_guidance=request.prior_guidance, height=request.size, width=request.size,
                                  negative_prompt=request.negative_prompt or None).resolved(self.base)

    def generate(self, request: Request) -> tuple[Request, list[ColumnResult]]:
        """Check the request, then draw every column; image k of each column gets seed + k."""
        request = self.check(request)
        settings = self.settings(request)
        from eclipse_prior.pipelines.generate import _slug

        with self.lock:
            self._requests += 1
            folder = self.out_dir / f"request-{self._requests:05d}-{int(time.time())}"
            return request, [self._column(c, request, settings, folder / _slug(c.name)) for c in self.columns]

    @torch.no_grad()
    def _column(self, column: Column, request: Request, settings: Any, folder: Path) -> ColumnResult:
        from eclipse_prior.pipelines.generate import _decode, _sidecar, _slug, save_image

        result = ColumnResult(column.name)
        if column.error is not None:
            result.error = column.error
            return result
        start = time.perf_counter()
        pipe = self.pipe
        if not column.is_text:
            pipe.register_modules(prior=column.prior, prior_scheduler=column.prior_scheduler)
        try:
            for k in range(request.num_images):
                seed = request.seed + k
                gen = torch.Generator("cpu").manual_seed(seed)
                t0 = time.perf_counter()
                if column.is_text:
                    embeds = self._text_embeds(request.prompt, settings.negative_prompt)
                else:
                    embeds = pipe.prepare_embeds(request.prompt, settings.negative_prompt, gen,
                                                 settings.prior_steps, settings.prior_guidance)
                result.prior_seconds += time.perf_counter() - t0
                image = _decode(column.loaded, embeds, gen, settings)
                sidecar = _sidecar(column.loaded, settings, request.prompt, seed)
                if column.is_text:
                    sidecar["format"] = TEXT_SIDECAR_FORMAT
                    sidecar["models"]["prior"] = None
                    sidecar["image_embeds"] = "the CLIP text embedding of the prompt (no prior)"
                png = save_image(image, sidecar, folder / f"{k:05d}-{_slug(request.prompt)}-s{seed}.png")
                result.images.append(png)
                result.sidecars.append(png.with_suffix(".json"))
        except EclipsePriorError as err:
            result.error = _one_line(err)
        result.total_seconds = time.perf_counter() - start
        return result

    def _text_embeds(self, prompt: str, negative_prompt: str | None) -> Any:
        """The decoder input with the raw text embedding where a prior's output would be."""
        pipe = self.pipe
        text = pipe._encode([prompt])
        if self.kind == "karlo":
            from eclipse_prior.pipelines.karlo import KarloEmbeds

            return KarloEmbeds(text.embeds, text, pipe._encode([negative_prompt or ""]))
        from eclipse_prior.pipelines.kandinsky import KandinskyEmbeds

        negative = pipe.zero_image_embeds(1) if negative_prompt is None else pipe._encode([negative_prompt]).embeds
        return KandinskyEmbeds(text.embeds, negative)
