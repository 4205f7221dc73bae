"""EclipseKandinskyV22Pipeline / EclipseKarloPipeline on tiny random decoders saved and loaded back.

What is checked is behaviour users rely on: seeds reproduce pixels, the decoder receives exactly the prior's
embedding, the negative embedding rule, the original diffusion prior matching diffusers' own prior pipeline,
and incompatible widths failing with one clear line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from eclipse_prior.errors import ConfigError
from eclipse_prior.models import DiffusionPrior, EclipsePrior
from eclipse_prior.pipelines.common import IncompatibleModelsError, encode_prompts
from eclipse_prior.pipelines.generate import load_pipeline
from eclipse_prior.pipelines.kandinsky import EclipseKandinskyV22Pipeline
from eclipse_prior.pipelines.karlo import EclipseKarloPipeline
from eclipse_prior.pipelines.tiny import save_tiny_kandinsky_decoder, save_tiny_karlo_decoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZE, STEPS = 32, 2


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_clip_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    torch.manual_seed(0)
    EclipsePrior.from_preset("tiny", embedding_dim=32, num_embeddings=77).save_pretrained(root / "prior")
    return {
        "clip": tiny_clip_dir,
        "prior": root / "prior",
        "kandinsky": save_tiny_kandinsky_decoder(root / "kandinsky"),
        "karlo": save_tiny_karlo_decoder(root / "karlo", tiny_clip_dir),
        "root": root,
    }


@pytest.fixture(scope="module")
def kandinsky(folders) -> EclipseKandinskyV22Pipeline:
    """Built by the runner from folders, saved with save_pretrained and loaded back through our class."""
    built = load_pipeline(str(folders["prior"]), str(folders["kandinsky"]), str(folders["clip"])).pipe
    built.save_pretrained(folders["root"] / "kandinsky_pipeline")
    pipe = EclipseKandinskyV22Pipeline.from_pretrained(folders["root"] / "kandinsky_pipeline")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pixels(images) -> np.ndarray:
    return np.asarray(images[0], dtype=np.int16)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def test_kandinsky_seeds_and_the_decoder_gets_exactly_the_prior_output(kandinsky):
    pipe = kandinsky
    assert isinstance(pipe.prior, EclipsePrior)
    seen = []
    forward = pipe.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["added_cond_kwargs"]["image_embeds"].clone())
        return forward(*args, **kwargs)

    pipe.unet.forward = spy
    try:
        kw = dict(height=SIZE, width=SIZE, num_inference_steps=STEPS)
        a = pipe("a red square", generator=_gen(0), **kw)
        n_calls = len(seen)
        b = pipe("a red square", generator=_gen(0), **kw)
        c = pipe("a red square", generator=_gen(1), **kw)
    finally:
        del pipe.unet.forward
    assert a.images[0].size == (SIZE, SIZE)
    assert np.array_equal(_pixels(a.images), _pixels(b.images))
    assert np.abs(_pixels(a.images) - _pixels(c.images)).max() > 0

    # Independently: the prior's one pass on the text encoding with the same generator.
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red square"], pipe.device)
    expected = pipe.prior.generate_embeds(enc.embeds, enc.states, enc.mask, generator=_gen(0))
    assert torch.equal(a.image_embeds, expected)
    # Negative = the CLIP image embedding of all-zero pixel values (diffusers' get_zero_embed).
    size = pipe.image_encoder.config.image_size
    zero = pipe.image_encoder(torch.zeros(1, 3, size, size)).image_embeds
    assert torch.equal(a.negative_image_embeds, zero)
    # Every UNet call of the first image received [negative, positive] exactly (guidance 7.5 > 1).
    assert n_calls == STEPS
    for got in seen[:n_calls]:
        assert torch.equal(got, torch.cat([zero, expected]))


def test_negative_prompt_goes_through_the_prior(kandinsky):
    pipe = kandinsky
    embeds = pipe.prepare_embeds("a red square", negative_prompt="a blue circle", generator=_gen(3))
    gen = _gen(3)  # the positive prompt draws first, then the negative one, from the same generator
    pos = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red square"], pipe.device)
    neg = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a blue circle"], pipe.device)
    assert torch.equal(embeds.image_embeds, pipe.prior.generate_embeds(pos.embeds, pos.states, pos.mask, gen))
    assert torch.equal(
        embeds.negative_image_embeds, pipe.prior.generate_embeds(neg.embeds, neg.states, neg.mask, gen)
    )
    assert not torch.equal(embeds.negative_image_embeds, pipe.zero_image_embeds(1))


def test_diffusion_prior_runs_with_its_steps_and_guidance(kandinsky):
    pipe = kandinsky
    torch.manual_seed(0)
    baseline = DiffusionPrior.from_preset("tiny", embedding_dim=32, num_embeddings=77).eval()
    swapped = EclipseKandinskyV22Pipeline(**{**pipe.components, "prior": baseline})
    got = swapped.prepare_embeds(
        "a red square", generator=_gen(5), prior_num_inference_steps=3, prior_guidance_scale=4.0
    )
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red square"], pipe.device)
    want = baseline.generate_embeds(enc.embeds, enc.states, enc.mask, _gen(5), 3, 4.0)
    assert torch.equal(got.image_embeds, want)


def test_original_diffusion_prior_matches_diffusers_prior_pipeline(kandinsky, folders):
    """A Kandinsky-style PriorTransformer + UnCLIPScheduler gives what KandinskyV22PriorPipeline gives."""
    from diffusers import KandinskyV22PriorPipeline, PriorTransformer, UnCLIPScheduler
    from transformers import AutoImageProcessor

    pipe = kandinsky
    torch.manual_seed(0)
    prior = PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=1,
        embedding_dim=32,
        num_embeddings=77,
        additional_embeddings=4,
    ).eval()
    scheduler = UnCLIPScheduler(
        variance_type="fixed_small_log", prediction_type="sample", clip_sample=True, clip_sample_range=10.0
    )
    ours = EclipseKandinskyV22Pipeline(**{**pipe.components, "prior": prior, "prior_scheduler": scheduler})
    got = ours.prepare_embeds("a red square", generator=_gen(2), prior_num_inference_steps=3)
    reference = KandinskyV22PriorPipeline(
        prior=prior,
        image_encoder=pipe.image_encoder,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=scheduler,
        image_processor=AutoImageProcessor.from_pretrained(folders["clip"]),
    )
    reference.set_progress_bar_config(disable=True)
    want = reference("a red square", generator=_gen(2), num_inference_steps=3, guidance_scale=4.0)
    assert torch.equal(got.image_embeds, want.image_embeds)
    assert torch.equal(got.negative_image_embeds, want.negative_image_embeds)

    # Saved in the kandinsky-community/kandinsky-2-2-prior layout, it loads by path as a --prior.
    reference.save_pretrained(folders["root"] / "original_prior")
    loaded = load_pipeline(
        str(folders["root"] / "original_prior"), str(folders["kandinsky"]), str(folders["clip"])
    )
    assert loaded.prior_class == "PriorTransformer"
    assert isinstance(loaded.pipe.prior_scheduler, UnCLIPScheduler)
    again = loaded.pipe.prepare_embeds("a red square", generator=_gen(2), prior_num_inference_steps=3)
    assert torch.equal(again.image_embeds, want.image_embeds)


def test_prior_of_the_wrong_width_fails_with_one_line(kandinsky):
    narrow = EclipsePrior.from_preset("tiny", embedding_dim=16, num_embeddings=77)
    with pytest.raises(IncompatibleModelsError) as err:
        EclipseKandinskyV22Pipeline(**{**kandinsky.components, "prior": narrow})
    message = str(err.value)
    assert "width 16" in message and "width 32" in message and "\n" not in message
    assert isinstance(err.value, ConfigError)


def test_offload_needs_a_gpu(kandinsky):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: offload is allowed")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        kandinsky.enable_offload("model")


def test_karlo_round_trip_seeds_and_decoder_input(folders):
    built = load_pipeline(str(folders["prior"]), str(folders["karlo"])).pipe
    built.save_pretrained(folders["root"] / "karlo_pipeline")
    pipe = EclipseKarloPipeline.from_pretrained(folders["root"] / "karlo_pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.image_size == 32

    seen = []
    forward = pipe.text_proj.forward

    def spy(**kwargs):
        seen.append(kwargs["image_embeddings"].clone())
        return forward(**kwargs)

    pipe.text_proj.forward = spy
    try:
        kw = dict(num_inference_steps=STEPS, super_res_num_inference_steps=STEPS)
        a = pipe("a red square", generator=_gen(0), **kw)
        b = pipe("a red square", generator=_gen(0), **kw)
        c = pipe("a red square", generator=_gen(1), **kw)
    finally:
        del pipe.text_proj.forward
    assert a.images[0].size == (32, 32)
    assert np.array_equal(_pixels(a.images), _pixels(b.images))
    assert np.abs(_pixels(a.images) - _pixels(c.images)).max() > 0
    enc = encode_prompts(pipe.tokenizer, pipe.text_encoder, ["a red square"], pipe.device)
    expected = pipe.prior.generate_embeds(enc.embeds, enc.states, enc.mask, generator=_gen(0))
    assert torch.equal(a.image_embeds, expected)
    assert torch.equal(seen[0], expected)  # text_proj adds its learned unconditional embedding itself

    narrow = EclipsePrior.from_preset("tiny", embedding_dim=16, num_embeddings=77)
    with pytest.raises(IncompatibleModelsError, match="width 16 but the Karlo decoder expects width 32"):
        EclipseKarloPipeline(**{**pipe.components, "prior": narrow})


def test_karlo_with_its_own_diffusion_prior_reproduces_diffusers_unclip(folders):
    """Karlo's PriorTransformer loaded by path as --prior gives the same pixels as diffusers' UnCLIPPipeline."""
    import json

    from diffusers import PriorTransformer, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip import UnCLIPPipeline

    torch.manual_seed(0)
    folder = folders["root"] / "karlo_prior"
    PriorTransformer(
        num_attention_heads=2, attention_head_dim=16, num_layers=1, embedding_dim=32, num_embeddings=77,
        additional_embeddings=4,
    ).save_pretrained(folder / "prior")  # fmt: skip
    UnCLIPScheduler(
        variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0
    ).save_pretrained(folder / "prior_scheduler")
    index = {"prior": ["diffusers", "PriorTransformer"], "prior_scheduler": ["diffusers", "UnCLIPScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index))

    loaded = load_pipeline(str(folder), str(folders["karlo"]))
    pipe = loaded.pipe
    assert loaded.prior_class == "PriorTransformer"
    kw = dict(num_inference_steps=STEPS, super_res_num_inference_steps=STEPS, prior_num_inference_steps=3)
    ours = pipe("a red square", generator=_gen(4), **kw)
    reference = UnCLIPPipeline(
        prior=pipe.prior, decoder=pipe.decoder, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
        text_proj=pipe.text_proj, super_res_first=pipe.super_res_first, super_res_last=pipe.super_res_last,
        prior_scheduler=pipe.prior_scheduler, decoder_scheduler=pipe.decoder_scheduler,
        super_res_scheduler=pipe.super_res_scheduler,
    )  # fmt: skip
    reference.set_progress_bar_config(disable=True)
    theirs = reference(
        "a red square", generator=_gen(4), prior_num_inference_steps=3, decoder_num_inference_steps=STEPS,
        super_res_num_inference_steps=STEPS,
    )  # fmt: skip
    assert np.array_equal(_pixels(ours.images), _pixels(theirs.images))
