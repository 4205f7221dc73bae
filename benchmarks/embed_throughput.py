"""`embed` throughput against the CLIP encoder's forward pass alone on tensors already in memory.

The baseline is the least work embedding can possibly do: the same CLIP, the same batch size, on pixel values
and token ids that are already preprocessed and in memory (image tower, text tower with per-token states).
`eclipse_prior.data.embed.embed` additionally reads and decodes the images, preprocesses and tokenizes them
in DataLoader workers, checks finiteness and writes shards. The ratio (forward-only time / embed time) says how
much of that is hidden behind the encoder (aim: >= 90%).

The data are scenes of the shapes world rendered to PNG with their captions (an image folder with
captions.jsonl), encoded by the shipped shapes CLIP (src/eclipse_prior/shapes/weights/clip). That CLIP is tiny
(64x64 images, ~0.4M-parameter towers), so PNG decoding weighs far more against its forward pass than it would
against a ViT-L/14; the ratio here is therefore a lower bound for real CLIPs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

SHAPES_CLIP = Path(__file__).resolve().parents[1] / "src" / "eclipse_prior" / "shapes" / "weights" / "clip"


def render_folder(out: Path, n: int, seed: int = 0) -> Path:
    """Write `n` rendered shapes scenes as PNGs plus captions.jsonl (the image-folder source format)."""
    from eclipse_prior.shapes.captions import caption
    from eclipse_prior.shapes.world import CATEGORIES, render, sample_scene

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        scene = sample_scene(rng, CATEGORIES[i % len(CATEGORIES)])
        name = f"{i:06d}.png"
        render(scene).save(out / name)
        rows.append(json.dumps({"file": name, "caption": caption(scene, rng)}))
    (out / "captions.jsonl").write_text("\n".join(rows) + "\n")
    return out


def load_folder(folder: Path) -> tuple[list[Any], list[str]]:
    """Decoded PIL images and captions of an image folder written by `render_folder`."""
    from PIL import Image

    rows = [json.loads(line) for line in (folder / "captions.jsonl").read_text().splitlines() if line]
    images = []
    for r in rows:
        with Image.open(folder / r["file"]) as im:
            images.append(im.convert("RGB"))
    return images, [r["caption"] for r in rows]


def forward_only_seconds(bundle: Any, images: list[Any], captions: list[str], batch: int) -> float:
    """Wall seconds of the encoder alone over all rows: inputs preprocessed and tokenized beforehand."""
    pixels = [bundle.preprocess_images(images[i : i + batch]) for i in range(0, len(images), batch)]
    tokens = [bundle.tokenize(captions[i : i + batch]) for i in range(0, len(captions), batch)]
    bundle.encode_pixels(pixels[0])  # warm-up
    start = time.perf_counter()
    for px, tok in zip(pixels, tokens, strict=True):
        bundle.encode_pixels(px)
        bundle.encode_tokens(tok["input_ids"], tok["attention_mask"], with_states=True)
    return time.perf_counter() - start


def run(quick: bool = False, batch: int = 64) -> dict[str, Any]:
    """Embed a rendered folder with `embed()` and compare with the forward pass alone (same rows, same batch)."""
    from eclipse_prior.data.embed import embed
    from eclipse_prior.encoders.clip import load_clip

    n = 256 if quick else 2048
    bundle = load_clip(str(SHAPES_CLIP), local_files_only=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        folder = render_folder(tmp / "images", n)
        images, captions = load_folder(folder)
        forward_s = forward_only_seconds(bundle, images, captions, batch)
        start = time.perf_counter()
        embed(str(folder), bundle, tmp / "store", text_states=True, batch_size=batch, progress=False, log=lambda s: None)
        embed_s = time.perf_counter() - start
        forward_again_s = forward_only_seconds(bundle, images, captions, batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    forward = (forward_s + forward_again_s) / 2  # before and after: the machine's load drifts
    return {
        "rows": n,
        "batch": batch,
        "clip": "shapes CLIP (shipped)",
        "threads": torch.get_num_threads(),
        "forward_only_rows_per_s": n / forward,
        "embed_rows_per_s": n / embed_s,
        "embed_over_forward": forward / embed_s,
        "forward_s": [forward_s, forward_again_s],
        "embed_s": embed_s,
    }


def format_row(r: dict[str, Any]) -> list[str]:
    """Markdown lines for the embed table."""
    return [
        "| encoder | rows | forward alone (rows/s, baseline) | `embed` (rows/s) | embed / forward |",
        "|---|---|---|---|---|",
        f"| {r['clip']}, batch {r['batch']}, text states | {r['rows']} | {r['forward_only_rows_per_s']:.0f} "
        f"| {r['embed_rows_per_s']:.0f} | {r['embed_over_forward']:.0%} |",
    ]


def main() -> None:
    """`python benchmarks/embed_throughput.py [--quick]`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print("\n".join(format_row(run(args.quick))))


if __name__ == "__main__":
    main()
