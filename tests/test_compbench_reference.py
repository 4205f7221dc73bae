"""T2I-CompBench's reference rules, quirks included, and their corrections, on constructed cases: the "on top of"
position rule, the filtered noun chunks, the case-sensitive relation search, the detector objects, the 3-in-1 list
key, the rounding of BLIP-VQA scores, the detector frame, the reference's dataset folder with its splits, and the
shipped parses against the rule chunker. No spaCy and no network needed."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from eclipse_prior.errors import ConfigError
from eclipse_prior.evaluation import compbench
from eclipse_prior.evaluation.compbench import Box, Parse, Token, position_score, spatial_image_score


def parse_of(words: list[tuple[str, str]], chunks: list[tuple[int, int]] = ()) -> Parse:
    """A constructed parse: (text, pos) tokens separated by single spaces, punctuation glued to the word before."""
    tokens = []
    for i, (text, pos) in enumerate(words):
        glue = i + 1 < len(words) and words[i + 1][1] == "PUNCT"
        tokens.append(Token(text, "" if glue or i + 1 == len(words) else " ", pos))
    text = "".join(t.text + t.whitespace for t in tokens)
    return Parse(text, tuple(tokens), tuple(chunks), "test")


def random_boxes(rng: np.random.Generator, n: int) -> list[tuple[Box, Box]]:
    def box() -> Box:
        x, y = rng.uniform(0, 400, 2)
        w, h = rng.uniform(10, 200, 2)
        return Box(x, y, x + w, y + h, float(rng.uniform(0.3, 1.0)))

    return [(box(), box()) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- the position rule
def test_on_top_of_scores_zero_under_the_reference_rule_and_like_on_the_top_of_when_corrected():
    pairs = random_boxes(np.random.default_rng(0), 2000)
    top = [position_score("on the top of", a, b) for a, b in pairs]
    assert sum(s > 0 for s in top) > 200  # the constructed pairs do exercise the rule
    assert all(position_score("on top of", a, b) == 0.0 for a, b in pairs)
    assert [position_score("on top of", a, b, scoring="corrected") for a, b in pairs] == top
    # with the confidence weighting a correct "on top of" image still ends below 0.5 unless both confidences are 1
    a, b = Box(0, 0, 100, 100, 0.9), Box(0, 300, 100, 400, 0.9)
    assert position_score("on the top of", a, b) == 1.0
    assert spatial_image_score("on the top of", a, b) == pytest.approx(0.25 * 0.9 * 2 + 0.5)
    assert spatial_image_score("on top of", a, b) == 0.0
    assert spatial_image_score("on top of", a, b, scoring="corrected") == pytest.approx(0.95)
    assert spatial_image_score(None, a, b) == 0.0  # no relation found: position 0, total 0.45 < 0.5


def test_confidence_weighting_cuts_totals_below_one_half():
    a, b = Box(0, 0, 100, 100, 0.6), Box(300, 0, 400, 100, 0.7)
    assert spatial_image_score("on the left of", a, b) == pytest.approx(0.25 * 0.6 + 0.25 * 0.7 + 0.5)
    overlap = Box(50, 0, 150, 100, 0.7)
    # 0.25 * 0.6 + 0.25 * 0.7 + 0.3 / 2 = 0.475 < 0.5 -> 0
    assert spatial_image_score("on the left of", a, overlap) == 0.0
    assert spatial_image_score("on the left of", a, overlap, confidence_weighting=False) == pytest.approx(0.3)
    strong = Box(50, 0, 150, 100, 1.0)  # 0.15 + 0.25 + 0.15 = 0.55
    assert spatial_image_score("on the left of", a, strong) == pytest.approx(0.55)
    assert spatial_image_score("on the left of", Box(0, 0, 1, 1, 1.0), None) == 0.0  # 0.25 alone never passes


def test_detector_frame_is_the_reference_unidet_input():
    assert compbench.reference_detector_size(512, 512) == (479, 479)
    assert compbench.reference_detector_size(1024, 1024) == (479, 479)
    # long side capped at 480: 768 x 512 -> short side int(480 * 512 / 768) = 320
    assert compbench.reference_detector_size(768, 512) == (480, 320)
    assert compbench.reference_detector_size(512, 768) == (320, 480)
    assert compbench.reference_detector_size(500, 490) == (480, 470)  # int(480 * 490 / 500) = 470
    # 155 px apart in a 512 px image is 145 px in the reference frame: "near" holds there
    a, b = Box(0, 0, 10, 10), Box(0, 155, 10, 165)
    assert position_score("near", a, b) == 1.0  # |dx| = 0 < 150 anyway
    a, b = Box(0, 0, 10, 10), Box(155, 155, 165, 165)
    assert position_score("near", a, b) == pytest.approx(150 / 155)
    fa, fb = (compbench.to_reference_frame(x, 512, 512) for x in (a, b))
    assert fa.x_max == pytest.approx(10 * 479 / 512) and fa.score == a.score
    assert position_score("near", fa, fb) == 1.0
    assert compbench.to_reference_frame(None, 512, 512) is None


# ---------------------------------------------------------------------------------------------- BLIP-VQA questions
def test_questions_drop_the_four_chunks_before_taking_eight():
    names = ["top", "a cat", "the side", "the left", "a dog", "the right", "Top", "the top"]
    names += [f"a thing{i}" for i in range(8)]
    words, chunks = [], []
    for name in names:
        start = len(words)
        words += [(w, "NOUN") for w in name.split()] + [("and", "CCONJ")]
        chunks.append((start, start + len(name.split())))
    questions = compbench.vqa_questions(parse_of(words, chunks))
    kept = [n for n in names if n not in ("top", "the side", "the left", "the right")]
    # filtered first (case-sensitive, exact text: "Top" and "the top" stay), then at most 8, then BLIP's lower-casing
    assert questions == [f"{n.lower()}?" for n in kept[:8]]
    assert questions[:4] == ["a cat?", "a dog?", "top?", "the top?"]


def test_question_clean_up_is_blips():
    assert compbench.reference_question("Mr. Smith's (red) hat: yes!?") == "mr smith's red hat yes?"
    assert compbench.reference_question("a cat ") == "a cat"
    long = " ".join(["w"] * 60)
    assert compbench.reference_question(long) == " ".join(["w"] * 50)


def test_vqa_score_rounds_like_the_reference():
    probs = [0.123456, 0.567891, 0.99995]
    # reference: each P written with 4 decimals, multiplied in float32, the product written with 4 decimals
    f = [np.float32(0.1235), np.float32(0.5679), np.float32(1.0)]
    expected = float(f"{float(np.float32(np.float32(f[0] * f[1]) * f[2])):.4f}")
    assert expected == 0.0701  # 0.1235 * 0.5679 = 0.07013565
    assert compbench.vqa_score(probs) == expected
    assert compbench.vqa_score(probs, "corrected") == pytest.approx(0.123456 * 0.567891 * 0.99995, rel=1e-12)
    assert compbench.vqa_score([]) == 1.0 == compbench.vqa_score([], "corrected")
    rng = np.random.default_rng(1)
    worst = max(
        abs(compbench.vqa_score(p) - compbench.vqa_score(p, "corrected"))
        for p in (rng.uniform(0, 1, int(rng.integers(1, 9))) for _ in range(2000))
    )
    assert 0 < worst < 2e-4  # the rounding moves a score by at most ~1e-4


# ------------------------------------------------------------------------------------------------ relation search
def test_relation_search_is_a_case_sensitive_substring_test_in_the_reference():
    assert compbench.find_relation("a linear cat")[0] == "near"  # "near" inside "linear"
    assert compbench.find_relation("a linear cat", "corrected") is None
    assert compbench.find_relation("A cat Next to a dog") is None
    assert compbench.find_relation("A cat Next to a dog", "corrected")[0] == "next to"
    # vocab order decides: "near" is searched before "on the left of"
    assert compbench.find_relation("a cat on the left of a dog near a tree")[0] == "near"
    assert compbench.find_relation("a bird on the top of a box")[0] == "on the top of"
    assert compbench.find_relation("a bird on top of a box")[:1] == ("on top of",)


# -------------------------------------------------------------------------------------------------- object words
def test_reference_objects_of_spatial_prompts_are_first_and_last_nouns_with_person_mapping():
    p = parse_of([("a", "DET"), ("girl", "NOUN"), ("on", "ADP"), ("the", "DET"), ("left", "NOUN"), ("of", "ADP"),
                  ("a", "DET"), ("traffic", "NOUN"), ("light", "NOUN")])
    q = compbench.spatial_query(p)
    assert q == compbench.SpatialQuery("person", "on the left of", "light")
    no_nouns = parse_of([("it", "PRON"), ("is", "AUX"), ("near", "ADP")])
    assert compbench.spatial_query(no_nouns) == compbench.SpatialQuery(None, "near", None)
    # the mapping is exact and case-sensitive
    p2 = parse_of([("a", "DET"), ("Girl", "NOUN"), ("near", "ADP"), ("a", "DET"), ("woman", "NOUN")])
    assert compbench.spatial_query(p2) == compbench.SpatialQuery("Girl", "near", "person")


def test_reference_objects_of_complex_prompts_follow_its_preposition_scan():
    hat = parse_of([("The", "DET"), ("red", "ADJ"), ("hat", "NOUN"), ("was", "AUX"), ("on", "ADP"), ("top", "NOUN"),
                    ("of", "ADP"), ("the", "DET"), ("brown", "ADJ"), ("coat", "NOUN"), ("rack", "NOUN"),
                    (".", "PUNCT")])
    assert compbench.spatial_query(hat, complex_prompt=True) == compbench.SpatialQuery("hat", "on top of", "coat")
    # "on the top of" is not among its prepositions: no objects (and the spatial part scores 0)
    top = parse_of([("a", "DET"), ("cat", "NOUN"), ("on", "ADP"), ("the", "DET"), ("top", "NOUN"), ("of", "ADP"),
                    ("a", "DET"), ("box", "NOUN")])
    assert compbench.spatial_query(top, complex_prompt=True) == compbench.SpatialQuery(None, "on the top of", None)
    # "on the left" matches the 3-token span; the relation is vocab_spatial's "on the left of"
    left = parse_of([("a", "DET"), ("man", "NOUN"), ("stands", "VERB"), ("on", "ADP"), ("the", "DET"),
                     ("left", "NOUN"), ("of", "ADP"), ("a", "DET"), ("car", "NOUN")])
    assert compbench.spatial_query(left, complex_prompt=True) == compbench.SpatialQuery(
        "person", "on the left of", "car"
    )
    # two relations give four objects: none is used
    two = parse_of([("a", "DET"), ("cup", "NOUN"), ("near", "ADP"), ("a", "DET"), ("plate", "NOUN"), ("and", "CCONJ"),
                    ("a", "DET"), ("fork", "NOUN"), ("next", "ADJ"), ("to", "ADP"), ("a", "DET"), ("knife", "NOUN")])
    assert compbench.spatial_query(two, complex_prompt=True).obj1 is None
    # no NOUN after the relation: the first PROPN that is not followed by another PROPN
    propn = parse_of([("a", "DET"), ("dog", "NOUN"), ("near", "ADP"), ("New", "PROPN"), ("York", "PROPN"),
                      ("City", "PROPN"), ("today", "ADV")])
    assert compbench.spatial_query(propn, complex_prompt=True) == compbench.SpatialQuery("dog", "near", "City")


def test_reference_detector_only_knows_unidet_class_names():
    labels = compbench.reference_detector_labels()
    assert len(labels) == 677 and "traffic light" in labels and "person" in labels  # 722 names, some twice
    assert not compbench.detectable("light")  # the reference's head noun of "a traffic light": never found
    assert compbench.detectable("traffic light") and compbench.detectable("person")
    assert not compbench.detectable("tissue") and compbench.detectable("tissue ")  # its label has a trailing space
    assert compbench.detectable("light", "corrected") and not compbench.detectable(None, "corrected")


# -------------------------------------------------------------------------------------------- 3-in-1 list matching
def test_list_key_keeps_spaces_in_the_reference_and_strips_them_when_corrected(tmp_path):
    assert compbench.reference_list_key("The cat sat. Then it left.\n") == "the cat sat"
    assert compbench.reference_list_key("A cat near a dog \n") == "a cat near a dog "
    assert compbench.reference_list_key("A cat near a dog \n", "corrected") == "a cat near a dog"
    # a prompt written with a trailing space in complex_val.txt but without one in the spatial list
    (tmp_path / "complex_val.txt").write_bytes(b"A cat near a dog \r\nThe man reads a book.\r\nA cat and a dog.")
    (tmp_path / "complex_val_spatial.txt").write_bytes(b"A cat near a dog\r\n")
    (tmp_path / "complex_val_action.txt").write_bytes(b"the man reads a book.\r\n")
    (ps,) = compbench.load_prompt_sets([tmp_path])
    assert ps.prompts[0] == "A cat near a dog" and ps.lines[0] == "A cat near a dog "  # \r\n read as a newline
    ref = [compbench.complex_parts(ps, i) for i in range(3)]
    fixed = [compbench.complex_parts(ps, i, scoring="corrected") for i in range(3)]
    assert [(p.spatial, p.non_spatial) for p in ref] == [(True, True), (False, True), (True, True)]
    assert [(p.spatial, p.non_spatial) for p in fixed] == [(True, False), (False, True), (True, True)]


@pytest.mark.skipif(not (compbench.packaged_prompt_dir() / "complex_val.txt").is_file(), reason="no shipped data")
def test_shipped_lists_split_the_complex_prompts_as_the_reference():
    (ps,) = compbench.load_prompt_sets(categories=["complex"])
    parts = [compbench.complex_parts(ps, i) for i in range(len(ps.prompts))]
    counts = {
        "spatial": sum(p.spatial and not p.non_spatial for p in parts),
        "action": sum(p.non_spatial and not p.spatial for p in parts),
        "all": sum(p.spatial and p.non_spatial for p in parts),
    }
    assert counts == {"spatial": 58, "action": 212, "all": 30}
    assert parts == [compbench.complex_parts(ps, i, scoring="corrected") for i in range(len(ps.prompts))]


# ------------------------------------------------------------------------------------ the reference dataset folder
def write_reference_layout(root):
    root.mkdir()
    files = {
        "color.txt": "a red cat\na blue dog\n",
        "color_train.txt": "a red train\n",
        "color_val.txt": "a red cat and a blue dog\r\n",
        "color_val_seen.txt": "a seen cat\n",
        "color_val_unseen.txt": "an unseen cat\n",
        "complex_val.txt": "The cat is near the dog.\n",
        "complex_val_spatial.txt": "The cat is near the dog.\n",
        "complex_val_action.txt": "A man reads.\n",
        "complex_val_spatialaction.txt": "x\n",
        "complex_train.txt": "A man rides a horse.\n",
        "complex_train_spatial.txt": "x\n",
        "complex_train_action.txt": "A man rides a horse.\n",
        "numeracy_val.txt": "three cats\n",
        "3d_spatial_val.txt": "a cat in front of a dog\n",
        "new_objects.txt": "cat\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_reference_dataset_folder_reads_one_split(tmp_path):
    root = write_reference_layout(tmp_path / "dataset")
    skipped: list[str] = []
    val = compbench.load_prompt_sets([root], skipped=skipped)
    assert [(ps.category, ps.path.name) for ps in val] == [("color", "color_val.txt"), ("complex", "complex_val.txt")]
    assert val[0].prompts == ["a red cat and a blue dog"]
    assert val[1].has_reference_lists and val[1].spatial_lines == ["The cat is near the dog."]
    assert sorted(skipped) == ["3d_spatial_val.txt", "numeracy_val.txt"]
    train = compbench.load_prompt_sets([root], split="train")
    assert [ps.path.name for ps in train] == ["color_train.txt", "complex_train.txt"]
    assert train[1].action_lines == ["A man rides a horse."]
    assert compbench.complex_parts(train[1], 0).non_spatial is True
    with pytest.raises(ConfigError, match="no \\*_test.txt"):
        compbench.load_prompt_sets([root], split="test")
    with pytest.raises(ConfigError, match="T2I-CompBench\\+\\+"):
        compbench.load_prompt_sets([root], categories=["numeracy"])
    with pytest.raises(ConfigError, match="--split"):
        compbench.load_prompt_sets([root / "color_val.txt", root / "color_train.txt"])
    with pytest.raises(ConfigError, match="only the val split ships"):
        compbench.load_prompt_sets(split="train")


# --------------------------------------------------------------------------------------------------------- parses
def test_shipped_parses_cover_every_shipped_prompt_and_record_their_maker():
    parser = compbench.PromptParser("auto")
    prompts = [p for ps in compbench.load_prompt_sets() for p in ps.prompts]
    info = parser.describe(prompts)
    assert info["prompts_by_source"] == {"shipped": 1800} and info["reference_parser"]
    header = parser.header
    assert header["model"] == "en_core_web_sm" and header["spacy"] and header["model_version"]
    assert header["made_by"] == "scripts/make_compbench_parses.py"
    # a stored parse gives back its prompt, its chunks are spans of it, its tags are spaCy's
    for text in prompts[::97]:
        parse = parser.parse(text)
        assert "".join(t.text + t.whitespace for t in parse.tokens) == text
        assert all(chunk in text for chunk in parse.noun_chunks)
        assert all(t.pos.isupper() and t.tag for t in parse.tokens)


def test_prompts_outside_the_shipped_set_use_spacy_or_are_marked_not_comparable():
    parser = compbench.PromptParser("auto")
    other = "a violet kite on the left of a tower"
    source = parser.parse(other).source
    info = parser.describe(["a green bench and a blue bowl", other])
    if importlib.util.find_spec("spacy") is None:
        assert source == "rules" and not info["reference_parser"]
        assert info["prompts_by_source"] == {"shipped": 1, "rules": 1}
    else:
        assert source in ("spacy", "rules")
    rules = compbench.PromptParser("rules")
    assert rules.describe(["a green bench and a blue bowl"])["prompts_by_source"] == {"rules": 1}


def test_shipped_parses_agree_with_the_rule_chunker_where_the_template_is_simple():
    # the two-object template "a <adj> <noun> and a <adj> <noun>" parses alike; free sentences need the shipped parse
    parser, rules = compbench.PromptParser("auto"), compbench.RuleParser()
    (color,) = compbench.load_prompt_sets(categories=["color"])
    same = sum(
        compbench.vqa_questions(parser.parse(p)) == compbench.vqa_questions(rules.parse(p)) for p in color.prompts
    )
    assert same == 261  # 87.0% of the colour prompts; scripts/make_compbench_parses.py --agreement prints them all
    assert compbench.vqa_questions(parser.parse("a green bench and a blue bowl")) == ["a green bench?", "a blue bowl?"]


@pytest.mark.skipif(importlib.util.find_spec("spacy") is None, reason="spaCy not installed")
def test_live_spacy_parses_equal_the_shipped_ones():
    try:
        live = compbench.SpacyParser()
    except OSError:
        pytest.skip("no en_core_web_sm pipeline")
    header, stored = compbench.shipped_parses()
    if live.name != f"spacy {header['spacy']} en_core_web_sm {header['model_version']}":
        pytest.skip(f"installed {live.name} is not the version that made the shipped parses")
    for text in list(stored)[::50]:
        assert compbench.parse_to_json(live.parse(text)) == stored[text]


def test_parse_json_round_trip():
    p = parse_of([("a", "DET"), ("cat", "NOUN"), (".", "PUNCT")], [(0, 2)])
    again = compbench.parse_from_json(p.text, json.loads(json.dumps(compbench.parse_to_json(p))), "test")
    assert again == p and again.noun_chunks == ["a cat"] and p.span_text(1, 9) == "cat."
