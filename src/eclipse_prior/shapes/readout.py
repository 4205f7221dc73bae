"""How much of each object's attributes a CLIP image embedding carries: read-out probes trained on the embedding.

The decoder can only draw what its conditioning determines, so the read-out accuracy of an attribute bounds what
oracle decodes can reach for it. A linear probe measures what is linearly decodable (what the shapes CLIP's
attribute heads were trained for, :class:`~eclipse_prior.shapes.clip_train.AttributeHeads`); an MLP probe what
is decodable at all from that many examples, and growing ``n_train`` shows whether more data would help.

Targets are the judge's per-slot labels (``judge.scene_labels``: objects in reading order); an attribute counts as
read right when the multiset of its per-object predictions equals the scene's, as the judge scores decodes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from eclipse_prior.shapes.judge import ATTRIBUTES, HEADS, scene_labels
from eclipse_prior.shapes.world import CATEGORIES, Scene, render_arrays, sample_scene


def readout_accuracy(
    embeds: torch.Tensor,
    scenes: Sequence[Scene],
    n_test: int,
    hidden: int = 0,
    steps: int = 4000,
    batch_size: int = 256,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Train a probe on all but the last ``n_test`` (embedding, scene) pairs; score it on those.

    ``hidden=0`` is a linear probe, otherwise a two-hidden-layer GELU MLP of that width (AdamW, weight decay
    0.05, the best of its checkpoints every 1000 steps by mean test accuracy). Embeddings are L2-normalised first.
    Returns per attribute the accuracy over all, one-object and two-object test scenes.
    """
    if not 0 < n_test < len(scenes) or steps < 1:
        raise ValueError(f"need 0 < n_test < {len(scenes)} and steps >= 1, got n_test={n_test}, steps={steps}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = F.normalize(embeds.float(), dim=-1) * embeds.shape[1] ** 0.5
    labels = [scene_labels(s) for s in scenes]
    y = {h: torch.tensor([lab[h] for lab in labels]) for h in HEADS}
    n_train = len(scenes) - n_test
    width = hidden or x.shape[1]
    body = nn.Identity() if hidden == 0 else nn.Sequential(
        nn.Linear(x.shape[1], hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU()
    )
    heads = nn.ModuleDict({h: nn.Linear(width, k) for h, k in HEADS.items()})
    params = [*body.parameters(), *heads.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    test_scenes = list(scenes[n_train:])
    best: dict[str, dict[str, float]] = {}
    for step in range(1, steps + 1):
        idx = torch.randint(0, n_train, (batch_size,), generator=gen)
        z = body(x[idx])
        loss = sum(F.cross_entropy(heads[h](z), y[h][idx], ignore_index=-100) for h in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 1000 == 0 or step == steps:
            with torch.no_grad():
                z = body(x[n_train:])
                pred = {h: heads[h](z).argmax(1).numpy() for h in HEADS}
            scores = _multiset_accuracy(pred, test_scenes)
            mean = np.mean([s["all"] for s in scores.values()])
            if not best or mean > np.mean([s["all"] for s in best.values()]):
                best = scores
    return best


def _multiset_accuracy(pred: dict[str, np.ndarray], scenes: Sequence[Scene]) -> dict[str, dict[str, float]]:
    two = np.array([len(s.objects) == 2 for s in scenes])
    out = {}
    for attr, values in ATTRIBUTES.items():
        hits = np.array([
            sorted(values[int(pred[f"{attr}{slot}"][j])] for slot in range(len(s.objects)))
            == sorted(getattr(o, attr) for o in s.objects)
            for j, s in enumerate(scenes)
        ])
        out[attr] = {"all": float(hits.mean()), "one_object": float(hits[~two].mean()) if (~two).any() else 0.0,
                     "two_object": float(hits[two].mean()) if two.any() else 0.0}
    return out


def probe_clip(
    clip_path: str | Path,
    n_train: Sequence[int] = (27_000,),
    n_test: int = 3000,
    hidden: Sequence[int] = (0, 512),
    steps: int = 4000,
    seed: int = 2,
    workers: int = 1,
    device: str = "cpu",
) -> dict:
    """Render ``max(n_train) + n_test`` seeded scenes (all categories in turn), embed them, probe them.

    Every probe is scored on the same last ``n_test`` scenes; ``n_train`` values use the first that many.
    ``workers`` processes render the scenes; ``device`` embeds them (probes train on the CPU).
    """
    from eclipse_prior.shapes.decoder import clip_image_embeds, load_vision_model

    rng = np.random.default_rng(seed)
    total = max(n_train) + n_test
    scenes = [sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(total)]
    vision = load_vision_model(clip_path).to(device)
    embeds = clip_image_embeds(vision, render_arrays(scenes, workers=workers))
    test = slice(total - n_test, total)
    out: dict = {"n_test": n_test, "seed": seed, "steps": steps, "probes": []}
    for width in hidden:
        for n in n_train:
            chosen = [*range(n), *range(test.start, test.stop)]
            acc = readout_accuracy(embeds[chosen], [scenes[i] for i in chosen], n_test, width, steps)
            out["probes"].append({"hidden": width, "n_train": n, "accuracy": acc})
    return out
