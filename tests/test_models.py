"""Prior networks: released layout, presets, masking, round trips, diffusion sampling, loading."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import PriorTransformer
from safetensors.torch import save_file

from eclipse_prior.errors import ConfigError, ModelNotFoundError
from eclipse_prior.models import PRESETS, DiffusionPrior, EclipsePrior, load_prior

# The config.json published with ECLIPSE-Community/ECLIPSE_KandinskyV22_Prior (fields and values).
RELEASED_KANDINSKY_CONFIG = {
    "_class_name": "PriorTransformer",
    "_diffusers_version": "0.20.2",
    "added_emb_type": "prd",
    "additional_embeddings": 3,
    "attention_head_dim": 32,
    "clip_embed_dim": None,
    "dropout": 0.0,
    "embedding_dim": 1280,
    "embedding_proj_dim": None,
    "embedding_proj_norm_type": None,
    "encoder_hid_proj_type": "linear",
    "norm_in_type": None,
    "num_attention_heads": 16,
    "num_embeddings": 77,
    "num_layers": 10,
}


def _inputs(model, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    e, n = model.config.embedding_dim, model.config.num_embeddings
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[:, n // 2 :] = False
    return {
        "hidden_states": torch.randn(batch, e, generator=g),
        "proj_embedding": torch.randn(batch, e, generator=g),
        "encoder_hidden_states": torch.randn(batch, n, e, generator=g) if n else None,
        "attention_mask": mask if n else None,
    }


def _released_keys(**cfg) -> set[str]:
    """The released checkpoint's keys: diffusers PriorTransformer minus its time embedding."""
    with torch.device("meta"):  # keys only: skip allocating and initialising weights
        keys = PriorTransformer(**cfg).state_dict().keys()
    return {k for k in keys if not k.startswith(("time_proj.", "time_embedding."))}


@pytest.mark.parametrize("name,count", [("kandinsky22", 34_193_152), ("karlo", 33_143_040)])
def test_released_parameter_counts_and_keys(name, count):
    with torch.device("meta"):
        model = EclipsePrior.from_preset(name)
    assert sum(p.numel() for p in model.parameters()) == count
    cfg = {k: model.config[k] for k in ("num_attention_heads", "attention_head_dim", "num_layers", "embedding_dim")}
    assert set(model.state_dict()) == _released_keys(**cfg, num_embeddings=77, additional_embeddings=3)
    assert {k: model.config[k] for k in RELEASED_KANDINSKY_CONFIG if not k.startswith("_")} == {
        **{k: v for k, v in RELEASED_KANDINSKY_CONFIG.items() if not k.startswith("_")},
        "embedding_dim": PRESETS[name].embedding_dim,
    }


def test_config_fields_are_exactly_the_released_ones():
    fields = {k for k in EclipsePrior.from_preset("tiny").config if not k.startswith("_")}
    assert fields == {k for k in RELEASED_KANDINSKY_CONFIG if not k.startswith("_")}


def test_clip_stats_are_frozen_and_unused():
    model = EclipsePrior.from_preset("tiny")
    assert not model.clip_mean.requires_grad and not model.clip_std.requires_grad
    x = _inputs(model)
    out = model(**x).predicted_image_embedding
    with torch.no_grad():
        model.clip_mean.fill_(5.0)
        model.clip_std.fill_(3.0)
    assert torch.equal(out, model(**x).predicted_image_embedding)
    out.sum().backward()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all(model.get_parameter(n).grad is not None for n in trainable)


def test_presets_errors():
    with pytest.raises(ConfigError, match="1280.*768|768.*1280"):
        EclipsePrior.from_preset("kandinsky22", embedding_dim=768)
    with pytest.raises(ConfigError, match="kandinsky22.*karlo.*small.*tiny"):
        EclipsePrior.from_preset("huge")
    small = EclipsePrior.from_preset("small", embedding_dim=64, num_embeddings=24)
    assert 1_000_000 <= small.num_parameters() <= 2_000_000
    assert 50_000 <= EclipsePrior.from_preset("tiny").num_parameters() <= 150_000
    assert EclipsePrior.from_preset("karlo", embedding_dim=768).config.embedding_dim == 768
    with pytest.raises(ConfigError, match="additional_embeddings"):
        EclipsePrior(num_layers=1, embedding_dim=8, num_embeddings=4, additional_embeddings=4)
    with pytest.raises(ConfigError, match="additional_embeddings"):
        DiffusionPrior(num_layers=1, embedding_dim=8, num_embeddings=4, additional_embeddings=3)


def test_padding_mask_hides_padded_tokens():
    model = EclipsePrior.from_preset("tiny").eval()
    x = _inputs(model)
    base = model(**x).predicted_image_embedding
    padded = dict(x, encoder_hidden_states=x["encoder_hidden_states"].clone())
    padded["encoder_hidden_states"][:, -1] += 10.0  # a padded position
    torch.testing.assert_close(model(**padded).predicted_image_embedding, base, rtol=0, atol=1e-6)
    visible = dict(x, encoder_hidden_states=x["encoder_hidden_states"].clone())
    visible["encoder_hidden_states"][:, 0] += 10.0  # a real token
    assert not torch.allclose(model(**visible).predicted_image_embedding, base, atol=1e-3)


def test_causal_mask_is_applied():
    """Token k only sees tokens <= k: changing the last text token leaves earlier token outputs unchanged."""
    model = EclipsePrior.from_preset("tiny").eval()
    x = _inputs(model)
    x["attention_mask"] = None
    seen = []
    hook = model.transformer_blocks[-1].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
    model(**x)
    changed = dict(x, encoder_hidden_states=x["encoder_hidden_states"].clone())
    changed["encoder_hidden_states"][:, -1] += 10.0
    model(**changed)
    hook.remove()
    n = model.config.num_embeddings
    torch.testing.assert_close(seen[0][:, : n - 1], seen[1][:, : n - 1], rtol=0, atol=1e-6)
    assert not torch.allclose(seen[0][:, n:], seen[1][:, n:], atol=1e-3)


def test_pooled_only_forward_and_uniform_methods():
    model = EclipsePrior.from_preset("tiny", embedding_dim=16, pooled_only=True)
    assert not model.uses_text_states
    assert model.config.num_embeddings == 0 and model.config.encoder_hid_proj_type is None
    assert "encoder_hidden_states_proj.weight" not in model.state_dict()
    text = torch.randn(4, 16)
    out = model(torch.randn(4, 16), text).predicted_image_embedding
    assert out.shape == (4, 16)
    # The uniform methods ignore text states a pooled-only model cannot use; forward refuses them.
    states = torch.randn(4, 8, 16)
    g = torch.Generator().manual_seed(0)
    a = model.training_prediction(torch.randn(4, 16), text, states, None, generator=g)
    b = model.generate_embeds(text, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.detach(), b)
    with pytest.raises(ConfigError, match="pooled-only"):
        model(torch.randn(4, 16), text, states)


def test_eclipse_uniform_methods_are_seeded():
    model = EclipsePrior.from_preset("tiny").eval()
    x = _inputs(model)
    args = (x["proj_embedding"], x["encoder_hidden_states"], x["attention_mask"])
    a = model.generate_embeds(*args, generator=torch.Generator().manual_seed(1))
    b = model.generate_embeds(*args, generator=torch.Generator().manual_seed(1))
    c = model.generate_embeds(*args, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    assert a.shape == (3, model.config.embedding_dim)
    with pytest.raises(ConfigError, match="text states"):
        model(x["hidden_states"], x["proj_embedding"])


def test_eclipse_round_trip(tmp_path):
    model = EclipsePrior.from_preset("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").exists()
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["_class_name"] == "EclipsePrior"
    loaded = EclipsePrior.from_pretrained(tmp_path / "m", use_safetensors=True)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    assert not loaded.clip_mean.requires_grad
    x = _inputs(model)
    torch.testing.assert_close(loaded(**x).predicted_image_embedding, model(**x).predicted_image_embedding)


def test_loads_the_released_folder_layout(tmp_path):
    """A folder shaped like the hub release (`_class_name: PriorTransformer`, old diffusers) loads strictly."""
    cfg = dict(RELEASED_KANDINSKY_CONFIG, num_layers=1, embedding_dim=32, num_embeddings=8)
    src = EclipsePrior(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    folder = tmp_path / "released"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, folder / "diffusion_pytorch_model.safetensors")
    model, info = EclipsePrior.from_pretrained(folder, use_safetensors=True, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for k, v in src.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=0, atol=0)


def test_diffusion_prior_is_diffusers_prior_transformer():
    """Same keys and same outputs as diffusers' PriorTransformer: checks the shared token sequence and masks."""
    model = DiffusionPrior.from_preset("tiny").eval()
    init_keys = PriorTransformer._get_init_keys(PriorTransformer)
    ref = PriorTransformer(**{k: v for k, v in model.config.items() if k in init_keys}).eval()
    assert list(model.state_dict()) == list(ref.state_dict())
    ref.load_state_dict(model.state_dict())
    x = _inputs(model)
    t = torch.tensor([0, 500, 999])
    torch.testing.assert_close(
        model(x["hidden_states"], t, x["proj_embedding"], x["encoder_hidden_states"], x["attention_mask"])[0],
        ref(x["hidden_states"], t, x["proj_embedding"], x["encoder_hidden_states"], x["attention_mask"])[0],
    )
    assert not model.clip_mean.requires_grad and not model.clip_std.requires_grad


def test_diffusion_training_prediction_reproducible_and_drops_condition():
    model = DiffusionPrior.from_preset("tiny")
    x = _inputs(model)
    img = torch.randn(3, model.config.embedding_dim)
    args = (img, x["proj_embedding"], x["encoder_hidden_states"], x["attention_mask"])
    a = model.training_prediction(*args, generator=torch.Generator().manual_seed(0))
    b = model.training_prediction(*args, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.pow(2).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # With every condition dropped the caption no longer matters; with none dropped it does.
    other = (img, torch.randn_like(x["proj_embedding"]), torch.randn_like(x["encoder_hidden_states"]), None)

    def pair(prob):
        model.register_to_config(cond_drop_prob=prob)
        c = model.training_prediction(*args, generator=torch.Generator().manual_seed(0))
        return c, model.training_prediction(*other, generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(*pair(1.0), rtol=0, atol=1e-6)
    assert not torch.allclose(*pair(0.0), atol=1e-4)


@pytest.mark.parametrize("pooled_only", [False, True])
def test_diffusion_sampling_seeded_and_guided(pooled_only):
    model = DiffusionPrior.from_preset("tiny", pooled_only=pooled_only).eval()
    x = _inputs(model, batch=2)
    args = (x["proj_embedding"], x["encoder_hidden_states"], x["attention_mask"])

    def sample(seed, guidance, steps=3):
        return model.generate_embeds(
            *args, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, guidance_scale=guidance
        )

    a = sample(0, 4.0)
    assert a.shape == (2, model.config.embedding_dim) and torch.isfinite(a).all()
    torch.testing.assert_close(a, sample(0, 4.0), rtol=0, atol=0)
    assert not torch.allclose(a, sample(1, 4.0))
    assert not torch.allclose(a, sample(0, 1.0), atol=1e-4)
    assert sample(0, 1.0, steps=1).shape == a.shape


def test_load_prior_run_dir_and_export_folder(tmp_path):
    eclipse = EclipsePrior.from_preset("tiny")
    eclipse.save_pretrained(tmp_path / "run" / "prior")
    (tmp_path / "run" / "checkpoints").mkdir()
    loaded = load_prior(tmp_path / "run")
    assert type(loaded) is EclipsePrior and not loaded.training
    for k, v in eclipse.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)

    diffusion = DiffusionPrior.from_preset("tiny", pooled_only=True)
    diffusion.save_pretrained(tmp_path / "export")
    loaded = load_prior(str(tmp_path / "export"))
    assert type(loaded) is DiffusionPrior and not loaded.uses_text_states
    for k, v in diffusion.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_load_prior_released_config_and_strictness(tmp_path):
    cfg = dict(RELEASED_KANDINSKY_CONFIG, num_layers=1, embedding_dim=32, num_embeddings=8)
    src = EclipsePrior(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    folder = tmp_path / "released"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    assert type(load_prior(folder)) is EclipsePrior

    del state["prd_embedding"]
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ConfigError, match="prd_embedding"):
        load_prior(folder)

    # Kandinsky's own diffusion PriorTransformer is refused with a clear message.
    (folder / "config.json").write_text(json.dumps(dict(cfg, time_embed_act_fn="silu", time_embed_dim=None)))
    with pytest.raises(ConfigError, match="time embedding"):
        load_prior(folder)


def test_load_prior_missing_models(tmp_path):
    with pytest.raises(ModelNotFoundError) as err:
        load_prior("eclipse-prior-tests/no-such-prior", local_files_only=True)
    msg = str(err.value)
    assert "eclipse-prior-tests/no-such-prior" in msg and "local folder path" in msg and "\n" not in msg
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_prior(tmp_path / "missing" / "run")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_prior(tmp_path / "empty")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps({"_class_name": "EclipsePrior"}))
    (tmp_path / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_prior(tmp_path / "pickled")


def test_training_prediction_uses_given_noise_timesteps_and_drop():
    """Passing the randomness reproduces the drawn path exactly (multi-process trainers rely on this)."""
    torch.manual_seed(0)
    b, e = 3, 32
    image, text = torch.randn(b, e), torch.randn(b, e)
    states, mask = torch.randn(b, 8, e), torch.ones(b, 8, dtype=torch.bool)
    eclipse = EclipsePrior.from_preset("tiny").eval()
    noise = torch.randn(b, e, generator=torch.Generator().manual_seed(5))
    drawn = eclipse.training_prediction(image, text, states, mask, generator=torch.Generator().manual_seed(5))
    given = eclipse.training_prediction(image, text, states, mask, noise=noise)
    torch.testing.assert_close(drawn, given, rtol=0, atol=0)

    diffusion = DiffusionPrior.from_preset("tiny").eval()
    gen = torch.Generator().manual_seed(7)
    t = torch.randint(0, diffusion.config.num_train_timesteps, (b,), generator=gen)
    eps = torch.randn(b, e, generator=gen)
    drop = torch.rand(b, generator=gen) < diffusion.config.cond_drop_prob
    drawn = diffusion.training_prediction(image, text, states, mask, generator=torch.Generator().manual_seed(7))
    given = diffusion.training_prediction(image, text, states, mask, noise=eps, timesteps=t, drop=drop)
    torch.testing.assert_close(drawn, given, rtol=0, atol=0)


def test_diffusion_prior_without_needed_text_states_is_a_config_error():
    """Like EclipsePrior: a one-line ConfigError, not an AttributeError from inside the conditioning."""
    diffusion = DiffusionPrior.from_preset("tiny").eval()
    text = torch.randn(2, diffusion.config.embedding_dim)
    with pytest.raises(ConfigError, match="per-token text states"):
        diffusion.generate_embeds(text, num_inference_steps=2)
    with pytest.raises(ConfigError, match="per-token text states"):
        diffusion.training_prediction(torch.randn_like(text), text)


@pytest.mark.parametrize("cls", [EclipsePrior, DiffusionPrior])
def test_pooled_text_width_is_checked_against_the_prior(cls):
    model = cls.from_preset("tiny", pooled_only=True).eval()
    width = model.config.embedding_dim
    with pytest.raises(ConfigError, match=f"width {width + 16}.*width {width}"):
        model.generate_embeds(torch.randn(2, width + 16), num_inference_steps=2)


def test_load_prior_typo_without_slash_fails_at_once(tmp_path, monkeypatch):
    """A missing local name that is not "owner/name" is never sent to the hub (which retried for a minute)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError, match="run_typo.*does not exist and is not a hub id") as err:
        load_prior("run_typo")
    assert "\n" not in str(err.value)


def test_load_prior_unreachable_hub_is_one_line_at_once(monkeypatch):
    """When the hub's host does not resolve, a hub id is looked up in the cache only (no minute of retries)."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    with pytest.raises(ModelNotFoundError, match="hub is unreachable") as err:
        load_prior("eclipse-prior-tests/no-such-prior")
    assert "\n" not in str(err.value)
