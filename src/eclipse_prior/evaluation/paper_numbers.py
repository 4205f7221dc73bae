"""T2I-CompBench numbers reported by the ECLIPSE paper (arXiv 2312.04655), to print beside a user's own.

Keyed by decoder family, because a prior is only comparable on the decoder it was judged with. Values are the
category means (BLIP-VQA for colour/shape/texture, detector rule for spatial, CLIPScore for non-spatial). The
paper does not report the complex category with these models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PaperRow:
    """One model of the paper's table; ``scores`` maps category -> value (missing: not reported)."""

    model: str
    prior_params: str
    data: str
    scores: dict[str, float] = field(default_factory=dict)


def _row(model: str, params: str, data: str, *values: float) -> PaperRow:
    cats = ("color", "shape", "texture", "spatial", "non_spatial")
    return PaperRow(model, params, data, dict(zip(cats, values, strict=False)))


PAPER_NUMBERS: dict[str, list[PaperRow]] = {
    "kandinsky22": [
        _row("Kandinsky v2.2 (diffusion prior)", "1B", "177M", 0.5768, 0.4999, 0.5760, 0.1912, 0.3132),
        _row("ECLIPSE-Kandinsky v2.2, LAION-HighRes", "34M", "5M", 0.6119, 0.5429, 0.6165, 0.1903, 0.3139),
    ],
    "karlo": [
        _row("Karlo (diffusion prior)", "1B", "115M", 0.5127, 0.5277, 0.5887, 0.1337, 0.3112),
        _row("ECLIPSE-Karlo, CC12M", "33M", "10M", 0.5660, 0.5234, 0.5941, 0.1625, 0.3196),
        _row("Projection, MSCOCO", "33M", "0.6M", 0.4667, 0.4421, 0.5051, 0.1478),
        _row("Diffusion-Baseline, MSCOCO", "33M", "0.6M", 0.4678, 0.4797, 0.4956, 0.1240),
        _row("ECLIPSE, MSCOCO", "33M", "0.6M", 0.5965, 0.5063, 0.6136, 0.1574),
    ],
}


def decoder_family(decoder: str) -> str | None:
    """``kandinsky22``/``karlo`` from a decoder name, hub id or folder name; None when it is neither."""
    name = os.path.basename(os.path.normpath(str(decoder))).lower() + " " + str(decoder).lower()
    if "kandinsky" in name:
        return "kandinsky22"
    if "karlo" in name:
        return "karlo"
    return None


def paper_rows(decoder: str) -> list[PaperRow]:
    """The paper's rows for the decoder family of ``decoder`` (empty when it matches neither)."""
    family = decoder_family(decoder)
    return PAPER_NUMBERS.get(family, []) if family else []
