"""Embedding metrics of a prior on a store split: the numbers DALLE2-pytorch and the ECLIPSE paper track.

All cosines are means over the split's rows. "Unrelated" pairs row i's true image with the prediction for row
i+1's caption (the split rolled by one), skipping pairs whose captions are identical. Retrieval ranks all true
image embeddings of the split by cosine to each prediction; with duplicate captions a retrieved image whose
caption equals the query's counts as a hit (it is an equally correct answer). MSE is the paper's squared L2
norm: summed over the width, averaged over rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from eclipse_prior.errors import ConfigError, StoreError

METRIC_DESCRIPTIONS: dict[str, str] = {
    "cos_pred_image": "cos(predicted, true image)",
    "cos_pred_text": "cos(predicted, text)",
    "cos_text_image": "cos(text, true image) [baseline]",
    "cos_pred_unrelated": "cos(prediction for an unrelated caption, true image)",
    "retrieval_r1": "R@1 of the true image among the split",
    "retrieval_r5": "R@5 of the true image among the split",
    "mse": "squared L2 |pred - true|^2 (sum over width)",
    "num_samples": "rows scored",
}

# Why a metric is None (null in JSON) instead of a number.
UNDEFINED_REASONS: dict[str, str] = {
    "retrieval_r5": "R@5 needs at least 5 rows (with fewer it is trivially 1)",
    "cos_pred_unrelated": "no two rows with different captions",
}
# Below this many rows the metrics are noisy; evaluate and train's validation say so.
FEW_ROWS_WARNING = 50
POOLED = ("image_embeds", "text_embeds")  # store arrays every prior reads; text states only if it uses them


def split_size_warning(n: int, split: str) -> str | None:
    """A one-line warning when a split is too small for the metrics to mean much, else None."""
    if n >= FEW_ROWS_WARNING:
        return None
    return (
        f"warning: split {split!r} has only {n} rows (< {FEW_ROWS_WARNING}); the metrics are noisy "
        "(re-embed with a larger --val-fraction, or evaluate --split all)"
    )


def json_safe(obj: Any) -> Any:
    """`obj` with every NaN/Inf float replaced by None, so json.dumps(allow_nan=False) writes valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (null, never the bare NaN token that jq and JavaScript reject)."""
    return json.dumps(json_safe(obj), allow_nan=False, **kwargs)


def _open(store: Any) -> Any:
    if isinstance(store, str | Path):
        from eclipse_prior.data.store import EmbeddingStore

        return EmbeddingStore(store)
    return store


@torch.no_grad()
def predict_split(
    prior: Any,
    store: Any,
    indices: np.ndarray,
    batch_size: int = 256,
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    seed: int = 0,
) -> torch.Tensor:
    """The prior's image embeddings (N, E) for the given store rows, in float32 on the CPU."""
    generator = torch.Generator(device=prior.device).manual_seed(seed)
    was_training = prior.training
    prior.eval()
    preds = []
    fields = None if prior.uses_text_states else POOLED  # a pooled-only prior never reads the text states
    try:
        for start in range(0, len(indices), batch_size):
            batch = store.get_batch(indices[start : start + batch_size], fields=fields)
            states = mask = None
            if prior.uses_text_states:
                states = torch.from_numpy(batch["text_states"])
                mask = torch.from_numpy(batch["text_mask"])
            pred = prior.generate_embeds(
                torch.from_numpy(batch["text_embeds"]),
                states,
                mask,
                generator=generator,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
            preds.append(pred.float().cpu())
    finally:
        prior.train(was_training)
    return torch.cat(preds)


def _check_compatible(prior: Any, store: Any, name: str) -> None:
    width = prior.config.embedding_dim
    if store.image_dim != width:
        raise StoreError(f"store {name} has embedding width {store.image_dim} but the prior has width {width}")
    if prior.uses_text_states:
        if not store.has_text_states:
            raise StoreError(f"the prior needs per-token text states but store {name} has none (embed --text-states)")
        if store.text_seq_len != prior.config.num_embeddings:
            raise StoreError(
                f"store {name} has text length {store.text_seq_len} but the prior expects {prior.config.num_embeddings}"
            )


def embedding_metrics(
    pred: torch.Tensor, image: torch.Tensor, text: torch.Tensor, caption_ids: np.ndarray, chunk: int = 1024
) -> dict[str, float | None]:
    """All metrics from predictions, true image and text embeddings (N, E) and caption ids (N,).

    Needs N >= 2 (one row makes retrieval trivially perfect). A metric that is undefined for this split is None;
    UNDEFINED_REASONS says why.
    """
    pred, image, text = pred.double(), image.double(), text.double()
    n = pred.shape[0]
    if n < 2:
        raise StoreError(f"embedding metrics need at least 2 rows, got {n} (retrieval among 1 row is trivial)")
    ids = torch.as_tensor(np.asarray(caption_ids, dtype=np.int64))
    rolled = torch.roll(torch.arange(n), -1)
    unrelated = ids != ids[rolled]
    cos_unrelated = F.cosine_similarity(pred[rolled], image, dim=-1)[unrelated]

    pred_n, image_n = F.normalize(pred, dim=-1), F.normalize(image, dim=-1)
    k = min(5, n)
    hits1 = hits5 = 0
    for start in range(0, n, chunk):
        top = (pred_n[start : start + chunk] @ image_n.T).topk(k, dim=-1).indices
        same = ids[top] == ids[start : start + chunk, None]
        hits1 += int(same[:, 0].sum())
        hits5 += int(same.any(dim=-1).sum())
    return {
        "cos_pred_image": F.cosine_similarity(pred, image, dim=-1).mean().item(),
        "cos_pred_text": F.cosine_similarity(pred, text, dim=-1).mean().item(),
        "cos_text_image": F.cosine_similarity(text, image, dim=-1).mean().item(),
        "cos_pred_unrelated": cos_unrelated.mean().item() if len(cos_unrelated) else None,
        "retrieval_r1": hits1 / n,
        "retrieval_r5": hits5 / n if n >= 5 else None,
        "mse": (pred - image).pow(2).sum(dim=-1).mean().item(),
        "num_samples": float(n),
    }


def evaluate_prior(
    prior: Any,
    store: Any,
    split: str = "val",
    batch_size: int = 256,
    num_inference_steps: int = 25,
    guidance_scale: float = 4.0,
    seed: int = 0,
    max_samples: int | None = None,
    verify_store: bool = True,
) -> dict[str, float | None]:
    """Score a prior (any of the three objectives) on a store split; `store` is an EmbeddingStore or its path.

    `max_samples` keeps the first rows of the split (validation during training caps its cost this way).
    Diffusion priors sample with `num_inference_steps` and `guidance_scale`; ECLIPSE ignores both.
    `verify_store` checks shard checksums and finiteness first (as train does); rows read are always checked
    for NaN/Inf, so a corrupt store is a StoreError rather than a "nan" metric.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be >= 1, got {max_samples}")
    if num_inference_steps < 1:
        raise ConfigError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    name = str(getattr(store, "path", store))
    store = _open(store)
    if verify_store:
        store.validate()
    _check_compatible(prior, store, name)
    indices = np.asarray(store.split_indices(split))
    if max_samples is not None:
        indices = indices[:max_samples]
    if len(indices) == 0:
        raise StoreError(f"store {name} has no rows in split {split!r}")
    if len(indices) < 2:
        raise StoreError(
            f"store {name} has only {len(indices)} row in split {split!r}; the metrics need at least 2 "
            "(use --split all, or re-embed with a larger --val-fraction)"
        )
    pred = predict_split(prior, store, indices, batch_size, num_inference_steps, guidance_scale, seed)
    image, text = [], []
    for start in range(0, len(indices), batch_size):
        batch = store.get_batch(indices[start : start + batch_size], fields=POOLED)
        for key in POOLED:
            if not np.isfinite(batch[key]).all():
                raise StoreError(f"store {name}: {key} contains NaN or Inf in split {split!r}")
        image.append(torch.from_numpy(batch["image_embeds"]))
        text.append(torch.from_numpy(batch["text_embeds"]))
    return embedding_metrics(pred, torch.cat(image), torch.cat(text), store.caption_ids(indices))


def format_metrics(metrics: dict[str, float | None]) -> str:
    """A two-column text table of the metrics, in a fixed order, for the terminal; n/a says why."""
    rows = [(k, METRIC_DESCRIPTIONS.get(k, k), v) for k, v in metrics.items()]
    width = max(len(r[1]) for r in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  ------"]
    for key, label, value in rows:
        if value is None or not math.isfinite(value):
            shown = f"n/a ({UNDEFINED_REASONS.get(key, 'undefined')})"
        elif key == "num_samples":
            shown = f"{int(value)}"
        else:
            shown = f"{value:.4f}"
        lines.append(f"{label.ljust(width)}  {shown}")
    return "\n".join(lines)
