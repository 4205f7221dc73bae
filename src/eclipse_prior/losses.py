"""ECLIPSE training losses: projection (squared L2) + lambda * one-way InfoNCE (text -> predicted image).

Reduction. The paper writes the projection term as E||z_x - g(eps, z_y)||^2: squared error summed over the
embedding width and averaged over the batch (`reduction="sum"`, the default). `reduction="mean"` averages
over elements instead, which divides the projection term by the width E and so multiplies the effective
lambda by E (lambda 0.2 under "mean" equals lambda 0.2 * E under "sum"; at E = 64 that made the contrastive
term ~100x the projection term). To reproduce a "mean" setting with the default, use lam_sum = lam_mean / E.

Temperature. The paper does not publish tau. Default `DEFAULT_TAU = 0.01`, the temperature OpenAI and LAION
CLIPs end training at (logit scale 100). The contrastive term is CLIP's own image->text loss with the
predicted image in place of the real one: at CLIP's temperature the true image embedding (the projection
target) already scores low, so the two terms pull the same way. At a higher tau such as 0.07 the matching
text-image cosine CLIP actually produces (~0.3 against ~0.1-0.2 for other captions) gives a logit gap of only
~2, the term stays near log(batch) even at the target, and it keeps pulling predictions toward their caption's
text embedding, i.e. across CLIP's modality gap, which the decoders do not expect. The scale stays balanced
because the projection term is summed over the width (O(||z_x||^2), not O(||z_x||^2 / E)) while the
contrastive term is O(1) and its gradient vanishes once the match wins the softmax. If the CLIP that made
the store has another learned temperature (a small one trained here), pass tau = 1 / exp(logit_scale).

Beyond the paper (`OBJECTIVES`): the same projection term plus a contrastive term against the batch's TRUE IMAGE
embeddings (`image_contrastive_loss`, symmetric), or against only each caption's nearest other captions
(`hard_negative_loss`). The paper's term contrasts predictions with texts, across CLIP's modality gap: once the
projection term has pulled a prediction to its image cone it already wins that softmax, so the term goes quiet.
Against images, the negatives are the targets of other captions, and the nearest captions in text space
(on compositional data: the ones differing in one binding, "orange circle" for "orange square") are where a
regression to the mean of similar captions costs the most.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from eclipse_prior.errors import ConfigError

DEFAULT_TAU = 0.01
#: Every training objective and the contrastive term it adds to the projection loss (None: none). "text": the
#: paper's InfoNCE against the batch's texts; "image": symmetric InfoNCE against the batch's true image
#: embeddings; "hard": against the true images of each row's nearest other captions only. ridge is a closed-form
#: linear map (no gradient training); residual is a linear map plus a transformer correction, trained like eclipse.
OBJECTIVES: dict[str, str | None] = {
    "eclipse": "text", "projection": None, "diffusion": None, "ridge": None, "residual": "text",
    "image-contrastive": "image", "hard-negatives": "hard",
}
DEFAULT_LAMBDA = 0.2
_REDUCTIONS = ("sum", "mean")


def projection_loss(pred: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """Squared L2 error summed over the width, mean over the batch ("sum"); or mean over elements ("mean")."""
    if reduction not in _REDUCTIONS:
        raise ConfigError(f"unknown reduction {reduction!r}; choose one of: {', '.join(_REDUCTIONS)}")
    sq = (pred.float() - target.float()).pow(2)
    return sq.sum(dim=-1).mean() if reduction == "sum" else sq.mean()


def _caption_tensor(caption_ids: Sequence[int] | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    ids = torch.as_tensor(caption_ids, device=device).reshape(-1)
    if ids.numel() != n:
        raise ConfigError(f"caption_ids has {ids.numel()} entries for a batch of {n}")
    return ids


def contrastive_loss(
    pred_image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    tau: float = DEFAULT_TAU,
    caption_ids: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE text->image: for each predicted image i, softmax over the batch's texts, positive text i.

    logits[i, j] = cos(pred_i, text_j) / tau; loss = mean_i(-log softmax_j(logits[i])[i]). Texts whose
    caption id equals row i's (a repeated caption) are removed from row i's denominator, except i itself,
    so a duplicate caption is never pushed away as a negative. Computed in float32 outside autocast.
    """
    if tau <= 0:
        raise ConfigError(f"tau must be positive, got {tau}")
    n = pred_image_embeds.shape[0]
    if text_embeds.shape[0] != n:
        raise ConfigError(f"batch sizes differ: {n} predicted image embeds, {text_embeds.shape[0]} text embeds")
    device = pred_image_embeds.device
    with torch.autocast(device_type=device.type, enabled=False):
        p = F.normalize(pred_image_embeds.float(), dim=-1)
        t = F.normalize(text_embeds.float(), dim=-1)
        logits = p @ t.T / tau
        if caption_ids is not None:
            ids = _caption_tensor(caption_ids, n, device)
            same = ids[:, None] == ids[None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
        labels = torch.arange(n, device=device)
        return F.cross_entropy(logits, labels)


def eclipse_loss_terms(
    pred_image_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    lam: float = DEFAULT_LAMBDA,
    tau: float = DEFAULT_TAU,
    caption_ids: Sequence[int] | torch.Tensor | None = None,
    reduction: str = "sum",
) -> dict[str, torch.Tensor]:
    """`{"loss", "projection", "contrastive"}` for logging; the contrastive value is reported even at lam 0."""
    proj = projection_loss(pred_image_embeds, image_embeds, reduction=reduction)
    con = contrastive_loss(pred_image_embeds, text_embeds, tau=tau, caption_ids=caption_ids)
    return {"loss": proj + lam * con, "projection": proj, "contrastive": con}


def eclipse_loss(
    pred_image_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    lam: float = DEFAULT_LAMBDA,
    tau: float = DEFAULT_TAU,
    caption_ids: Sequence[int] | torch.Tensor | None = None,
    reduction: str = "sum",
) -> torch.Tensor:
    """The ECLIPSE objective: projection + lam * contrastive (lam = 0 is the Projection baseline)."""
    return eclipse_loss_terms(pred_image_embeds, image_embeds, text_embeds, lam, tau, caption_ids, reduction)["loss"]


def _duplicate_mask(caption_ids: Sequence[int] | torch.Tensor | None, n: int, device: torch.device) -> torch.Tensor:
    """(n, n) True where two different rows carry the same caption (never each other's negatives)."""
    if caption_ids is None:
        return torch.zeros(n, n, dtype=torch.bool, device=device)
    ids = _caption_tensor(caption_ids, n, device)
    same = ids[:, None] == ids[None, :]
    same.fill_diagonal_(False)
    return same


def image_contrastive_loss(
    pred_image_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    tau: float = DEFAULT_TAU,
    caption_ids: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE between predictions and the batch's true image embeddings (x-hat <-> x).

    logits[i, j] = cos(pred_i, image_j) / tau; loss = (CE over each row j, label i + CE over each column i,
    label j) / 2: each prediction must pick its own image among the batch's images, and each image its own
    prediction among the predictions. Rows with the same caption are not each other's negatives.
    """
    if tau <= 0:
        raise ConfigError(f"tau must be positive, got {tau}")
    n = pred_image_embeds.shape[0]
    if image_embeds.shape[0] != n:
        raise ConfigError(f"batch sizes differ: {n} predicted image embeds, {image_embeds.shape[0]} image embeds")
    device = pred_image_embeds.device
    with torch.autocast(device_type=device.type, enabled=False):
        p = F.normalize(pred_image_embeds.float(), dim=-1)
        x = F.normalize(image_embeds.float(), dim=-1)
        logits = (p @ x.T / tau).masked_fill(_duplicate_mask(caption_ids, n, device), float("-inf"))
        labels = torch.arange(n, device=device)
        return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def hard_negative_loss(
    pred_image_embeds: torch.Tensor,
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    k: int,
    tau: float = DEFAULT_TAU,
    caption_ids: Sequence[int] | torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of each prediction against its true image and the true images of its k nearest other captions.

    Nearest by cosine of the text embeddings (other captions only: the same caption is never a negative); with
    fewer than k other captions in the batch, all of them. On compositional data the nearest captions are the
    ones that differ in one binding, the negatives the paper's "orange square" case asks for; the definition
    needs no parser, so it applies to any data.
    """
    if k < 1:
        raise ConfigError(f"hard negatives per row must be >= 1, got {k}")
    if tau <= 0:
        raise ConfigError(f"tau must be positive, got {tau}")
    n = pred_image_embeds.shape[0]
    if image_embeds.shape[0] != n or text_embeds.shape[0] != n:
        raise ConfigError("batch sizes of predictions, image embeds and text embeds differ")
    device = pred_image_embeds.device
    with torch.autocast(device_type=device.type, enabled=False):
        t = F.normalize(text_embeds.float(), dim=-1)
        excluded = _duplicate_mask(caption_ids, n, device) | torch.eye(n, dtype=torch.bool, device=device)
        text_sim = (t @ t.T).masked_fill(excluded, float("-inf"))
        kk = min(k, n - 1)
        allowed = torch.eye(n, dtype=torch.bool, device=device)
        if kk > 0:
            top = text_sim.topk(kk, dim=1)
            allowed.scatter_(1, top.indices, torch.isfinite(top.values))
        p = F.normalize(pred_image_embeds.float(), dim=-1)
        x = F.normalize(image_embeds.float(), dim=-1)
        logits = (p @ x.T / tau).masked_fill(~allowed, float("-inf"))
        return F.cross_entropy(logits, torch.arange(n, device=device))
