"""T2I-CompBench prompts and scoring rules, as the benchmark's reference code computes them.

Prompt files are T2I-CompBench's ``<category>_val.txt`` (one prompt per line; the category is the file name). They are
not shipped: users pass the folder. Everything here is pure Python so the maths can be tested on constructed inputs;
the neural scorers live in ``eclipse_prior.evaluation.scorers``.

Noun phrases come from spaCy (``en_core_web_sm`` ``noun_chunks``, as the reference does) when spaCy and that model are
installed, else from a deterministic rule-based chunker (:class:`RuleParser`); every result records which was used,
because the two can split complex sentences differently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eclipse_prior.errors import ConfigError

# The scorer models T2I-CompBench and the paper use (hub ids; a local folder works wherever one is accepted).
# Kept here, free of torch, so the CLI can show them without importing the models.
DEFAULT_VQA_MODEL = "Salesforce/blip-vqa-base"
DEFAULT_DETECTOR_MODEL = "google/owlv2-base-patch16-ensemble"
DEFAULT_CLIPSCORE_MODEL = "openai/clip-vit-base-patch32"
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_DINO_MODEL = "facebook/dinov2-base"

CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
ATTRIBUTE_CATEGORIES = ("color", "shape", "texture")
# The metric each category is judged by (T2I-CompBench); any other prompt file is judged by CLIPScore alignment.
CATEGORY_METRIC = {
    "color": "blip_vqa",
    "shape": "blip_vqa",
    "texture": "blip_vqa",
    "spatial": "spatial",
    "non_spatial": "clipscore",
    "complex": "3_in_1",
}
# Reference ``vocab_spatial`` in its search order ("near" before "on the left of"...). "on top of" is scored as
# "on the top of": the reference lists it but its position rule falls through to 0 for it (a bug that only touches
# complex prompts); we score the relation the words state.
SPATIAL_RELATIONS = (
    "on side of",
    "next to",
    "near",
    "on the left of",
    "on the right of",
    "on the bottom of",
    "on the top of",
    "on top of",
)
NEAR_RELATIONS = ("next to", "near", "on side of")
# The reference asks at most 8 noun phrases per prompt (``--np_num 8``).
MAX_NOUN_PHRASES = 8
# Companion lists of the reference's 3-in-1 rule; read when they lie beside complex_val.txt.
COMPLEX_SPATIAL_LIST = "complex_val_spatial.txt"
COMPLEX_ACTION_LIST = "complex_val_action.txt"
_NOT_PROMPT_FILES = {"license.txt", "readme.txt", COMPLEX_SPATIAL_LIST, COMPLEX_ACTION_LIST}


# ----------------------------------------------------------------------------------------------------- prompt files
@dataclass
class PromptSet:
    """The prompts of one file; ``spatial``/``action`` hold the reference 3-in-1 lists for complex prompts."""

    category: str
    path: Path
    prompts: list[str]
    spatial: set[str] | None = None
    action: set[str] | None = None


def category_from_filename(path: str | Path) -> str:
    """``color_val.txt`` -> ``color`` (``_val``/``_train``/``_test`` suffixes dropped; ``colour`` spelled ``color``)."""
    stem = Path(path).stem.lower()
    stem = re.sub(r"_(val|train|test)$", "", stem)
    return {"colour": "color", "non-spatial": "non_spatial", "nonspatial": "non_spatial"}.get(stem, stem)


def _read_lines(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f.read().splitlines() if line.strip()]


def _reference_key(prompt: str) -> str:
    """How the reference 3-in-1 script matches prompts to its lists: text before the first '.', lower-cased."""
    return prompt.strip().split(".")[0].lower()


def load_prompt_sets(
    sources: Sequence[str | Path], categories: Sequence[str] | None = None, max_prompts: int | None = None
) -> list[PromptSet]:
    """Read prompt files (folders are expanded to their ``*.txt``), keeping file order and the first ``max_prompts``."""
    files: list[Path] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.glob("*.txt") if f.name.lower() not in _NOT_PROMPT_FILES)
            if not found:
                raise ConfigError(f"no prompt files (*.txt) in folder {str(p)!r}")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"prompt file or folder {str(p)!r} does not exist")
    wanted = [category_from_filename(c) for c in categories] if categories else None
    sets: dict[str, PromptSet] = {}
    for f in files:
        cat = category_from_filename(f)
        if wanted is not None and cat not in wanted:
            continue
        if cat in sets:
            raise ConfigError(f"two prompt files give category {cat!r}: {sets[cat].path} and {f}")
        prompts = _read_lines(f)
        if max_prompts is not None:
            prompts = prompts[:max_prompts]
        if not prompts:
            raise ConfigError(f"prompt file {str(f)!r} holds no prompts")
        ps = PromptSet(category=cat, path=f, prompts=prompts)
        if cat == "complex":
            for name, attr in ((COMPLEX_SPATIAL_LIST, "spatial"), (COMPLEX_ACTION_LIST, "action")):
                if (f.parent / name).is_file():
                    setattr(ps, attr, {_reference_key(x) for x in _read_lines(f.parent / name)})
        sets[cat] = ps
    if wanted is not None:
        missing = [c for c in wanted if c not in sets]
        if missing:
            raise ConfigError(f"no prompt file for categories {missing}; found {sorted(sets)}")
    if not sets:
        raise ConfigError("no prompts to benchmark")
    # T2I-CompBench's order first (colour, shape, texture, spatial, non-spatial, complex), other files after
    order = {c: i for i, c in enumerate(CATEGORIES)}
    return sorted(sets.values(), key=lambda ps: (order.get(ps.category, len(order)), ps.category))


# -------------------------------------------------------------------------------------------------- noun phrases
_DETERMINERS = {
    "a",
    "an",
    "the",
    "this",
    "that",
    "these",
    "those",
    "some",
    "its",
    "his",
    "her",
    "their",
    "my",
    "our",
}
# Words that end a noun phrase in the rule-based chunker: punctuation, conjunctions, prepositions, relation words and
# the common verbs of the T2I-CompBench prompts. Dropped, never part of a phrase.
_BOUNDARY = set(
    ", . ; : ! ? and or but with without while in on at of near next to by from into onto over under above below "
    "behind beside besides between through for across inside outside around against along among toward towards "
    "beneath underneath top bottom left right side front back atop up down as than "
    "is are was were be been being am has have had does do did can could will would "
    "sits sit sitting stands stand standing lies lie lying rests resting hangs hanging hung parked sat placed "
    "holds holding hold led stood contrasted features featuring looks looking shines shining flash flashes covered filled made".split()
)
_PRONOUNS = {
    "it",
    "they",
    "he",
    "she",
    "one",
    "other",
    "another",
    "them",
    "there",
    "here",
    "who",
    "which",
    "what",
}
# Attribute words the rule-based parser treats as adjectives (the reference drops adjectives, found by spaCy's POS
# tagger, before CLIPScore of complex prompts).
_ATTRIBUTE_WORDS = set(
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden tan beige cyan "
    "whitish dark light colorful colourful round square rectangular triangular circular oval oblong spherical cubic "
    "conical cylindrical pyramidal pentagonal hexagonal teardrop diamond big small large tiny tall short long narrow "
    "wide huge little fluffy fabric glass leather metallic metal plastic rubber wooden wood soft hard smooth rough "
    "shiny striped dotted plain checkered clean empty old new".split()
)
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*|[,.;:!?]")


class RuleParser:
    """Deterministic noun-phrase chunker used when spaCy's ``en_core_web_sm`` is not installed.

    A phrase is a maximal run of words between boundary words (punctuation, conjunctions, prepositions, relation words,
    common verbs), determiners kept as spaCy keeps them ("a green bench"). On the two-object template that makes up
    most of the attribute files ("a green bench and a blue bowl") it gives spaCy's chunks exactly; on free sentences
    it is an approximation.
    """

    name = "rules"

    def noun_chunks(self, text: str) -> list[str]:
        chunks: list[list[str]] = [[]]
        for tok in _TOKEN.findall(text):
            if tok.lower() in _BOUNDARY:
                chunks.append([])
            else:
                chunks[-1].append(tok)
        out = []
        for words in chunks:
            content = [w for w in words if w.lower() not in _DETERMINERS and w.lower() not in _PRONOUNS]
            if content and not all(w.isdigit() for w in content):
                out.append(" ".join(words))
        return out

    def drop_adjectives(self, text: str) -> str:
        return " ".join(t for t in _TOKEN.findall(text) if t.lower() not in _ATTRIBUTE_WORDS)


class SpacyParser:
    """spaCy ``en_core_web_sm``: the parser T2I-CompBench's reference code uses."""

    name = "spacy:en_core_web_sm"

    def __init__(self) -> None:
        import spacy

        self.nlp = spacy.load("en_core_web_sm")

    def noun_chunks(self, text: str) -> list[str]:
        return [chunk.text for chunk in self.nlp(text).noun_chunks]

    def drop_adjectives(self, text: str) -> str:
        return " ".join(tok.text for tok in self.nlp(text) if tok.pos_ != "ADJ")


Parser = RuleParser | SpacyParser


def get_parser(kind: str = "auto") -> Parser:
    """``auto``: spaCy when it and ``en_core_web_sm`` are installed, else the rule-based chunker."""
    if kind not in ("auto", "spacy", "rules"):
        raise ConfigError(f"noun-phrase parser must be auto, spacy or rules, not {kind!r}")
    if kind == "rules":
        return RuleParser()
    try:
        return SpacyParser()
    except (ImportError, OSError) as err:
        if kind == "spacy":
            raise ConfigError(
                f"spaCy noun phrases need `pip install spacy` and its en_core_web_sm model ({err})"
            ) from err
        return RuleParser()


def vqa_questions(prompt: str, parser: Parser) -> list[str]:
    """The reference's BLIP-VQA questions: ``"<noun phrase>?"`` for the first 8 noun chunks of the prompt."""
    return [f"{chunk}?" for chunk in parser.noun_chunks(prompt)[:MAX_NOUN_PHRASES]]


def vqa_product(yes_probabilities: Sequence[float]) -> float:
    """Per-image attribute score: the product of P(yes) over the noun-phrase questions (1.0 when there are none)."""
    return float(math.prod(float(p) for p in yes_probabilities))


# ---------------------------------------------------------------------------------------------------- spatial rule
@dataclass(frozen=True)
class Box:
    """An axis-aligned box in image pixels (x grows right, y grows down) with the detector's confidence."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float
    score: float = 1.0

    @property
    def center(self) -> tuple[float, float]:
        return ((self.x_min + self.x_max) / 2, (self.y_min + self.y_max) / 2)

    @property
    def area(self) -> float:
        return max(0.0, self.x_max - self.x_min) * max(0.0, self.y_max - self.y_min)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when the union is empty)."""
    ix = max(0.0, min(a.x_max, b.x_max) - max(a.x_min, b.x_min))
    iy = max(0.0, min(a.y_max, b.y_max) - max(a.y_min, b.y_min))
    inter = ix * iy
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def position_score(
    relation: str, box1: Box, box2: Box, iou_threshold: float = 0.1, distance_threshold: float = 150.0
) -> float:
    """The reference ``determine_position``: does object 1 stand in ``relation`` to object 2?

    dx, dy = centre2 - centre1. "on the left of" scores 1 if dx > 0, |dx| > |dy| and IoU < 0.1, and 0.1/IoU when the
    boxes overlap more (0 otherwise); right/top/bottom by symmetry ("on the top of": dy > 0, y grows down). "next to",
    "near" and "on side of" score 1 if |dx| or |dy| < 150 px, else 150/max(|dx|, |dy|). Distances are in pixels of
    the image as generated, as in the reference (its images are 512 px).
    """
    (x1, y1), (x2, y2) = box1.center, box2.center
    dx, dy = x2 - x1, y2 - y1
    if relation in NEAR_RELATIONS:
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    directions = {
        "on the left of": (dx > 0, abs(dx) > abs(dy)),
        "on the right of": (dx < 0, abs(dx) > abs(dy)),
        "on the top of": (dy > 0, abs(dy) > abs(dx)),
        "on top of": (dy > 0, abs(dy) > abs(dx)),
        "on the bottom of": (dy < 0, abs(dy) > abs(dx)),
    }
    if relation not in directions:
        raise ConfigError(f"unknown spatial relation {relation!r}; known: {', '.join(SPATIAL_RELATIONS)}")
    side, dominant = directions[relation]
    if not (side and dominant):
        return 0.0
    iou = box_iou(box1, box2)
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def spatial_image_score(
    relation: str, box1: Box | None, box2: Box | None, confidence_weighting: bool = False
) -> float:
    """Per-image spatial score from the best box of each object (None: not detected).

    Default (the rule in DESIGN.md): the position score when both objects are found, else 0. With
    ``confidence_weighting`` the reference UniDet script's formula: 0.25 * conf1 + 0.25 * conf2 + position / 2 when
    both are found, 0.25 * conf of the one found otherwise, and any total below 0.5 set to 0. It is off by default
    because it assumes UniDet's confidence scale; open-vocabulary detectors (OWLv2) report much lower confidences.
    """
    if not confidence_weighting:
        return position_score(relation, box1, box2) if box1 is not None and box2 is not None else 0.0
    if box1 is not None and box2 is not None:
        score = 0.25 * box1.score + 0.25 * box2.score + position_score(relation, box1, box2) / 2
    elif box1 is not None or box2 is not None:
        score = 0.25 * (box1 or box2).score  # type: ignore[union-attr]
    else:
        score = 0.0
    return score if score >= 0.5 else 0.0


@dataclass(frozen=True)
class SpatialQuery:
    """Object 1, the relation and object 2 of a prompt, as detector text queries."""

    obj1: str
    relation: str
    obj2: str


def _find_relation(prompt: str) -> tuple[str, int, int] | None:
    low = prompt.lower()
    for rel in SPATIAL_RELATIONS:  # the reference's order decides ties, as its substring test does
        m = re.search(r"\b" + re.escape(rel) + r"\b", low)
        if m:
            return rel, m.start(), m.end()
    return None


def _object_name(chunk: str) -> str:
    words = chunk.split()
    while words and words[0].lower() in _DETERMINERS:
        words = words[1:]
    return " ".join(words)


def spatial_query(prompt: str, parser: Parser) -> SpatialQuery | None:
    """Find the relation phrase and the objects around it: the last noun phrase before it and the first after it.

    The reference takes the first and last NOUN tokens for its closed-vocabulary detector; an open-vocabulary
    detector takes the whole phrase (determiners dropped), e.g. "traffic light" rather than "traffic".
    """
    found = _find_relation(prompt)
    if found is None:
        return None
    rel, start, end = found
    before, after = parser.noun_chunks(prompt[:start]), parser.noun_chunks(prompt[end:])
    before = [c for c in map(_object_name, before) if c]
    after = [c for c in map(_object_name, after) if c]
    if not before or not after:
        return None
    return SpatialQuery(obj1=before[-1], relation=rel, obj2=after[0])


# -------------------------------------------------------------------------------------------------- complex (3-in-1)
@dataclass
class ComplexParts:
    """Which of attribute (BLIP-VQA), spatial (detector) and non-spatial (CLIPScore) apply to a complex prompt."""

    attribute: bool = True
    spatial: bool = False
    non_spatial: bool = False
    rule: str = field(default="")


def complex_parts(prompt: str, parser: Parser, prompt_set: PromptSet | None = None) -> ComplexParts:
    """The reference 3-in-1 rule: in its spatial list -> attribute + spatial; in its action list -> attribute +
    non-spatial; otherwise all three. Without those lists beside complex_val.txt: attribute and non-spatial always,
    spatial too when a known relation with two objects is found in the prompt.
    """
    if prompt_set is not None and prompt_set.spatial is not None and prompt_set.action is not None:
        key = _reference_key(prompt)
        if key in prompt_set.spatial:
            return ComplexParts(spatial=True, rule="reference-lists")
        if key in prompt_set.action:
            return ComplexParts(non_spatial=True, rule="reference-lists")
        return ComplexParts(spatial=True, non_spatial=True, rule="reference-lists")
    has_spatial = spatial_query(prompt, parser) is not None
    return ComplexParts(spatial=has_spatial, non_spatial=True, rule="relation-phrase")


def complex_score(attribute: float | None, spatial: float | None, non_spatial: float | None) -> float:
    """Mean of the component scores that apply (None: does not apply)."""
    parts = [p for p in (attribute, spatial, non_spatial) if p is not None]
    if not parts:
        raise ValueError("a complex prompt needs at least one component score")
    return float(sum(parts) / len(parts))
