"""Why size captions fail: does a prior's embedding carry WHICH object is big, as a true image embedding does?

A size caption states two objects and which one is big ("a big red circle and a small blue square"). The judge
accepts a decode only if the sizes sit on the right objects, and the world makes each caption's two sizes one
big and one small, so only the binding matters. Three measurements, each on the benchmark's size captions:

- ``probe``: a logistic read-out of the binding (is the canonically first object the big one?) trained on fresh
  true render embeddings of random size scenes, applied to fresh renders of the evaluated compositions, to their
  centroids (mean of the bank's renders), to each prior's predictions, and, trained on text embeddings of random
  size captions, to the captions' text embeddings (does the prior's input carry it?);
- ``twin``: the prediction is closer (centred cosine) to its own composition's centroid than to the centroid of
  the same composition with the sizes swapped;
- ``margin``: the mean probe logit in the right direction, against fresh true renders' (a weakened signal shows
  as a smaller margin at the same accuracy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from eclipse_prior.shapes.captions import Composition, caption, composition
from eclipse_prior.shapes.metrics import encode_renders, scene_for
from eclipse_prior.shapes.world import render_array, sample_scene


def big_first(comp: Composition) -> float:
    """1.0 when the first object of the canonical composition is the big one."""
    return float(comp.canonical().objects[0].size == "big")


def swap_sizes(comp: Composition) -> Composition:
    """The same two objects with their sizes exchanged."""
    a, b = comp.objects
    return replace(comp, objects=(replace(a, size=b.size), replace(b, size=a.size))).canonical()


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, steps: int = 500, weight_decay: float = 1e-3) -> torch.nn.Linear:
    """Full-batch logistic regression on L2-normalised features (scaled to unit variance per dimension)."""
    torch.manual_seed(0)
    probe = torch.nn.Linear(x.shape[1], 1)
    opt = torch.optim.LBFGS(probe.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")
    feats = F.normalize(x.float(), dim=-1) * x.shape[1] ** 0.5

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(probe(feats).squeeze(1), y) + weight_decay * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def _score(probe: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        logits = probe(F.normalize(x.float(), dim=-1) * x.shape[1] ** 0.5).squeeze(1)
    signed = logits * (2 * y - 1)
    return {"accuracy": float((signed > 0).float().mean()), "margin": float(signed.mean())}


def size_binding_probe(bench: Any, run_dirs: dict[str, Sequence[Path]], n_train: int = 4000, seed: int = 7) -> dict:
    """The three measurements for the size captions of ``bench`` (a ``shapes.benchmark.Benchmark``).

    ``run_dirs``: row label -> trained run folders (one per seed); each is scored per seed and averaged.
    """
    from eclipse_prior.shapes.benchmark import load_run_prior, predict

    rng = np.random.default_rng(seed)
    clip = bench.clip
    train_scenes = [sample_scene(rng, "size") for _ in range(n_train)]
    train_comps = [composition(s) for s in train_scenes]
    y_train = torch.tensor([big_first(c) for c in train_comps])
    x_img = encode_renders(clip.vision_model, clip.image_processor, np.stack([render_array(s) for s in train_scenes]))
    img_probe = _fit_logistic(x_img, y_train)
    x_txt = clip.encode_text([caption(s, rng) for s in train_scenes])["text_embeds"].float()
    txt_probe = _fit_logistic(x_txt, y_train)

    idx = [i for i, c in enumerate(bench.eval_set.captions) if c.category == "size"]
    caps = [bench.eval_set.captions[i] for i in idx]
    comps = [bench.eval_set.gallery_compositions[c.key][0] for c in caps]
    y = torch.tensor([big_first(c) for c in comps])
    split = np.array([c.split for c in caps])
    fresh = encode_renders(clip.vision_model, clip.image_processor,
                           np.stack([render_array(scene_for(c, "size", rng)) for c in comps]))
    key_row = {k: i for i, k in enumerate(bench.bank.keys)}
    own = bench.bank.mean[[key_row[c.key] for c in caps]]
    swapped = torch.stack([
        encode_renders(clip.vision_model, clip.image_processor,
                       np.stack([render_array(scene_for(swap_sizes(c), "size", rng)) for _ in range(16)])).mean(0)
        for c in comps
    ])
    centre = bench.bank.centre

    def twin(pred: torch.Tensor, mask: torch.Tensor) -> float:
        p = F.normalize(pred - centre, dim=-1)
        own_cos = (p * F.normalize(own[mask] - centre, dim=-1)).sum(1)
        swap_cos = (p * F.normalize(swapped[mask] - centre, dim=-1)).sum(1)
        return float((own_cos > swap_cos).float().mean())

    def by_split(fn: Any, x: torch.Tensor) -> dict[str, Any]:
        out = {}
        for name in ("seen", "held-out"):
            mask = torch.from_numpy(split == name)
            if mask.any():
                out[name] = fn(x[mask], y[mask], mask)
        return out

    def image_row(x: torch.Tensor, with_twin: bool = True) -> dict[str, Any]:
        return by_split(lambda xs, ys, m: {**_score(img_probe, xs, ys), **({"twin": twin(xs, m)} if with_twin else {})},
                        x)

    text = bench.text["text_embeds"][idx]
    rows: dict[str, Any] = {
        "Text embedding (text-trained probe)": by_split(lambda xs, ys, m: _score(txt_probe, xs, ys), text),
        "Fresh true render": image_row(fresh),
        "Composition centroid (mean of renders)": image_row(own, with_twin=False),  # it is the own centroid
    }
    text_inputs = {k: v[idx] for k, v in bench.text.items()}
    for label, runs in run_dirs.items():
        per_seed = []
        for seed_i, run in enumerate(runs):
            pred = predict(load_run_prior(run), text_inputs, 1000 + seed_i, bench.cfg.prior_steps,
                           bench.cfg.prior_guidance)
            per_seed.append(image_row(pred))
        rows[label] = {s: {k: float(np.mean([r[s][k] for r in per_seed])) for k in per_seed[0][s]}
                       for s in per_seed[0]}
    return {"captions": len(idx), "probe_train_scenes": n_train, "rows": rows,
            "probe_train_accuracy_images": _score(img_probe, x_img, y_train)["accuracy"],
            "probe_train_accuracy_text": _score(txt_probe, x_txt, y_train)["accuracy"]}


def size_probe_markdown(report: dict) -> str:
    """The report as a markdown table (cells: seen / held-out)."""
    lines = ["| embedding | binding read-out accuracy | read-out margin | closer to own than size-swapped centroid |",
             "|---|---|---|---|"]
    for label, cells in report["rows"].items():
        def cell(key: str, cells: dict = cells) -> str:
            vals = [cells.get(s, {}).get(key) for s in ("seen", "held-out")]
            return " / ".join("—" if v is None else f"{v:.2f}" for v in vals)
        lines.append(f"| {label} | {cell('accuracy')} | {cell('margin')} | {cell('twin')} |")
    return "\n".join(lines)
