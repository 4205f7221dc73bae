"""`embed` throughput with a real-size CLIP (random weights) from webdataset shards of real JPEGs.

The data are shapes-world scenes rendered, resized to 224x224 and JPEG-encoded (quality 90) into webdataset tar
shards in img2dataset's layout (`KEY.jpg` + `KEY.txt`), i.e. what `embed` reads from a real crawl. The encoder is
CLIP ViT-L/14 (CPU) or ViT-bigG-14 (GPU) built from its released config with random weights (`real_models`).

Baseline: the encoder's forward pass alone on the same batches (per shard, `batch` rows at a time, as `embed` cuts
them), with images already decoded, preprocessed and tokenized and, on a GPU, already on the device: image tower
plus text tower with per-token states. `embed` additionally reads the tars, decodes and preprocesses (DataLoader
workers), copies to the device, checks finiteness and writes the store. Ratio = forward time / embed time (aim:
>= 90%), by wall time and by CPU time (this process + its workers). The forward pass is timed before and after
`embed` and averaged (a shared machine's load drifts).

Also reported: the decode + preprocess + tokenize cost per row in one process (what the workers must hide behind
the forward pass) and the load average and CPU model, since on a shared CPU the workers compete with the forward.
"""

from __future__ import annotations

import io
import resource
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import cpu_model, load_average
from device_common import sync


def write_jpeg_shards(out: Path, rows: int, shards: int, size: int = 224, seed: int = 0) -> list[Path]:
    """`rows` rendered scenes as `size`-px JPEGs with captions in `shards` webdataset tars (img2dataset layout)."""
    from PIL import Image
    from webdataset import TarWriter

    from eclipse_prior.shapes.captions import caption
    from eclipse_prior.shapes.world import CATEGORIES, render, sample_scene

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{s:05d}.tar" for s in range(shards)]
    writers = [TarWriter(str(p)) for p in paths]
    for i in range(rows):
        scene = sample_scene(rng, CATEGORIES[i % len(CATEGORIES)])
        buf = io.BytesIO()
        render(scene).resize((size, size), Image.BICUBIC).save(buf, format="JPEG", quality=90)
        writers[i % shards].write({"__key__": f"{i:08d}", "jpg": buf.getvalue(), "txt": caption(scene, rng)})
    for w in writers:
        w.close()
    return paths


def _shard_rows(path: Path) -> tuple[list[Any], list[str]]:
    """Decoded images and captions of one tar, in member order (the order `embed` batches them)."""
    import tarfile

    from PIL import Image

    images: dict[str, Any] = {}
    captions: dict[str, str] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.rsplit(".", 1)
            data = tar.extractfile(member).read()
            if ext == "jpg":
                with Image.open(io.BytesIO(data)) as im:
                    images[key] = im.convert("RGB")
            elif ext == "txt":
                captions[key] = data.decode()
    keys = sorted(images)
    return [images[k] for k in keys], [captions[k] for k in keys]


def prepared_batches(bundle: Any, shards: list[Path], batch: int) -> tuple[list[dict[str, torch.Tensor]], float]:
    """Per shard, `batch`-row chunks preprocessed, tokenized and moved to the encoder's device; and the seconds
    per row that decoding + preprocessing + tokenizing took in this one process."""
    out = []
    start, rows = time.perf_counter(), 0
    for path in shards:
        images, captions = _shard_rows(path)
        for i in range(0, len(images), batch):
            tok = bundle.tokenize(captions[i : i + batch])
            out.append(
                {
                    "pixel_values": bundle.preprocess_images(images[i : i + batch]),
                    "input_ids": tok["input_ids"],
                    "attention_mask": tok["attention_mask"],
                }
            )
            rows += len(images[i : i + batch])
    per_row = (time.perf_counter() - start) / max(rows, 1)
    return [{k: v.to(bundle.device) for k, v in b.items()} for b in out], per_row


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's finished children (the DataLoader workers, once joined)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children."""
    return time.process_time() + _children_cpu_seconds()


def forward_seconds(bundle: Any, batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Synchronised wall seconds and CPU seconds of the image and text towers (with per-token states) over all
    batches."""
    sync(bundle.device)
    start, cpu = time.perf_counter(), _cpu_seconds()
    for b in batches:
        bundle.encode_pixels(b["pixel_values"])
        bundle.encode_tokens(b["input_ids"], b["attention_mask"], with_states=True)
    sync(bundle.device)
    return time.perf_counter() - start, _cpu_seconds() - cpu


def host_seconds_per_row(bundle: Any, batches: list[dict[str, torch.Tensor]]) -> float:
    """Wall seconds per row of the host work `embed`'s main process does on a batch's outputs after the forward
    pass (copy to host as float32, finiteness check, cast to the store's fp16), timed apart on the first two
    batches: a diagnostic of how much of a gap to the forward pass is serial host work rather than loading."""
    batches = batches[:2]
    outputs = []
    for b in batches:
        text = bundle.encode_tokens(b["input_ids"], b["attention_mask"], with_states=True)
        outputs.append({"image": bundle.encode_pixels(b["pixel_values"]), "text": text["text_embeds"],
                        "states": text["text_states"]})
    sync(bundle.device)
    start = time.perf_counter()
    for out in outputs:
        arrays = {k: v.float().cpu().numpy() for k, v in out.items()}
        finite = np.ones(len(arrays["image"]), dtype=bool)
        for v in arrays.values():
            finite &= np.isfinite(v.reshape(len(v), -1)).all(axis=1)
        {k: v[finite].astype(np.float16) for k, v in arrays.items()}
    return (time.perf_counter() - start) / sum(len(out["image"]) for out in outputs)


def run(
    clip: str,
    device: torch.device,
    rows: int,
    batch: int,
    workers: int,
    shards: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Any]:
    """Embed `rows` JPEG rows with `embed()` and compare with the encoder forward alone on the same batches."""
    from eclipse_prior.data.embed import embed
    from real_models import clip_bundle, param_count

    bundle = clip_bundle(clip, device, dtype)
    tmp = Path(tempfile.mkdtemp(prefix="bench-embed-real-"))
    load_start = load_average()
    try:
        tars = write_jpeg_shards(tmp / "shards", rows, shards)
        batches, prep_per_row = prepared_batches(bundle, tars, batch)
        forward_seconds(bundle, batches[:1])  # warm-up
        forward_s, forward_cpu = forward_seconds(bundle, batches)
        sync(device)
        start, cpu, workers_cpu = time.perf_counter(), _cpu_seconds(), _children_cpu_seconds()
        embed(
            str(tmp / "shards"), bundle, tmp / "store", text_states=True, batch_size=batch, num_workers=workers,
            device=str(device), progress=False, log=lambda s: None,
        )
        sync(device)
        embed_s, embed_cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        workers_cpu = _children_cpu_seconds() - workers_cpu
        forward_again_s, forward_again_cpu = forward_seconds(bundle, batches)
        host_per_row = host_seconds_per_row(bundle, batches)
        from eclipse_prior.data.store import EmbeddingStore

        stored = len(EmbeddingStore(tmp / "store"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    forward = (forward_s + forward_again_s) / 2
    forward_cpu_mean = (forward_cpu + forward_again_cpu) / 2
    return {
        "clip": f"{clip} (random weights)",
        "params": param_count(bundle.vision_model) + param_count(bundle.text_model),
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "rows": rows,
        "stored_rows": stored,
        "batch": batch,
        "workers": workers,
        "shards": shards,
        "threads": torch.get_num_threads(),
        "forward_only_rows_per_s": rows / forward,
        "embed_rows_per_s": rows / embed_s,
        "embed_over_forward": forward / embed_s,
        "forward_s": [forward_s, forward_again_s],
        "embed_s": embed_s,
        "forward_cpu_s": [forward_cpu, forward_again_cpu],
        "embed_cpu_s": embed_cpu,
        "embed_workers_cpu_s": workers_cpu,
        "embed_over_forward_cpu": forward_cpu_mean / embed_cpu,
        "decode_preprocess_ms_per_row": prep_per_row * 1e3,
        "forward_ms_per_row": forward / rows * 1e3,
        "host_postprocess_ms_per_row": host_per_row * 1e3,
        "cpu": cpu_model(),
        "load_avg": [round(load_start, 1), round(load_average(), 1)],
    }


def format_row(r: dict[str, Any]) -> list[str]:
    """Markdown lines for the real-size embed table."""
    host = []
    if "host_postprocess_ms_per_row" in r:  # results written before this diagnostic existed lack it
        host = [
            f"Serial host work of `embed`'s main process after each forward pass (copy out, finiteness, fp16 cast), "
            f"timed apart: {r['host_postprocess_ms_per_row']:.2f} ms per row "
            f"({r['host_postprocess_ms_per_row'] / r['forward_ms_per_row']:.1%} of the forward pass).",
            "",
        ]
    return [
        "| encoder | device | rows (JPEG, webdataset) | batch | workers | forward alone (rows/s, baseline) "
        "| `embed` (rows/s) | embed / forward (wall) | embed / forward (CPU time) | decode+preprocess per row "
        "| forward per row |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['clip']}, {r['params'] / 1e6:.0f}M, {r['dtype']}, text states | {r['device']} | {r['rows']} in "
        f"{r['shards']} tars | {r['batch']} | {r['workers']} | {r['forward_only_rows_per_s']:.2f} "
        f"| {r['embed_rows_per_s']:.2f} | {r['embed_over_forward']:.0%} | {r['embed_over_forward_cpu']:.0%} "
        f"| {r['decode_preprocess_ms_per_row']:.1f} ms "
        f"| {r['forward_ms_per_row']:.1f} ms |",
        "",
        *host,
        f"CPU: {r['cpu']}, torch threads {r['threads']}, 1-min load average at start/end {r['load_avg'][0]} / "
        f"{r['load_avg'][1]}; store rows written: {r['stored_rows']} of {r['rows']}. CPU time counts this process "
        "and its DataLoader workers: on a shared machine it is the steadier ratio (wall time also measures the "
        "neighbours).",
    ]
