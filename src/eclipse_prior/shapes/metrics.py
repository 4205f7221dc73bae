"""Composition-level embedding metrics: how close a prior's image embedding is to what its caption depicts.

A real dataset gives one image per caption, so a prior is scored against that one image. The shapes world can
render any caption's composition as often as we like, which gives its *distribution* of true CLIP image
embeddings. Two numbers come out of it, per caption:

- ``cos_true``: the expected cosine between the predicted embedding and a true image embedding of the caption's
  composition, E_k cos(pred, x_k) over K fresh renders (computed as pred_unit . mean_k(x_k unit));
- ``cos_centred``: the same after subtracting the centre of all true image embeddings from both sides. A small
  CLIP's image embeddings can sit in a narrow cone (every image at cosine ~0.95 to every other), where plain
  cosine barely separates a right prediction from a wrong one; the centred cosine measures whether the prediction
  points in the composition's own direction within the cone;
- ``top1``: whether, among the mean true embeddings of ALL compositions in the gallery, the predicted
  embedding is closest (cosine) to its own composition's. The gallery holds every evaluated composition plus a
  "twin" of each (the two objects' colours, shapes or positions swapped, or one attribute changed), so a prior
  that gets the attribute words right but binds them to the wrong objects is counted wrong.

Held-out compositions are those whose caption *mentions* a held-out colour-shape binding or a held-out shape
relation (``composition_held_out``); the shape category never mentions colour, so it has no held-out split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from eclipse_prior.shapes.captions import MENTIONS, Composition, caption, composition
from eclipse_prior.shapes.world import (
    CATEGORIES,
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    TEXTURES,
    Holdout,
    ObjectSpec,
    Scene,
    canonical_relation,
    render_array,
    sample_scene,
)

SPLITS: tuple[str, ...] = ("seen", "held-out")


def composition_held_out(comp: Composition, holdout: Holdout) -> bool:
    """True when the caption states a held-out binding (colour and shape of one object) or relation."""
    for obj in comp.objects:
        if obj.colour is not None and (obj.colour, obj.shape) in holdout.bindings:
            return True
    if comp.relation is not None and len(comp.objects) == 2:
        a, b = comp.objects
        return canonical_relation(a.shape, comp.relation, b.shape) in holdout.relations
    return False


def _choice(rng: np.random.Generator, items: Sequence[str]) -> str:
    return items[int(rng.integers(len(items)))]


def _centres(rng: np.random.Generator, relation: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """Object 0 and object 1 centres for a relation, with the same ranges the world's sampler uses."""
    near, far = float(rng.uniform(0.21, 0.30)), float(rng.uniform(0.70, 0.79))
    c0, c1 = float(rng.uniform(0.40, 0.60)), float(rng.uniform(0.40, 0.60))
    return {
        "left of": ((near, c0), (far, c1)),
        "right of": ((far, c0), (near, c1)),
        "above": ((c0, near), (c1, far)),
        "below": ((c0, far), (c1, near)),
    }[relation]


def scene_for(comp: Composition, category: str, rng: np.random.Generator) -> Scene:
    """A random scene whose ``category`` caption has exactly composition ``comp``.

    Attributes the caption does not mention (and positions, jitter, texture phase) are drawn at random, so many
    calls sample the composition's image distribution.
    """
    objs = []
    for desc in comp.objects:
        objs.append(ObjectSpec(
            colour=desc.colour or _choice(rng, list(COLOURS)),
            shape=desc.shape,
            texture=desc.texture or _choice(rng, TEXTURES),
            size=desc.size or _choice(rng, SIZES),
            scale=float(rng.uniform(0.92, 1.08)),
            phase=float(rng.uniform(0.0, 1.0)),
        ))
    if len(objs) == 1:
        x, y = rng.uniform(0.38, 0.62, size=2)
        return Scene((replace(objs[0], x=float(x), y=float(y)),), category, None)
    relation = comp.relation or _choice(rng, RELATIONS)
    (x0, y0), (x1, y1) = _centres(rng, relation)
    pair = (replace(objs[0], x=x0, y=y0), replace(objs[1], x=x1, y=y1))
    return Scene(pair, category, relation)


def twin_composition(comp: Composition, category: str, rng: np.random.Generator) -> Composition:
    """A hard negative: the same words bound differently (swap between the two objects) or one attribute changed."""
    mentioned, _ = MENTIONS[category]
    for _ in range(100):
        objs = list(comp.objects)
        relation = comp.relation
        if len(objs) == 2 and rng.random() < 0.8:
            options = [a for a in ("colour", "texture", "size") if a in mentioned] + ["shape"]
            if relation is not None:
                options.append("relation")
            what = _choice(rng, options)
            if what == "relation":  # positions swapped, or the relation turned to the other axis
                if rng.random() < 0.5:
                    objs.reverse()
                else:
                    relation = "above" if relation == "left of" else "left of"
            else:
                a, b = objs
                objs = [replace(a, **{what: getattr(b, what)}), replace(b, **{what: getattr(a, what)})]
        else:
            k = int(rng.integers(len(objs)))
            options = ["shape", *sorted(a for a in mentioned if a != "size" or len(objs) == 2)]
            what = _choice(rng, options)
            values = {"colour": list(COLOURS), "shape": list(SHAPES), "texture": list(TEXTURES), "size": list(SIZES)}
            objs[k] = replace(objs[k], **{what: _choice(rng, values[what])})
        cand = Composition(tuple(objs), relation).canonical()
        if cand != comp and _valid(cand, category):
            return cand
    raise ValueError(f"no twin found for {comp.key()}")


def _valid(comp: Composition, category: str) -> bool:
    """The composition is one a caption of this category can have (the two objects are told apart)."""
    if len(comp.objects) < 2:
        return True
    a, b = comp.objects
    if category == "size" and a.size == b.size:
        return False
    return a != b


@dataclass
class EvalCaption:
    """One evaluated caption: its text, composition, category, split and a scene that shows it."""

    text: str
    key: str
    category: str
    split: str
    scene: Scene


@dataclass
class EvalSet:
    """Evaluation captions plus the composition gallery (keys; their scenes for rendering)."""

    captions: list[EvalCaption]
    gallery: list[str]
    gallery_compositions: dict[str, tuple[Composition, str]]


def build_eval_set(
    holdout: Holdout,
    compositions_per_cell: int,
    paraphrases: int = 2,
    seed: int = 20231207,
    categories: Sequence[str] = CATEGORIES,
) -> EvalSet:
    """Seen and held-out compositions per category (distinct keys), paraphrased captions, and the gallery.

    Seen compositions are drawn as the prior's training data is (the holdout excludes their scenes); held-out
    ones from scenes that show a held-out composition, kept only when the caption itself states it.
    """
    rng = np.random.default_rng(seed)
    captions: list[EvalCaption] = []
    gallery: dict[str, tuple[Composition, str]] = {}
    for category in categories:
        for split in SPLITS:
            want_held = split == "held-out"
            keys: set[str] = set()
            for _ in range(200 * compositions_per_cell):
                if len(keys) == compositions_per_cell:
                    break
                try:
                    scene = sample_scene(rng, category, holdout=holdout, only_holdout=want_held)
                except ValueError:  # e.g. a holdout with no relation for a category that needs one
                    break
                comp = composition(scene)
                if composition_held_out(comp, holdout) != want_held or comp.key() in keys:
                    continue
                keys.add(comp.key())
                gallery[comp.key()] = (comp, category)
                for _ in range(paraphrases):
                    captions.append(EvalCaption(caption(scene, rng), comp.key(), category, split, scene))
    for comp, category in list(gallery.values()):
        twin = twin_composition(comp, category, rng)
        gallery.setdefault(twin.key(), (twin, category))
    return EvalSet(captions, list(gallery), gallery)


@dataclass
class CompositionBank:
    """Per gallery composition: mean raw true image embedding and mean unit embeddings over K renders."""

    keys: list[str]
    mean: torch.Tensor  # (C, E) raw
    mean_unit: torch.Tensor  # (C, E) mean of L2-normalised embeddings
    centre: torch.Tensor  # (E,) mean of every render's embedding
    mean_unit_centred: torch.Tensor  # (C, E) mean of L2-normalised (embedding - centre)

    @classmethod
    def from_renders(cls, keys: list[str], emb: torch.Tensor) -> CompositionBank:
        """From (C, K, E) raw embeddings of K renders of each of C compositions."""
        centre = emb.mean((0, 1))
        return cls(keys, emb.mean(1), F.normalize(emb, dim=-1).mean(1), centre,
                   F.normalize(emb - centre, dim=-1).mean(1))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The arrays, for caching as safetensors."""
        return {"mean": self.mean, "mean_unit": self.mean_unit, "centre": self.centre,
                "mean_unit_centred": self.mean_unit_centred}

    def rows(self, keys: Sequence[str]) -> torch.Tensor:
        """Gallery indices of the given keys."""
        pos = {k: i for i, k in enumerate(self.keys)}
        return torch.tensor([pos[k] for k in keys], dtype=torch.long)


@torch.no_grad()
def encode_renders(vision_model, image_processor, images: np.ndarray, batch_size: int = 512) -> torch.Tensor:
    """Raw CLIP image embeddings (N, E) of uint8 renders, through the CLIP's own image processor."""
    from PIL import Image

    out = []
    for i in range(0, len(images), batch_size):
        pil = [Image.fromarray(im) for im in images[i : i + batch_size]]
        pixels = image_processor(images=pil, return_tensors="pt")["pixel_values"]
        out.append(vision_model(pixel_values=pixels.to(vision_model.dtype)).image_embeds.float())
    return torch.cat(out)


def build_bank(
    eval_set: EvalSet, vision_model, image_processor, renders: int = 16, seed: int = 7
) -> CompositionBank:
    """Render every gallery composition ``renders`` times and embed them with the CLIP image tower."""
    rng = np.random.default_rng(seed)
    images = np.stack([
        render_array(scene_for(comp, category, rng))
        for key in eval_set.gallery
        for comp, category in [eval_set.gallery_compositions[key]]
        for _ in range(renders)
    ])
    emb = encode_renders(vision_model, image_processor, images).view(len(eval_set.gallery), renders, -1)
    return CompositionBank.from_renders(list(eval_set.gallery), emb)


def caption_scores(pred: torch.Tensor, keys: Sequence[str], bank: CompositionBank) -> dict[str, np.ndarray]:
    """Per caption: ``cos_true``, ``cos_centred`` (expected cosines to a true render) and ``top1`` (retrieval)."""
    pred = pred.float()
    pred_unit = F.normalize(pred, dim=-1)
    rows = bank.rows(keys)
    cos_true = (pred_unit * bank.mean_unit[rows]).sum(-1)
    cos_centred = (F.normalize(pred - bank.centre, dim=-1) * bank.mean_unit_centred[rows]).sum(-1)
    top1 = (pred_unit @ F.normalize(bank.mean, dim=-1).T).argmax(-1) == rows
    return {name: value.numpy().astype(np.float64)
            for name, value in (("top1", top1), ("cos_true", cos_true), ("cos_centred", cos_centred))}


def cell_means(scores: dict[str, np.ndarray], captions: Sequence[EvalCaption]) -> dict[str, dict[str, float]]:
    """Average per-caption scores per category and split: metric -> ``"<category>/<split>"`` -> value.

    ``"all/<split>"`` averages the captions of the categories that have BOTH splits, so seen and held-out are
    compared over the same categories (the shape category, which has no held-out compositions, is reported on
    its own only). Empty cells are left out.
    """
    cats = np.array([c.category for c in captions])
    splits = np.array([c.split for c in captions])
    order = list(dict.fromkeys(cats.tolist()))
    both = [c for c in order if all(((cats == c) & (splits == s)).any() for s in SPLITS)]
    out: dict[str, dict[str, float]] = {}
    for metric, values in scores.items():
        cells: dict[str, float] = {}
        for category in [*order, "all"]:
            in_cat = np.isin(cats, both) if category == "all" else cats == category
            for split in SPLITS:
                mask = in_cat & (splits == split)
                if mask.any():
                    cells[f"{category}/{split}"] = float(np.mean(values[mask]))
        out[metric] = cells
    return out
