"""Embedding metrics of a prior on a store split: the numbers DALLE2-pytorch and the ECLIPSE paper track.

All cosines are means over the split's rows. "Unrelated" pairs row i's true image with the prediction for row
i+1's caption (the split rolled by one), skipping pairs whose captions are identical. Retrieval ranks all true
image embeddings of the split by cosine to each prediction; with duplicate captions a retrieved image whose
caption equals the query's counts as a hit (it is an equally correct answer). MSE is the paper's squared L2
norm: summed over the width, averaged over rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from eclipse_prior.errors import StoreError

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
    try:
        for start in range(0, len(indices), batch_size):
            batch = store.get_batch(indices[start : start + batch_size])
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
) -> dict[str, float]:
    """All metrics from predictions, true image and text embeddings (N, E) and caption ids (N,)."""
    pred, image, text = pred.double(), image.double(), text.double()
    n = pred.shape[0]
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
        "cos_pred_unrelated": cos_unrelated.mean().item() if len(cos_unrelated) else float("nan"),
        "retrieval_r1": hits1 / n,
        "retrieval_r5": hits5 / n,
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
) -> dict[str, float]:
    """Score a prior (any of the three objectives) on a store split; `store` is an EmbeddingStore or its path.

    `max_samples` keeps the first rows of the split (validation during training caps its cost this way).
    Diffusion priors sample with `num_inference_steps` and `guidance_scale`; ECLIPSE ignores both.
    """
    name = str(getattr(store, "path", store))
    store = _open(store)
    _check_compatible(prior, store, name)
    indices = np.asarray(store.split_indices(split))
    if max_samples is not None:
        indices = indices[:max_samples]
    if len(indices) == 0:
        raise StoreError(f"store {name} has no rows in split {split!r}")
    pred = predict_split(prior, store, indices, batch_size, num_inference_steps, guidance_scale, seed)
    image, text = [], []
    for start in range(0, len(indices), batch_size):
        batch = store.get_batch(indices[start : start + batch_size])
        image.append(torch.from_numpy(batch["image_embeds"]))
        text.append(torch.from_numpy(batch["text_embeds"]))
    return embedding_metrics(pred, torch.cat(image), torch.cat(text), store.caption_ids(indices))


def format_metrics(metrics: dict[str, float]) -> str:
    """A two-column text table of the metrics, in a fixed order, for the terminal."""
    rows = [(METRIC_DESCRIPTIONS.get(k, k), v) for k, v in metrics.items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  ------"]
    for label, value in rows:
        shown = f"{int(value)}" if label == METRIC_DESCRIPTIONS["num_samples"] else f"{value:.4f}"
        lines.append(f"{label.ljust(width)}  {shown}")
    return "\n".join(lines)
