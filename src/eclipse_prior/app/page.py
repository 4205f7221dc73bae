"""The Gradio page of `eclipse-prior app`: inputs, example prompts, one column per prior, the generate handler.

The handler never lets an exception reach Gradio: a request the engine refuses (empty or over-long prompt,
numbers out of range, a size the decoder cannot make) is a one-line message above the columns; a column whose
prior cannot be used says so in its column; an unexpected error is logged in full on the server and reported in
one line, and the app keeps serving.
"""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any

import gradio as gr

from eclipse_prior.app.engine import MAX_SEED, TEXT_COLUMN, Engine, Request
from eclipse_prior.errors import EclipsePriorError

#: Example prompts for real decoders (T2I-CompBench's kinds: colour, shape, texture, spatial, non-spatial).
REAL_EXAMPLES = ("a green bench and a red car", "a round clock and a square picture frame",
                 "a fluffy towel and a glass cup", "a dog on the left of a yellow chair",
                 "a man riding a bicycle in the rain")


def theme() -> Any:
    """Gradio's default look with the browser's own fonts: the stock theme would fetch Inter from a font CDN."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "SFMono-Regular", "monospace"])


def example_prompts(shapes_world: bool) -> list[tuple[str, bool]]:
    """(prompt, is a held-out composition): the shapes demo's prompts, with the compositions its priors never saw."""
    if not shapes_world:
        return [(p, False) for p in REAL_EXAMPLES]
    from eclipse_prior.shapes.captions import parse_caption
    from eclipse_prior.shapes.demo import PROMPTS
    from eclipse_prior.shapes.holdout import load_holdout
    from eclipse_prior.shapes.metrics import composition_held_out

    holdout = load_holdout(None)
    return [(p, composition_held_out(parse_caption(p), holdout)) for p in PROMPTS]


def column_note(engine: Engine, index: int, shapes_world: bool) -> str:
    """What a column shows, in one line under its title."""
    column = engine.columns[index]
    if column.is_text:
        return "the raw CLIP text embedding given to the decoder (no prior): the modality gap a prior bridges"
    if column.error is not None:
        return "not available"
    prior = column.loaded.models["prior"]
    if shapes_world and column.name in ("ECLIPSE", "Diffusion-Baseline") and index < 2:
        return {"ECLIPSE": "shipped ECLIPSE prior (lam 0.2): one pass",
                "Diffusion-Baseline": "same network as an x0 diffusion prior: prior steps x 2 passes (guidance)"
                }[column.name]
    where = prior.id if prior is not None else "the decoder's released ECLIPSE prior"
    return f"{column.loaded.prior_class} from `{where}`"


def _timing(prior_s: float, total_s: float, n: int) -> str:
    return f"prior **{1000 * prior_s / max(n, 1):.1f} ms**/image · column total **{total_s:.2f} s**"


def build_page(engine: Engine, shapes_world: bool) -> gr.Blocks:
    """The page; its Generate event is also the API endpoint ``/generate`` (gradio_client)."""
    defaults, limits, sizes = engine.defaults(), engine.limits, engine.sizes
    examples = example_prompts(shapes_world)
    columns = engine.columns
    with gr.Blocks(title="eclipse-prior app", analytics_enabled=False) as demo:
        world = "the offline shapes world (shipped CLIP, decoder and priors)" if shapes_world else "your models"
        gr.Markdown(f"## eclipse-prior: text-to-image priors side by side\nOne prompt, the same seeds, one column "
                    f"per prior, on {world}. Each image downloads with the JSON sidecar that "
                    "`eclipse-prior generate --from-sidecar FILE` remakes it from.")
        with gr.Row():
            with gr.Column(scale=4):
                prompt = gr.Textbox(label="Prompt", elem_id="prompt", max_lines=2,
                                    placeholder=examples[0][0] if examples else "")
                negative = gr.Textbox(label="Negative prompt (optional)", elem_id="negative", max_lines=2)
            with gr.Column(scale=1, min_width=140):
                button = gr.Button("Generate", variant="primary", elem_id="generate")
        with gr.Row():
            seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed")
            num_images = gr.Slider(1, limits.max_images, value=1, step=1, label="Images per column",
                                   elem_id="num-images")
            steps = gr.Slider(1, limits.max_steps, value=defaults.steps, step=1, label="Decoder steps",
                              elem_id="steps")
            guidance = gr.Slider(1.0, limits.max_guidance, value=defaults.guidance, step=0.5,
                                 label="Decoder guidance", elem_id="guidance")
            size = gr.Slider(sizes[0] if sizes else 0, sizes[2] if sizes else 0, value=defaults.size or 0,
                             step=sizes[0] if sizes else 1, label="Size (px, square)", elem_id="size",
                             visible=sizes is not None)
        with gr.Accordion("Diffusion prior sampling (ECLIPSE priors ignore these)", open=False):
            with gr.Row():
                prior_steps = gr.Slider(1, limits.max_prior_steps, value=defaults.prior_steps, step=1,
                                        label="Prior steps")
                prior_guidance = gr.Slider(1.0, limits.max_guidance, value=defaults.prior_guidance, step=0.5,
                                           label="Prior guidance")
        gr.Examples(examples=[[p] for p, _ in examples], inputs=[prompt], label="Example prompts",
                    example_labels=[f"{p}  [held-out composition]" if held else p for p, held in examples])
        if shapes_world:
            gr.Markdown("Held-out compositions were withheld from the priors' training pairs (the CLIP and the "
                        "decoder saw the whole world): they show whether a prior generalises.")
        status = gr.Markdown(elem_id="status")
        outputs: list[Any] = [status]
        with gr.Row(equal_height=False):
            for i, column in enumerate(columns):
                with gr.Column(min_width=180):
                    gr.Markdown(f"### {column.name}\n{column_note(engine, i, shapes_world)}")
                    if column.error is not None:
                        gr.Markdown(f"**Unavailable:** {column.error}", elem_id=f"column-error-{i}")
                    gallery = gr.Gallery(show_label=False, elem_id=f"gallery-{i}", columns=2, height="auto",
                                         object_fit="contain", preview=False, interactive=False)
                    timing = gr.Markdown(elem_id=f"timing-{i}")
                    files = gr.File(label="PNG + JSON sidecar", file_count="multiple", elem_id=f"files-{i}",
                                    interactive=False)
                    outputs += [gallery, timing, files]

        def on_generate(prompt_text: str, negative_text: str, seed_value: Any, n: Any, steps_value: Any,
                        guidance_value: Any, size_value: Any, prior_steps_value: Any,
                        prior_guidance_value: Any) -> list[Any]:
            blank = [None, "", None] * len(columns)
            request = Request(prompt_text, negative_text, seed_value, n, steps_value, guidance_value,
                              size_value if sizes is not None else None, prior_steps_value, prior_guidance_value)
            t0 = time.perf_counter()
            try:
                checked, results = engine.generate(request)
            except EclipsePriorError as err:
                return [f"**Cannot draw:** {err}", *blank]
            except Exception as err:  # a bug: full traceback in the server log, one line here, keep serving
                traceback.print_exc(file=sys.stderr)
                return [f"**Internal error** ({type(err).__name__}; details in the server log).", *blank]
            values: list[Any] = [
                f"Drew {checked.num_images} image(s) per column (seeds {checked.seed}-"
                f"{checked.seed + checked.num_images - 1}) in {time.perf_counter() - t0:.2f} s."]
            for result in results:
                if result.error is not None:
                    values += [None, f"**Unavailable:** {result.error}", None]
                    continue
                gallery_items = [(str(png), f"seed {checked.seed + k}") for k, png in enumerate(result.images)]
                downloads = [str(p) for pair in zip(result.images, result.sidecars, strict=True) for p in pair]
                values += [gallery_items, _timing(result.prior_seconds, result.total_seconds, len(result.images))
                           if result.name != TEXT_COLUMN else f"column total **{result.total_seconds:.2f} s**",
                           downloads]
            return values

        inputs = [prompt, negative, seed, num_images, steps, guidance, size, prior_steps, prior_guidance]
        button.click(on_generate, inputs, outputs, api_name="generate", concurrency_limit=1)
        prompt.submit(on_generate, inputs, outputs, api_visibility="private", concurrency_limit=1)
    return demo
