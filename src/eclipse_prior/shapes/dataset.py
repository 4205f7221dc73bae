"""Write shapes-world datasets in the on-disk formats real data uses, so `eclipse-prior embed` reads them.

- Image folder: ``<out>/<key>.png`` plus ``<out>/captions.jsonl`` with one JSON object per line holding
  ``file`` (path relative to ``<out>``) and ``caption``, plus ``category``, ``composition`` (canonical key,
  equal for equal captions), ``held_out`` and ``scene`` (ground truth, see ``world.scene_to_dict``).
- Webdataset tars (img2dataset layout): ``<out>/NNNNN.tar`` with members ``<key>.png``, ``<key>.txt``
  (the caption) and ``<key>.json`` (the same metadata as above).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eclipse_prior.shapes.captions import caption, composition
from eclipse_prior.shapes.world import CATEGORIES, Holdout, Scene, render, sample_scene, scene_to_dict


@dataclass(frozen=True)
class Example:
    """One generated pair: its key, scene and caption."""

    key: str
    scene: Scene
    caption: str
    held_out: bool

    def metadata(self) -> dict:
        """JSON metadata stored beside the image."""
        return {
            "caption": self.caption,
            "category": self.scene.category,
            "composition": composition(self.scene).key(),
            "held_out": self.held_out,
            "scene": scene_to_dict(self.scene),
        }


def generate_examples(
    n: int,
    seed: int = 0,
    categories: Sequence[str] = CATEGORIES,
    holdout: Holdout | None = None,
    only_holdout: bool = False,
) -> Iterator[Example]:
    """Deterministic stream of ``n`` examples, categories taken in turn (balanced)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        scene = sample_scene(rng, categories[i % len(categories)], holdout=holdout, only_holdout=only_holdout)
        held = holdout.scene_is_held_out(scene) if holdout is not None else False
        yield Example(f"{i:08d}", scene, caption(scene, rng), held)


def write_image_folder(out: str | Path, examples: Iterator[Example] | Sequence[Example], size: int = 64) -> Path:
    """Write PNGs and captions.jsonl (written to a temp file, then renamed, so it is never half-written)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "captions.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as f:
        for ex in examples:
            name = f"{ex.key}.png"
            render(ex.scene, size).save(out / name)
            f.write(json.dumps({"file": name, **ex.metadata()}) + "\n")
    os.replace(tmp, out / "captions.jsonl")
    return out


def write_webdataset(
    out: str | Path,
    examples: Iterator[Example] | Sequence[Example],
    shard_size: int = 1000,
    size: int = 64,
) -> list[Path]:
    """Write img2dataset-style tar shards ``NNNNN.tar`` (key.png, key.txt, key.json); returns the shards."""
    import io

    import webdataset as wds

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    writer = None
    tmp_path: Path | None = None
    count = 0
    for ex in examples:
        if writer is None or count % shard_size == 0:
            if writer is not None:
                writer.close()
                os.replace(tmp_path, shards[-1])  # type: ignore[arg-type]
            shards.append(out / f"{len(shards):05d}.tar")
            tmp_path = shards[-1].with_suffix(".tar.tmp")
            writer = wds.TarWriter(str(tmp_path))
        buf = io.BytesIO()
        render(ex.scene, size).save(buf, format="PNG")
        writer.write({"__key__": ex.key, "png": buf.getvalue(), "txt": ex.caption, "json": ex.metadata()})
        count += 1
    if writer is not None:
        writer.close()
        os.replace(tmp_path, shards[-1])  # type: ignore[arg-type]
    return shards
