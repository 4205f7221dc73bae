"""The benchmark's maths on constructed inputs: prompt files, noun phrases, the spatial rule, VQA products,
3-in-1 means, bootstrap intervals, win rates, Frechet distances and the paper's table."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from eclipse_prior.errors import ConfigError
from eclipse_prior.evaluation import compbench, frechet, paper_numbers, stats
from eclipse_prior.evaluation.compbench import Box, position_score, spatial_image_score

COMPBENCH_DIR = Path(__file__).resolve().parents[2] / "shared" / "t2i-compbench"
RULES = compbench.RuleParser()


# ------------------------------------------------------------------------------------------------- prompt files
def test_category_from_filename():
    assert compbench.category_from_filename("x/color_val.txt") == "color"
    assert compbench.category_from_filename("non_spatial_val.txt") == "non_spatial"
    assert compbench.category_from_filename("colour.txt") == "color"
    assert compbench.category_from_filename("my_prompts.txt") == "my_prompts"


def test_reads_the_shipped_prompts():
    sets = compbench.load_prompt_sets()  # no sources: the val prompts shipped in the package
    assert [ps.category for ps in sets] == list(compbench.CATEGORIES)  # the benchmark's order
    for ps in sets:
        assert len(ps.prompts) == 300
        assert all(p == p.strip() and "\r" not in p for p in ps.prompts)
    assert sets[-1].has_reference_lists
    color = compbench.load_prompt_sets(categories=["color"], max_prompts=3)
    assert [ps.category for ps in color] == ["color"] and len(color[0].prompts) == 3
    assert color[0].prompts[0] == "a green bench and a blue bowl"
    assert (compbench.packaged_prompt_dir() / "LICENSE.txt").read_text().startswith("MIT License")


@pytest.mark.skipif(not COMPBENCH_DIR.is_dir(), reason="T2I-CompBench prompt files not present")
def test_shipped_prompt_files_are_byte_copies_of_the_shared_ones():
    for f in COMPBENCH_DIR.glob("*.txt"):
        assert (compbench.packaged_prompt_dir() / f.name).read_bytes() == f.read_bytes(), f.name


def test_prompt_files_errors_and_complex_lists(tmp_path):
    (tmp_path / "complex_val.txt").write_text(
        "The cat is on the left of the dog.\r\nA man reads a red book.\r\n\r\n"
    )
    (tmp_path / "complex_val_spatial.txt").write_text("The cat is on the left of the dog.\n")
    (tmp_path / "complex_val_action.txt").write_text("A man reads a red book.\n")
    (tmp_path / "LICENSE.txt").write_text("MIT")
    (ps,) = compbench.load_prompt_sets([tmp_path])
    assert ps.category == "complex" and len(ps.prompts) == 2
    assert compbench.complex_parts(ps, 0) == compbench.ComplexParts(
        spatial=True, non_spatial=False, rule="reference-lists"
    )
    assert compbench.complex_parts(ps, 1).non_spatial is True
    assert compbench.complex_parts(ps, 1).spatial is False
    with pytest.raises(ConfigError, match="does not exist"):
        compbench.load_prompt_sets([tmp_path / "nope"])
    with pytest.raises(ConfigError, match="no prompt file for categories"):
        compbench.load_prompt_sets([tmp_path], categories=["spatial"])


# ---------------------------------------------------------------------------------------------- noun phrases, VQA
def test_rule_chunker_matches_spacy_on_the_template():
    assert RULES.parse("a green bench and a blue bowl").noun_chunks == ["a green bench", "a blue bowl"]
    assert RULES.parse("rubber sole shoes and fluffy clouds").noun_chunks == ["rubber sole shoes", "fluffy clouds"]
    assert RULES.parse("a red orange and a brown sheep").noun_chunks == ["a red orange", "a brown sheep"]
    assert compbench.vqa_questions(RULES.parse("an oblong cucumber and a teardrop plum")) == [
        "an oblong cucumber?",
        "a teardrop plum?",
    ]
    assert compbench.clipscore_text(RULES.parse("The red hat was on top of the brown coat rack."), True) == (
        "The hat was on top of the coat rack ."
    )


def test_vqa_product_of_known_probabilities():
    assert compbench.vqa_score([0.9, 0.5, 0.2], "corrected") == pytest.approx(0.09)
    assert compbench.vqa_score([0.7], "corrected") == pytest.approx(0.7)
    assert compbench.vqa_score([]) == 1.0  # no question asked: the reference multiplies by 1


def test_parser_choice():
    assert compbench.PromptParser("rules").parse("a green bench and a blue bowl").source == "rules"
    assert compbench.PromptParser("auto").parse("a green bench and a blue bowl").source == "shipped"
    with pytest.raises(ConfigError):
        compbench.PromptParser("nltk")
    if importlib.util.find_spec("spacy") is None:
        with pytest.raises(ConfigError, match="en_core_web_sm"):
            compbench.PromptParser("spacy")


# -------------------------------------------------------------------------------------------------- spatial rule
def sq(x: float, y: float, size: float = 100.0, score: float = 1.0) -> Box:
    return Box(x, y, x + size, y + size, score)


def test_box_iou():
    assert compbench.box_iou(sq(0, 0), sq(0, 0)) == pytest.approx(1.0)
    assert compbench.box_iou(sq(0, 0), sq(200, 0)) == 0.0
    assert compbench.box_iou(sq(0, 0), sq(50, 0)) == pytest.approx(5000 / 15000)


@pytest.mark.parametrize(
    "relation, box1, box2, expected",
    [
        ("on the left of", sq(0, 0), sq(300, 0), 1.0),  # dx = 300 > 0, no overlap
        ("on the left of", sq(300, 0), sq(0, 0), 0.0),  # object 1 is on the right
        ("on the left of", sq(0, 0), sq(50, 0), 0.1 / (1 / 3)),  # IoU 1/3 >= 0.1: penalised 0.1 / IoU
        ("on the left of", sq(0, 0), sq(100, 200), 0.0),  # |dy| > |dx|: not a left/right relation
        ("on the right of", sq(300, 0), sq(0, 0), 1.0),
        ("on the right of", sq(50, 0), sq(0, 0), 0.3),
        ("on the top of", sq(0, 0), sq(0, 300), 1.0),  # y grows down: dy > 0 means object 1 is above
        ("on the top of", sq(0, 300), sq(0, 0), 0.0),
        ("on top of", sq(0, 0), sq(0, 300), 0.0),  # the reference has no branch for it
        ("on the bottom of", sq(0, 300), sq(0, 0), 1.0),
        ("on the bottom of", sq(0, 0), sq(0, 300), 0.0),
        ("next to", sq(0, 0), sq(100, 100), 1.0),  # both centre distances under 150 px
        ("near", sq(0, 0), sq(100, 400), 1.0),  # |dx| = 100 < 150 is enough
        ("on side of", sq(0, 0), sq(300, 400), 150 / 400),  # else 150 / max(|dx|, |dy|)
    ],
)
def test_position_score_known_boxes(relation, box1, box2, expected):
    assert position_score(relation, box1, box2) == pytest.approx(expected)


def test_iou_exactly_at_threshold_scores_one():
    # boxes 100 wide overlapping by w: IoU = 100w / (20000 - 100w) = 0.1  <=>  w = 2000/110
    w = 2000 / 110
    b1, b2 = Box(0, 0, 100, 100), Box(100 - w, 0, 200 - w, 100)
    assert compbench.box_iou(b1, b2) == pytest.approx(0.1)
    assert position_score("on the left of", b1, b2) == pytest.approx(1.0)


def test_spatial_image_score_detections_and_confidence_weighting():
    a, b = sq(0, 0, score=0.8), sq(300, 0, score=0.9)
    assert spatial_image_score("on the left of", a, b, confidence_weighting=False) == 1.0
    assert spatial_image_score("on the left of", a, None, confidence_weighting=False) == 0.0
    assert spatial_image_score("on the left of", None, None, confidence_weighting=False) == 0.0
    # reference UniDet formula (the default): 0.25 * conf1 + 0.25 * conf2 + position / 2, zero below 0.5
    assert spatial_image_score("on the left of", a, b) == pytest.approx(0.925)
    assert spatial_image_score("on the right of", a, b) == 0.0  # 0.425 < 0.5
    assert spatial_image_score("on the left of", a, None) == 0.0  # 0.2 < 0.5
    assert position_score("behind", a, b) == 0.0  # the reference: no branch, score 0
    with pytest.raises(ConfigError):
        position_score("behind", a, b, scoring="corrected")


def test_corrected_spatial_query_takes_the_noun_phrases_around_the_relation():
    def query(text):
        return compbench.spatial_query(RULES.parse(text), scoring="corrected")

    assert query("a traffic light on the left of a stop sign") == compbench.SpatialQuery(
        "traffic light", "on the left of", "stop sign"
    )
    assert query("a mouse on side of a key").relation == "on side of"
    assert query("The red hat was on top of the brown coat rack.") == (
        compbench.SpatialQuery("red hat", "on top of", "brown coat rack")
    )
    assert query("a cat in a box") == compbench.SpatialQuery(None, None, None)
    assert query("a linear cat") == compbench.SpatialQuery(None, None, None)  # "near" only as a word


def test_complex_mean_of_applicable_parts(tmp_path):
    assert compbench.complex_score(0.6, None, 0.3) == pytest.approx(0.45)
    assert compbench.complex_score(0.6, 0.0, 0.3) == pytest.approx(0.3)
    # no 3-in-1 lists beside the file: spatial applies when the prompt states a relation
    (tmp_path / "complex_val.txt").write_text("The cat is on the left of the dog.\nA man reads a red book.\n")
    (ps,) = compbench.load_prompt_sets([tmp_path])
    assert not ps.has_reference_lists
    parts = compbench.complex_parts(ps, 0)
    assert (parts.attribute, parts.spatial, parts.non_spatial, parts.rule) == (True, True, True, "relation-phrase")
    assert compbench.complex_parts(ps, 1).spatial is False


# ---------------------------------------------------------------------------------------------------- statistics
def _direct_group_bootstrap(values, groups, n_resamples, confidence, seed):
    """The percentile interval of a cluster bootstrap written out: resample whole groups, pool their values."""
    labels = np.unique([str(g) for g in groups])
    members = [np.asarray(values)[[str(g) == label for g in groups]] for label in labels]
    picks = np.random.default_rng(seed).integers(0, len(labels), size=(n_resamples, len(labels)))
    means = [np.concatenate([members[i] for i in row]).mean() for row in picks]
    alpha = (1 - confidence) / 2
    return np.quantile(means, [alpha, 1 - alpha])


def test_bootstrap_interval_is_the_percentile_interval_and_deterministic():
    rng = np.random.default_rng(1)
    values = rng.normal(0.5, 0.1, size=200)
    groups = np.repeat(np.arange(50), 4)
    ci = stats.bootstrap_ci(values, groups, n_resamples=500, seed=3)
    assert (ci.low, ci.high) == pytest.approx(tuple(_direct_group_bootstrap(values, groups, 500, 0.95, 3)))
    assert ci.mean == pytest.approx(values.mean())
    # with few resamples the percentile interval can miss the mean; it is reported as is, not stretched
    few = stats.bootstrap_ci([0.1, 0.2, 0.3, 0.9], n_resamples=5, seed=13)
    assert (few.low, few.high) == pytest.approx(tuple(_direct_group_bootstrap([0.1, 0.2, 0.3, 0.9], range(4), 5,
                                                                              0.95, 13)))
    assert few.mean == pytest.approx(0.375) and few.mean < few.low
    assert ci == stats.bootstrap_ci(values, groups, n_resamples=500, seed=3)
    assert ci != stats.bootstrap_ci(values, groups, n_resamples=500, seed=4)
    # a prompt-level bootstrap is wider than an image-level one when images of a prompt agree
    clustered = np.repeat(rng.normal(0.5, 0.2, size=20), 10)
    by_prompt = stats.bootstrap_ci(clustered, np.repeat(np.arange(20), 10), seed=0)
    by_image = stats.bootstrap_ci(clustered, seed=0)
    assert by_prompt.high - by_prompt.low > 2 * (by_image.high - by_image.low)
    constant = stats.bootstrap_ci([0.25] * 5)
    assert (constant.low, constant.mean, constant.high) == (0.25, 0.25, 0.25)


def test_win_rate_hand_made_2x2():
    # two priors, two prompts x two seeds: A wins (prompt0, seed0) and (prompt1, seed1), ties (prompt1, seed0)
    a = [0.9, 0.1, 0.5, 0.8]
    b = [0.2, 0.7, 0.5, 0.3]
    assert stats.win_rate(a, b) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
    m = stats.win_rate_matrix({"A": a, "B": b})
    assert m["A"]["A"] is None and m["A"]["B"] == pytest.approx(0.625) and m["B"]["A"] == pytest.approx(0.375)
    with pytest.raises(ValueError):
        stats.win_rate([1.0], [1.0, 2.0])


# ------------------------------------------------------------------------------------------------------ Frechet
def test_frechet_identical_sets_is_zero():
    feats = np.random.default_rng(0).normal(size=(64, 8))
    assert frechet.frechet_distance_features(feats, feats) == pytest.approx(0.0, abs=1e-6)


def test_frechet_matches_gaussian_closed_form():
    # diagonal covariances: FD = |mu1 - mu2|^2 + sum_i (s1_i + s2_i - 2 sqrt(s1_i s2_i))
    mu1, mu2 = np.zeros(2), np.array([1.0, 2.0])
    s1, s2 = np.diag([1.0, 4.0]), np.diag([4.0, 9.0])
    assert frechet.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(5 + 1 + 1)
    # rotated full covariances keep the value (the distance is rotation invariant)
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    assert frechet.frechet_distance(
        rot @ mu1, rot @ s1 @ rot.T, rot @ mu2, rot @ s2 @ rot.T
    ) == pytest.approx(7)
    # sample statistics feed the same formula
    x = np.random.default_rng(0).normal(size=(500, 3))
    y = 2.0 * x + 1.0  # mean 1, covariance 4 * cov(x)
    mx, sx = frechet.feature_statistics(x)
    expected = frechet.frechet_distance(mx, sx, 2 * mx + 1, 4 * sx)
    assert frechet.frechet_distance_features(x, y) == pytest.approx(expected)
    with pytest.raises(ValueError):
        frechet.feature_statistics(np.zeros((1, 3)))


# ------------------------------------------------------------------------------------------------- paper numbers
def test_paper_numbers_by_decoder():
    assert paper_numbers.decoder_family("kandinsky22") == "kandinsky22"
    assert paper_numbers.decoder_family("kandinsky-community/kandinsky-2-2-decoder") == "kandinsky22"
    assert paper_numbers.decoder_family("kakaobrain/karlo-v1-alpha") == "karlo"
    assert paper_numbers.decoder_family("/tmp/my_decoder") is None
    eclipse_k = paper_numbers.paper_rows("kandinsky22")[1]
    assert eclipse_k.prior_params == "34M"
    assert eclipse_k.scores == {
        "color": 0.6119,
        "shape": 0.5429,
        "texture": 0.6165,
        "spatial": 0.1903,
        "non_spatial": 0.3139,
    }
    assert "non_spatial" not in paper_numbers.paper_rows("karlo")[-1].scores  # the MSCOCO ablation has four
    assert paper_numbers.paper_rows("/tmp/my_decoder") == []
