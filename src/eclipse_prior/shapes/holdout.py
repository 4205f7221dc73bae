"""Held-out compositions: the default list and the ``--holdout-file`` parser.

Held-out compositions never appear in prior training data (the scene sampler rejects any scene that shows
one), but the CLIP, decoder and judge are trained on the whole world, as web-scale pretrained parts would be.

Default list (``DEFAULT_HOLDOUT``), one colour-shape binding per colour, each shape at least once:
orange square, purple star, green heart, blue triangle, yellow hexagon, white circle, red star, black heart;
plus two shape relations in two-object scenes: "circle left of triangle" and "heart above square"
(a relation is held out in both directions of phrasing: "triangle right of circle" is the same scene).

File format: one composition per line, ``#`` starts a comment, blank lines are ignored; a line is either
"<colour> <shape>" (a binding) or "<shape> <relation> <shape>" with relation one of
"left of", "right of", "above", "below".
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from eclipse_prior.errors import EclipsePriorError
from eclipse_prior.shapes.world import COLOURS, RELATIONS, SHAPES, Holdout, canonical_relation


class HoldoutError(EclipsePriorError, ValueError):
    """A held-out list line that names no valid composition."""


DEFAULT_HOLDOUT_LINES: tuple[str, ...] = (
    "orange square",
    "purple star",
    "green heart",
    "blue triangle",
    "yellow hexagon",
    "white circle",
    "red star",
    "black heart",
    "circle left of triangle",
    "heart above square",
)


def parse_holdout_lines(lines: Iterable[str], source: str = "<holdout>") -> Holdout:
    """Parse holdout lines (comments and blanks skipped); a bad line raises HoldoutError naming it."""
    bindings: set[tuple[str, str]] = set()
    relations: set[tuple[str, str, str]] = set()
    for number, raw in enumerate(lines, start=1):
        words = raw.split("#", 1)[0].lower().split()
        if not words:
            continue
        where = f"{source}:{number}: {raw.strip()!r}"
        if len(words) == 2:
            colour, shape = words
            if colour not in COLOURS or shape not in SHAPES:
                raise HoldoutError(
                    f"{where} is not '<colour> <shape>' (colours: {', '.join(COLOURS)}; "
                    f"shapes: {', '.join(SHAPES)})"
                )
            bindings.add((colour, shape))
            continue
        a, b, relation = words[0], words[-1], " ".join(words[1:-1])
        if len(words) < 3 or a not in SHAPES or b not in SHAPES or relation not in RELATIONS:
            raise HoldoutError(
                f"{where} is neither '<colour> <shape>' nor '<shape> <relation> <shape>' "
                f"(relations: {', '.join(RELATIONS)})"
            )
        relations.add(canonical_relation(a, relation, b))
    return Holdout(frozenset(bindings), frozenset(relations))


def load_holdout(path: str | Path | None) -> Holdout:
    """The held-out set from a file, or the documented default when ``path`` is None."""
    if path is None:
        return DEFAULT_HOLDOUT
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise HoldoutError(f"cannot read holdout file {p}: {exc.strerror or exc}") from None
    return parse_holdout_lines(text.splitlines(), source=str(p))


DEFAULT_HOLDOUT: Holdout = parse_holdout_lines(DEFAULT_HOLDOUT_LINES, source="default")
