"""The image benchmark's plumbing: tiny random scorer models (the real transformers classes) saved to disk and loaded
back through our loaders, the image cache and resume, and whole runs with a stand-in generator."""

from __future__ import annotations

import importlib.util
import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from eclipse_prior.cli import main
from eclipse_prior.errors import ConfigError, ModelNotFoundError
from eclipse_prior.evaluation import compbench, frechet, scorers
from eclipse_prior.evaluation import image_benchmark as ib

BERT_WORDS = (
    "a an the of on in and with left right top next to near red green blue bench bowl cat dog yes no".split()
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_tiny_bert_tokenizer():
    """WordPiece tokenizer with BERT's special tokens plus BLIP's [DEC] start token (transformers 5: vocab dict)."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "?", ".", *BERT_WORDS]
    return BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True, model_max_length=64)


def save_tiny_blip_vqa(path: Path) -> Path:
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipImageProcessorPil, BlipProcessor

    tok = build_tiny_bert_tokenizer()
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        encoder_hidden_size=32,
        max_position_embeddings=64,
        bos_token_id=tok.convert_tokens_to_ids("[DEC]"),
        pad_token_id=tok.pad_token_id,
        sep_token_id=tok.sep_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision)).save_pretrained(path)
    BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tok).save_pretrained(path)
    return path


def save_tiny_owlv2(path: Path) -> Path:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessorPil, Owlv2Processor

    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(max_length=16)
    torch.manual_seed(0)
    text = dict(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    Owlv2ForObjectDetection(
        Owlv2Config(text_config=text, vision_config=vision, projection_dim=32)
    ).save_pretrained(path)
    Owlv2Processor(Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tok).save_pretrained(path)
    return path


def save_tiny_grounding_dino(path: Path) -> Path:
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessorPil,
        GroundingDinoProcessor,
        SwinConfig,
    )

    tok = build_tiny_bert_tokenizer()
    backbone = SwinConfig(
        image_size=32,
        patch_size=4,
        embed_dim=8,
        depths=[1, 1],
        num_heads=[1, 1],
        window_size=4,
        out_features=["stage1", "stage2"],
    )
    text = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2, num_queries=8,
        num_feature_levels=2, encoder_n_points=1, decoder_n_points=1, max_text_len=32, use_timm_backbone=False,
    )  # fmt: skip
    torch.manual_seed(0)
    GroundingDinoForObjectDetection(config).save_pretrained(path)
    processor = GroundingDinoImageProcessorPil(size={"shortest_edge": 32, "longest_edge": 32})
    GroundingDinoProcessor(processor, tok).save_pretrained(path)
    return path


def save_tiny_dinov2(path: Path) -> Path:
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    Dinov2Model(config).save_pretrained(path)
    BitImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        path
    )
    return path


@pytest.fixture(scope="module")
def judges() -> ib.ScorerSet:
    """One set of loaded scorers for all runs of this file (each run would otherwise reload them)."""
    return ib.ScorerSet("cpu")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tiny_clip_dir) -> dict[str, str]:
    root = tmp_path_factory.mktemp("scorers")
    return {
        "vqa": str(save_tiny_blip_vqa(root / "blip")),
        "owl": str(save_tiny_owlv2(root / "owl")),
        "dino": str(save_tiny_dinov2(root / "dino")),
        "clip": str(tiny_clip_dir),
    }


def picture(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------- the scorers
def test_blip_yes_probability_is_the_first_answer_token_renormalised(tiny_models):
    vqa = scorers.load_blip_vqa(tiny_models["vqa"])
    image = picture(0)
    questions = ["a red bench?", "a blue bowl with a dog?"]
    probs = vqa.yes_probabilities(image, questions)
    assert len(probs) == 2 and all(0.0 < p < 1.0 for p in probs)
    assert vqa.yes_probabilities(image, []) == []
    # independent route: transformers' own generate() gives the first decoder step's logits
    tok = vqa.processor.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    for question, p in zip(questions, probs, strict=True):
        inputs = vqa.processor(images=image, text=question, return_tensors="pt")
        out = vqa.model.generate(
            **inputs, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        first = torch.softmax(out.scores[0][0].float(), dim=-1)
        assert p == pytest.approx(float(first[yes] / (first[yes] + first[no])), abs=1e-5)


def test_owlv2_best_box_per_query_in_image_pixels(tiny_models):
    det = scorers.load_detector(tiny_models["owl"], threshold=0.0)
    image = picture(1, size=(64, 40))  # not square: OWLv2 pads to 64 x 64
    (box,) = det.best_boxes(image, ["cat"])
    inputs = det.processor(text=[["cat"]], images=[image], return_tensors="pt")
    with torch.no_grad():
        outputs = det.model(**inputs)
    (ref,) = det.processor.post_process_grounded_object_detection(
        outputs, threshold=0.0, target_sizes=[(40, 64)]
    )
    best = int(torch.argmax(ref["scores"]))
    assert box is not None and box.score == pytest.approx(float(ref["scores"][best]), abs=1e-6)
    assert [box.x_min, box.y_min, box.x_max, box.y_max] == pytest.approx(
        ref["boxes"][best].tolist(), abs=1e-3
    )
    assert scorers.load_detector(tiny_models["owl"], threshold=1.0).best_boxes(image, ["cat", "dog"]) == [
        None,
        None,
    ]


def test_grounding_dino_best_box_per_phrase(tmp_path):
    det = scorers.load_detector(str(save_tiny_grounding_dino(tmp_path / "gdino")), threshold=0.0)
    assert isinstance(det, scorers.GroundingDinoDetector)
    image = picture(6, size=(64, 40))
    cat, dog = det.best_boxes(image, ["cat", "Dog"])
    inputs = det.processor(images=image, text="cat. dog.", return_tensors="pt")
    assert inputs["input_ids"][0, 1:5].tolist() == det.processor.tokenizer.convert_tokens_to_ids(
        ["cat", ".", "dog", "."]
    )
    with torch.no_grad():
        outputs = det.model(**inputs)
    (ref,) = det.processor.post_process_grounded_object_detection(
        outputs, inputs["input_ids"], threshold=0.0, text_threshold=0.0, target_sizes=[(40, 64)]
    )
    probs = torch.sigmoid(outputs.logits[0])
    for box, token in (
        (cat, 1),
        (dog, 3),
    ):  # each phrase is one token here: its best box is that token's argmax
        best = int(torch.argmax(probs[:, token]))
        assert box.score == pytest.approx(float(probs[best, token]), abs=1e-6)
        assert [box.x_min, box.y_min, box.x_max, box.y_max] == pytest.approx(
            ref["boxes"][best].tolist(), abs=1e-3
        )


def test_clipscore_is_plain_cosine_and_pickscore_is_scaled(tiny_models):
    clipscore = scorers.load_clipscore(tiny_models["clip"])
    pick = scorers.load_pickscore(tiny_models["clip"], tiny_models["clip"])
    images, texts = [picture(2), picture(3)], ["a red square", "a blue circle on the left of a cat"]
    cos = clipscore.scores(images, texts)
    inputs = clipscore.processor(text=texts, images=images, return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = clipscore.model(**inputs).logits_per_image
    scale = float(clipscore.model.logit_scale.exp())
    assert cos == pytest.approx((torch.diagonal(logits) / scale).tolist(), abs=1e-5)
    assert pick.scores(images, texts) == pytest.approx(torch.diagonal(logits).tolist(), abs=1e-4)


def test_dino_features_are_the_cls_output(tiny_models):
    dino = scorers.load_dino(tiny_models["dino"])
    feats = dino.features([picture(4), picture(5), picture(4)])
    assert feats.shape == (3, 32) and np.allclose(feats[0], feats[2])
    assert frechet.frechet_distance_features(feats[:2].repeat(2, 0), feats[:2].repeat(2, 0)) == pytest.approx(
        0.0, abs=1e-6
    )


def test_missing_models_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelNotFoundError, match="no such folder.*--vqa-model") as err:
        scorers.load_blip_vqa(str(tmp_path / "missing"))
    assert "\n" not in str(err.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="facebook/dinov2-base.*--dino-model") as err:
        scorers.load_dino("facebook/dinov2-base")
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- cache and runs
class StandInGenerator:
    """A real (if simple) generator: draws two coloured boxes whose place depends on prior, prompt and seed."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def __call__(self, prior: str, prompt: str, seed: int) -> tuple[Image.Image, dict]:
        self.calls.append((prior, prompt, seed))
        rng = np.random.default_rng([zlib.crc32(f"{prior}|{prompt}".encode()), seed])  # same on every run
        image = Image.new("RGB", (64, 64), tuple(int(v) for v in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(2):
            x, y = (int(v) for v in rng.integers(0, 40, 2))
            draw.rectangle([x, y, x + 20, y + 20], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        return image, {"prompt": prompt, "seed": seed, "prior": prior, "generator": "stand-in"}


def write_prompts(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "color_val.txt").write_text("a green bench and a blue bowl\r\na red cat and a blue dog\r\n")
    (root / "spatial_val.txt").write_text("a cat on the left of a dog\na bench next to a bowl\n")
    (root / "non_spatial_val.txt").write_text("a cat is looking at a dog\n")
    (root / "complex_val.txt").write_text("The red cat is on the left of the blue dog.\n")
    return root


def make_config(tmp_path: Path, models: dict[str, str], **kw) -> ib.BenchmarkConfig:
    base = dict(
        priors=["eclipse=/runs/eclipse", "/runs/projection"],
        decoder="kandinsky22",
        prompts=[str(write_prompts(tmp_path / "prompts"))],
        out=str(tmp_path / "out"),
        images_per_prompt=2,
        seed=7,
        vqa_model=models["vqa"],
        detector_model=models["owl"],
        clipscore_model=models["clip"],
        pickscore_model=models["clip"],
        pickscore_processor=models["clip"],
        dino_model=models["dino"],
        detection_threshold=0.0,
        bootstrap_resamples=200,
    )
    base.update(kw)
    return ib.BenchmarkConfig(**base)


def test_run_scores_caches_and_resumes(tmp_path, tiny_models, judges):
    cfg = make_config(tmp_path, tiny_models)
    gen = StandInGenerator()
    first = ib.run_benchmark(cfg, generate=gen, judges=judges, progress=False)
    n_images = 2 * (2 + 2 + 1 + 1) * 2  # priors x prompts x images per prompt
    assert len(gen.calls) == n_images and first.generation.generated == n_images
    assert {seed for _, _, seed in gen.calls} == {7, 8}  # image j uses seed + j, the same for both priors
    out = Path(cfg.out)
    res = json.loads((out / "results.json").read_text())
    assert res["priors"] == ["eclipse", "projection"]
    assert set(res["categories"]) == {"color", "spatial", "non_spatial", "complex"}
    for per in res["categories"].values():
        for ci in per.values():
            assert ci["ci_low"] <= ci["mean"] <= ci["ci_high"]
    records = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert len(records) == n_images
    color = next(r for r in records if r["category"] == "color")
    assert color["attribute"]["questions"] == ["a green bench?", "a blue bowl?"]
    # the reference writes each P(yes) and the product with 4 decimals (float32 product)
    assert color["score"] == compbench.vqa_score(color["attribute"]["p_yes"])
    assert color["score"] == pytest.approx(np.prod(color["attribute"]["p_yes"]), abs=2e-4)
    spatial = next(r for r in records if r["category"] == "spatial" and r["prompt_index"] == 0)
    assert spatial["spatial"]["query"] == {"obj1": "cat", "relation": "on the left of", "obj2": "dog"}
    assert spatial["spatial"]["box1"] is not None  # threshold 0: the best box is always kept
    cpx = next(r for r in records if r["category"] == "complex")
    parts = [cpx[k]["score"] for k in ("attribute", "spatial", "non_spatial")]
    assert cpx["score"] == pytest.approx(np.mean(parts))
    # the table holds the means of the per-image scores
    eclipse_color = [r["score"] for r in records if r["category"] == "color" and r["prior"] == "eclipse"]
    assert res["categories"]["color"]["eclipse"]["mean"] == pytest.approx(np.mean(eclipse_color))
    pref = res["preference"]
    assert pref["n_items"] == n_images // 2
    assert pref["win_rate"]["eclipse"]["projection"] + pref["win_rate"]["projection"][
        "eclipse"
    ] == pytest.approx(1)
    low, high = pref["win_rate_ci95"]["eclipse"]["projection"]
    assert low <= pref["win_rate"]["eclipse"]["projection"] <= high
    assert "0.6119" in first.summary and "ECLIPSE-Kandinsky v2.2" in first.summary
    header = res["compbench"]
    assert header["scoring"] == "reference" and header["scorer_models"]["detector"] == tiny_models["owl"]
    assert header["parser"]["prompts_by_source"]["shipped"] == 1  # "a green bench and a blue bowl" ships
    assert "en_core_web_sm" in res["parser"]
    if importlib.util.find_spec("spacy") is None:  # the other prompts went to the rule chunker: said so
        assert not header["reference_rules"] and "rule chunker" in " ".join(res["notes"])
        assert "NOT comparable" in first.summary

    # a repeated run generates nothing and rescores nothing
    gen2 = StandInGenerator()
    second = ib.run_benchmark(cfg, generate=gen2, judges=judges, progress=False)
    assert gen2.calls == [] and second.generation.reused == n_images
    assert second.results["scoring"] == {"rescored": 0, "reused": n_images}
    assert second.results["categories"] == res["categories"]

    # scoring interrupted mid-way: the records flushed so far are reused, a half-written line is rescored
    lines = (out / "scores.jsonl").read_text().splitlines(keepends=True)
    (out / "scores.jsonl").unlink()
    (out / "scores.partial.jsonl").write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])
    resumed = ib.run_benchmark(cfg, generate=StandInGenerator(), judges=judges, progress=False)
    assert resumed.results["scoring"] == {"rescored": 1, "reused": n_images - 1}
    assert resumed.results["categories"] == res["categories"] and not (out / "scores.partial.jsonl").exists()

    # an interrupted image (sidecar missing) and one made with other settings are regenerated, nothing else
    victim = out / "images" / "eclipse" / "color" / "p0000_i00.json"
    victim.unlink()
    other = out / "images" / "projection" / "spatial" / "p0001_i01.json"
    meta = json.loads(other.read_text())
    meta["benchmark"]["seed"] = 123
    other.write_text(json.dumps(meta))
    gen3 = StandInGenerator()
    third = ib.run_benchmark(cfg, generate=gen3, judges=judges, progress=False)
    assert sorted(gen3.calls) == sorted(
        [
            ("/runs/eclipse", "a green bench and a blue bowl", 7),
            ("/runs/projection", "a bench next to a bowl", 8),
        ]
    )
    assert third.results["scoring"]["rescored"] <= 2

    # other generation settings (more images per prompt) reuse what exists and add the rest
    gen4 = StandInGenerator()
    ib.run_benchmark(
        make_config(tmp_path, tiny_models, images_per_prompt=3), generate=gen4, judges=judges, progress=False
    )
    assert len(gen4.calls) == n_images // 2 and {seed for _, _, seed in gen4.calls} == {9}


def test_shipped_prompts_scored_by_the_reference_rules_then_corrected(tmp_path, tiny_models, judges):
    cfg = make_config(tmp_path, tiny_models, prompts=None, priors=["/runs/a"], categories=["spatial", "complex"],
                      max_prompts=2, images_per_prompt=1)
    first = ib.run_benchmark(cfg, generate=StandInGenerator(), judges=judges, progress=False)
    header = first.results["compbench"]
    assert header["scoring"] == "reference" and header["reference_rules"]  # shipped prompts: shipped parses
    assert header["parser"]["prompts_by_source"] == {"shipped": 4}
    assert first.results["prompts"]["spatial"]["file"].endswith("compbench_data/spatial_val.txt")
    records = {(r["category"], r["prompt_index"]): r for r in
               map(json.loads, (Path(cfg.out) / "scores.jsonl").read_text().splitlines())}
    girl = records[("spatial", 1)]  # "a girl on the top of a frog": the reference asks UniDet for "person"
    assert girl["prompt"] == "a girl on the top of a frog" and girl["settings"]["parse"] == "shipped"
    assert girl["spatial"]["query"] == {"obj1": "person", "relation": "on the top of", "obj2": "frog"}
    # boxes are read in the reference's detector frame: a 64 px image is 479 px there
    box = girl["spatial"]["box1"]
    assert box is not None and max(box["x_max"], box["y_max"]) > 64
    hat = records[("complex", 0)]  # in the reference's spatial list; its objects are head nouns
    assert hat["parts"] == {"attribute": True, "spatial": True, "non_spatial": False, "rule": "reference-lists"}
    assert hat["spatial"]["query"] == {"obj1": "hat", "relation": "on top of", "obj2": "coat"}
    assert hat["spatial"]["not_in_detector_vocabulary"] == []  # both are UniDet class names
    assert hat["attribute"]["questions"] == ["the red hat?", "the brown coat rack?"]
    assert "non_spatial" not in hat

    # the same images laid out for the reference's own scripts: <prompt>_<prompt index x images + image index>
    dest = tmp_path / "reference_layout"
    assert ib.export_reference_samples(Path(cfg.out), dest) == {"copied": 4, "skipped": 0}
    samples = dest / "a" / "spatial" / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [
        "a giraffe next to a lamp_000000.png", "a girl on the top of a frog_000001.png"]
    assert (samples / "a girl on the top of a frog_000001.png").read_bytes() == (
        Path(cfg.out) / girl["image"]).read_bytes()

    cfg.scoring = "corrected"
    second = ib.run_benchmark(cfg, generate=StandInGenerator(), judges=judges, progress=False)
    assert second.results["scoring"]["rescored"] == 4  # the mode is part of every score's settings
    assert not second.results["compbench"]["reference_rules"]
    assert "NOT comparable" in second.summary
    fixed = {(r["category"], r["prompt_index"]): r for r in
             map(json.loads, (Path(cfg.out) / "scores.jsonl").read_text().splitlines())}
    assert fixed[("complex", 0)]["spatial"]["query"]["obj2"] == "brown coat rack"
    assert fixed[("spatial", 1)]["spatial"]["query"]["obj1"] == "girl"


def test_one_prior_with_reference_folder(tmp_path, tiny_models, judges):
    cfg = make_config(tmp_path, tiny_models, priors=["/runs/a"], categories=["color"], decoder="my-decoder")
    gen = StandInGenerator()
    ib.run_benchmark(cfg, generate=gen, judges=judges, progress=False)
    # the prior's own images as the reference: its Frechet distance is zero
    cfg.reference_images = str(Path(cfg.out) / "images" / "a")
    result = ib.run_benchmark(cfg, generate=gen, judges=judges, progress=False)
    assert result.results["image_quality"]["dino"]["a"] == pytest.approx(0.0, abs=1e-6)
    assert "preference" not in result.results
    notes = " ".join(result.results["notes"])
    assert "PickScore preference skipped" in notes and "no paper numbers" in notes
    if importlib.util.find_spec("torchmetrics") is None:  # the optional Inception FID is skipped and counted
        assert result.results["image_quality"]["inception"] is None
        assert "Inception FID skipped" in notes and "1 of 1 priors without Inception FID" in notes
    assert "DINOv2 0.0000" in result.summary


def test_bad_reference_folder_fails_before_generating(tmp_path, tiny_models):
    cfg = make_config(tmp_path, tiny_models, reference_images=str(tmp_path / "no_such_folder"))
    gen = StandInGenerator()
    with pytest.raises(ConfigError, match="reference image folder"):
        ib.run_benchmark(cfg, generate=gen, progress=False)
    assert gen.calls == []


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    code = main(
        [
            "benchmark-images",
            "--prior",
            "p",
            "--decoder",
            "kandinsky22",
            "--prompts",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1
    # without --prompts the shipped val prompts are used; other splits must be given
    code = main(["benchmark-images", "--prior", "p", "--decoder", "kandinsky22", "--split", "train",
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "only the val split ships" in err and len(err.strip().splitlines()) == 1


def test_cli_end_to_end_through_the_generation_pipeline(tmp_path, tiny_models, tiny_clip_dir, capsys):
    """Real priors and a tiny Kandinsky v2.2 decoder through `eclipse-prior generate`'s runner; a rerun reuses all."""
    pytest.importorskip("eclipse_prior.pipelines.generate")
    from eclipse_prior.models import EclipsePrior
    from eclipse_prior.pipelines.tiny import save_tiny_kandinsky_decoder

    for seed, name in ((0, "prior_a"), (1, "prior_b")):
        torch.manual_seed(seed)
        EclipsePrior.from_preset("tiny", embedding_dim=32, num_embeddings=77).save_pretrained(tmp_path / name)
    decoder = save_tiny_kandinsky_decoder(tmp_path / "kandinsky22-tiny")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "color_val.txt").write_text("a red cat and a blue dog\n")
    (prompts / "spatial_val.txt").write_text("a cat on the left of a dog\n")
    out = tmp_path / "out"
    argv = [
        "benchmark-images", "--prior", f"a={tmp_path / 'prior_a'}", "--prior", f"b={tmp_path / 'prior_b'}",
        "--decoder", str(decoder), "--clip", str(tiny_clip_dir), "--prompts", str(prompts),
        "--images-per-prompt", "1", "--seed", "3", "--steps", "2", "--height", "32", "--width", "32",
        "--out", str(out), "--device", "cpu", "--quiet",
        "--vqa-model", tiny_models["vqa"], "--detector-model", tiny_models["owl"],
        "--clipscore-model", tiny_models["clip"], "--pickscore-model", tiny_models["clip"],
        "--pickscore-processor", tiny_models["clip"], "--detection-threshold", "0",
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "4 generated, 0 reused" in printed and "ECLIPSE-Kandinsky v2.2" in printed
    )  # folder name says kandinsky
    png = out / "images" / "a" / "color" / "p0000_i00.png"
    sidecar = json.loads(png.with_suffix(".json").read_text())
    assert sidecar["seed"] == 3 and sidecar["prompt"] == "a red cat and a blue dog"
    assert sidecar["models"]["prior"]["class"] == "EclipsePrior" and Image.open(png).size == (32, 32)
    assert main(argv) == 0
    assert "0 generated, 4 reused" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["generation"] == {"generated": 0, "reused": 4} and res["preference"]["n_items"] == 2
    assert res["compbench"]["scoring"] == "reference" and res["spatial"]["confidence_weighting"] is True
    assert main([*argv, "--scoring", "corrected", "--no-spatial-confidence-weighting", "--split", "val"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["compbench"]["scoring"] == "corrected" and res["spatial"]["confidence_weighting"] is False
    assert res["scoring"]["rescored"] == 4


def test_benchmark_cli_numbers_are_one_line_errors(tmp_path, capsys):
    """Checked before any prior, decoder or prompt file is opened (none of these exist)."""
    from eclipse_prior.cli import main

    base = ["benchmark-images", "--prior", str(tmp_path / "p"), "--decoder", str(tmp_path / "d"),
            "--prompts", str(tmp_path / "prompts"), "--out", str(tmp_path / "out")]  # fmt: skip
    for flag, value in (("--batch-size", "0"), ("--images-per-prompt", "0"), ("--bootstrap-resamples", "-1"),
                        ("--detection-threshold", "1.5")):
        assert main([*base, flag, value]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err, err


def test_scorer_name_that_is_neither_folder_nor_hub_id(tmp_path, monkeypatch):
    from eclipse_prior.errors import ModelNotFoundError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError, match="dino_typo.*nor a hub id.*--dino-model"):
        scorers.load_dino("dino_typo")
