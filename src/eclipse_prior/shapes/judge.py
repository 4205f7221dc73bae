"""The shapes-world judge: a small CNN that reads a scene's objects back from pixels, and scores captions.

Design (the T2I-CompBench role: BLIP-VQA for attributes, a detector for relations):

- Heads: ``count`` (1 or 2 objects), ``layout`` (two objects side by side or one above the other), and per
  object *slot* ``colour``, ``shape``, ``texture``, ``size``. Slots are ordered by position: one object is
  slot 0; two objects side by side are (left, right), one above the other (top, bottom).
- :meth:`ShapesJudge.score` checks an image against a caption's :class:`Composition`: the object count must
  match, every mentioned attribute must be read on the object it is bound to (for "A and B" either slot
  assignment may hold), and a relation must follow from the predicted layout and slot order ("A left of B":
  side-by-side layout with A in the left slot). It returns the verdict per aspect and a soft score (product of
  the probabilities of what the caption asserts, like BLIP-VQA's product of "yes" probabilities).
- Training (:func:`build_judge`): renders of random scenes from every category with their true attributes,
  light noise/blur augmentation so decoded images are read too; accuracy reported per head on clean renders.

Runtime of :func:`build_judge` (2 shared CPU cores, 1 thread): about 32 minutes with the defaults (measured 1913 s, 2500 steps, shared CPU).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import permutations
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from PIL import Image
from torch import nn

from eclipse_prior.shapes.captions import Composition, ObjectDesc
from eclipse_prior.shapes.checkpoint import load_state, replacing_dir, save_state
from eclipse_prior.shapes.world import (
    CATEGORIES,
    COLOURS,
    SHAPES,
    SIZES,
    TEXTURES,
    Scene,
    render_array,
    sample_scene,
)

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "texture": TEXTURES,
    "size": SIZES,
}
LAYOUTS: tuple[str, ...] = ("horizontal", "vertical")


def slot_order(scene: Scene) -> tuple[list[int], str]:
    """Object indices in slot order, and the layout (side by side = horizontal)."""
    if len(scene.objects) == 1:
        return [0], "horizontal"
    a, b = scene.objects
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return ([0, 1] if dx > 0 else [1, 0]), "horizontal"
    return ([0, 1] if dy > 0 else [1, 0]), "vertical"


def scene_labels(scene: Scene) -> dict[str, int]:
    """Training targets of the judge heads (-100 marks an absent second slot: ignored by the loss)."""
    order, layout = slot_order(scene)
    labels = {"count": len(scene.objects) - 1, "layout": LAYOUTS.index(layout) if len(order) == 2 else -100}
    for slot in range(2):
        for attr, values in ATTRIBUTES.items():
            labels[f"{attr}{slot}"] = (
                values.index(getattr(scene.objects[order[slot]], attr)) if slot < len(order) else -100
            )
    return labels


HEADS: dict[str, int] = {"count": 2, "layout": 2} | {
    f"{attr}{slot}": len(values) for slot in range(2) for attr, values in ATTRIBUTES.items()
}


class ShapesJudge(ModelMixin, ConfigMixin):
    """CNN over 64x64 renders with one classification head per entry of ``HEADS``."""

    @register_to_config
    def __init__(self, channels: Sequence[int] = (32, 64, 128), hidden: int = 192):
        super().__init__()
        c0, c1, c2 = channels

        def block(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout), nn.GELU())

        self.features = nn.Sequential(
            block(3, c0, 5, 2),  # 32x32: a 5x5 stride-2 stem still resolves stripes and dots
            nn.MaxPool2d(2),  # 16x16
            block(c0, c1),
            nn.MaxPool2d(2),  # 8x8
            block(c1, c2),
            nn.MaxPool2d(2),  # 4x4: coarse positions stay in the flattened map (slot order, layout)
        )
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(c2 * 16, hidden), nn.GELU())
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, n) for name, n in HEADS.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for (B, 3, 64, 64) pixels in [-1, 1]."""
        h = self.trunk(self.features(pixels))
        return {name: head(h) for name, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: Sequence[Image.Image] | np.ndarray) -> list[dict[str, np.ndarray]]:
        """Per image, the probability vector of every head."""
        self.eval()
        pixels = to_pixels(images).to(self.device, self.dtype)
        probs = {k: F.softmax(v.float(), dim=-1).cpu().numpy() for k, v in self(pixels).items()}
        return [{k: v[i] for k, v in probs.items()} for i in range(len(pixels))]

    def score(self, image: Image.Image | np.ndarray, target: Composition) -> JudgeVerdict:
        """Whether the image shows the composition (one image)."""
        return self.score_batch([image], [target])[0]

    def score_batch(
        self, images: Sequence[Image.Image] | np.ndarray, targets: Sequence[Composition]
    ) -> list[JudgeVerdict]:
        """Verdicts for many images at once."""
        return [verdict(p, t) for p, t in zip(self.read(images), targets, strict=True)]


def to_pixels(images: Sequence[Image.Image] | np.ndarray) -> torch.Tensor:
    """PIL images (resized to 64x64 if needed) or a uint8 (B, 64, 64, 3) array -> (B, 3, 64, 64) in [-1, 1]."""
    if not isinstance(images, np.ndarray):
        images = np.stack([
            np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BICUBIC)
                       if im.size != (64, 64) else im.convert("RGB"))
            for im in images
        ])
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


@dataclass
class JudgeVerdict:
    """A judge's reading of one image against one composition."""

    correct: bool
    count: bool
    attributes: bool
    relation: bool
    score: float
    read: dict[str, str] = field(default_factory=dict)


def _assignment_prob(desc: ObjectDesc, probs: dict[str, np.ndarray], slot: int) -> tuple[bool, float]:
    ok, p = True, 1.0
    for attr, values in ATTRIBUTES.items():
        want = getattr(desc, attr)
        if want is None:
            continue
        vec = probs[f"{attr}{slot}"]
        ok &= int(vec.argmax()) == values.index(want)
        p *= float(vec[values.index(want)])
    return ok, p


def verdict(probs: dict[str, np.ndarray], target: Composition) -> JudgeVerdict:
    """Score one image's head probabilities against a composition (see module docstring)."""
    target = target.canonical()
    n = len(target.objects)
    count_ok = int(probs["count"].argmax()) == n - 1
    p_count = float(probs["count"][n - 1])
    layout = LAYOUTS[int(probs["layout"].argmax())]
    read = {"count": str(int(probs["count"].argmax()) + 1), "layout": layout}
    for slot in range(2):
        for attr, values in ATTRIBUTES.items():
            read[f"{attr}{slot}"] = values[int(probs[f"{attr}{slot}"].argmax())]
    results = {}
    for order in permutations(range(n)):
        parts = [_assignment_prob(d, probs, s) for d, s in zip(target.objects, order, strict=True)]
        results[order] = (all(o for o, _ in parts), math.prod(q for _, q in parts))
    # attributes: every object is there with its attributes, wherever it is (binding, not placement)
    attrs_ok = any(ok for ok, _ in results.values())
    p_attrs = max(p for _, p in results.values())
    relation_ok, p_rel, placed_ok = True, 1.0, attrs_ok
    if target.relation is not None:
        # canonical relations put object 0 left of / above object 1: slot order (0, 1) in the right layout
        want = "horizontal" if target.relation == "left of" else "vertical"
        placed_ok, p_attrs = results[(0, 1)]
        relation_ok = layout == want and placed_ok
        p_rel = float(probs["layout"][LAYOUTS.index(want)])
    return JudgeVerdict(
        correct=bool(count_ok and attrs_ok and placed_ok and relation_ok),
        count=bool(count_ok),
        attributes=bool(attrs_ok),
        relation=bool(relation_ok),
        score=p_count * p_attrs * p_rel,
        read=read,
    )


@dataclass
class JudgeTrainConfig:
    """Training settings of the judge."""

    steps: int = 2500
    batch_size: int = 64
    lr: float = 2e-3
    pool_size: int = 20_000
    seed: int = 1
    threads: int = 1
    checkpoint_every: int = 250


def _augment(pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Light noise and, for some images, a blur: decoded images are not pixel-perfect renders."""
    b = pixels.shape[0]
    sigma = torch.rand(b, 1, 1, 1, generator=gen) * 0.08
    out = pixels + sigma * torch.randn(pixels.shape, generator=gen)
    blur = torch.rand(b, generator=gen) < 0.3
    if blur.any():
        small = F.avg_pool2d(out[blur], 2)
        out[blur] = F.interpolate(small, scale_factor=2, mode="bilinear", align_corners=False)
    return out


def _labels_tensor(scenes: Sequence[Scene]) -> dict[str, torch.Tensor]:
    rows = [scene_labels(s) for s in scenes]
    return {k: torch.tensor([r[k] for r in rows]) for k in HEADS}


def train_judge(cfg: JudgeTrainConfig, work_dir: str | Path, log: Callable[[str], None] = print) -> ShapesJudge:
    """Train (resuming from ``work_dir`` when a checkpoint is there) and return the float32 judge."""
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    model = ShapesJudge()
    rng = np.random.default_rng(cfg.seed)
    scenes = [sample_scene(rng, CATEGORIES[i % len(CATEGORIES)]) for i in range(cfg.pool_size)]
    cache = work / f"judge-pool-{cfg.seed}-{cfg.pool_size}.npy"
    if cache.exists():
        images = np.load(cache)
    else:
        t0 = time.time()
        images = np.stack([render_array(s) for s in scenes])
        np.save(work / "judge-pool.tmp.npy", images)
        os.replace(work / "judge-pool.tmp.npy", cache)
        log(f"rendered {len(scenes)} judge scenes in {time.time() - t0:.0f}s")
    labels = _labels_tensor(scenes)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warmup = max(1, cfg.steps // 20)
    gen = torch.Generator().manual_seed(cfg.seed)
    ckpt, start = work / "judge-ckpt.safetensors", 0
    if ckpt.exists():
        start = load_state(ckpt, {"judge": model}, opt, gen)["step"]
        log(f"resumed judge from step {start}")
    model.train()
    t0 = time.time()
    for step in range(start, cfg.steps):
        idx = torch.randint(len(scenes), (cfg.batch_size,), generator=gen)
        pixels = _augment(to_pixels(images[idx.numpy()]), gen)
        logits = model(pixels)
        loss = sum(F.cross_entropy(logits[k], labels[k][idx], ignore_index=-100) for k in HEADS)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * min((step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 50 == 0:
            log(f"judge step {step + 1}/{cfg.steps} loss {loss.item():.4f} "
                f"{(step + 1 - start) / (time.time() - t0):.2f} it/s")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            save_state(ckpt, {"judge": model}, opt, gen, {"step": step + 1})
    model.eval()
    return model


@torch.no_grad()
def evaluate_judge(model: ShapesJudge, n_per_category: int = 300, seed: int = 999) -> dict[str, float]:
    """Per-head accuracy on fresh clean renders, and caption-level accuracy per category (should be ~1)."""
    from eclipse_prior.shapes.captions import composition

    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, c) for c in CATEGORIES for _ in range(n_per_category)]
    images = np.stack([render_array(s) for s in scenes])
    probs = model.read(images)
    labels = _labels_tensor(scenes)
    out: dict[str, float] = {}
    for head in HEADS:
        y = labels[head].numpy()
        pred = np.array([p[head].argmax() for p in probs])
        keep = y != -100
        out[f"head/{head}"] = float((pred[keep] == y[keep]).mean())
    for attr in ATTRIBUTES:
        out[f"attribute/{attr}"] = min(out[f"head/{attr}0"], out[f"head/{attr}1"])
    for i, category in enumerate(CATEGORIES):
        chunk = range(i * n_per_category, (i + 1) * n_per_category)
        out[f"caption/{category}"] = float(np.mean([verdict(probs[j], composition(scenes[j])).correct
                                                     for j in chunk]))
    return out


def build_judge(
    out_dir: str | Path,
    work_dir: str | Path | None = None,
    config: JudgeTrainConfig | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Train the judge, save it (fp16 safetensors) to ``out_dir`` and return its clean-render accuracy.

    Runtime: ~32 min on 2 shared CPU cores (measured 1913 s) with the default config; resumable from ``work_dir``.
    """
    cfg = config or JudgeTrainConfig()
    work = Path(work_dir) if work_dir is not None else Path(out_dir).parent / "judge-work"
    t0 = time.time()
    model = train_judge(cfg, work, log)
    train_s = time.time() - t0
    metrics = evaluate_judge(model)
    metrics["train_seconds"] = train_s
    out = Path(out_dir)
    with replacing_dir(out) as tmp:
        model.to(torch.float16).save_pretrained(tmp)
        model.to(torch.float32)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    log(json.dumps(metrics, indent=2))
    return metrics


def load_judge(path: str | Path | None = None, dtype: torch.dtype = torch.float32) -> ShapesJudge:
    """The shipped judge (or one saved at ``path``), in eval mode."""
    folder = Path(path) if path is not None else Path(__file__).parent / "weights" / "judge"
    return ShapesJudge.from_pretrained(folder, torch_dtype=dtype, use_safetensors=True).eval()


def read_objects(probs: dict[str, np.ndarray]) -> list[dict[str, str]]:
    """The objects a judge reading shows, in slot order (left->right or top->bottom), with the layout."""
    n = int(probs["count"].argmax()) + 1
    layout = LAYOUTS[int(probs["layout"].argmax())]
    return [
        {"slot": str(s), "layout": layout} | {a: v[int(probs[f"{a}{s}"].argmax())] for a, v in ATTRIBUTES.items()}
        for s in range(n)
    ]


def _attribute_hit(probs: dict[str, np.ndarray], scene: Scene, attr: str) -> bool:
    n = len(scene.objects)
    if int(probs["count"].argmax()) != n - 1:
        return False
    values = ATTRIBUTES[attr]
    read = [values[int(probs[f"{attr}{s}"].argmax())] for s in range(n)]
    return sorted(read) == sorted(getattr(o, attr) for o in scene.objects)


def judge_scores(
    images: np.ndarray | Sequence[Image.Image],
    scenes: Sequence[Scene],
    judge: ShapesJudge | None = None,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """Per-image scores (N,) of images against the scenes they should show; the benchmark's entry point.

    Keys: ``count`` (object count read right); ``colour``/``shape``/``texture``/``size`` (the multiset of that
    attribute over the objects is read right, ignoring which object carries it); ``composition`` (all or
    nothing: the image satisfies everything the scene's category caption mentions, with binding and relation,
    see :meth:`ShapesJudge.score`); ``composition_soft`` (product of the probabilities of what it asserts).
    """
    from eclipse_prior.shapes.captions import composition

    judge = judge if judge is not None else _default_judge()
    probs: list[dict[str, np.ndarray]] = []
    for i in range(0, len(scenes), batch_size):
        probs += judge.read(images[i : i + batch_size])
    out: dict[str, list[float]] = {k: [] for k in ("count", *ATTRIBUTES, "composition", "composition_soft")}
    for p, scene in zip(probs, scenes, strict=True):
        v = verdict(p, composition(scene))
        out["count"].append(float(int(p["count"].argmax()) == len(scene.objects) - 1))
        for attr in ATTRIBUTES:
            out[attr].append(float(_attribute_hit(p, scene, attr)))
        out["composition"].append(float(v.correct))
        out["composition_soft"].append(v.score)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


_JUDGE_CACHE: dict[str, ShapesJudge] = {}


def _default_judge() -> ShapesJudge:
    if "default" not in _JUDGE_CACHE:
        _JUDGE_CACHE["default"] = load_judge()
    return _JUDGE_CACHE["default"]
