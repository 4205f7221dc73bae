"""The neural judges of the image benchmark, each a transformers model loaded by hub id or local folder.

- BLIP-VQA (``Salesforce/blip-vqa-base``): P("yes") to "<noun phrase>?" for attribute binding.
- An open-vocabulary detector for spatial relations: OWLv2 (``google/owlv2-base-patch16-ensemble``, default) or
  Grounding DINO (e.g. ``IDEA-Research/grounding-dino-base``).
- CLIPScore (``openai/clip-vit-base-patch32``): plain cosine of image and text features, for non-spatial prompts.
- PickScore (``yuvalkirstain/PickScore_v1`` with the processor of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
- DINOv2 (``facebook/dinov2-base``) CLS features for the Frechet distance.

Weights load from safetensors only (``use_safetensors=True``) and never with ``trust_remote_code``. A model that is
missing, or unreachable offline, is a one-line :class:`ModelNotFoundError` naming the id and the flag that takes a
local folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image

from eclipse_prior.encoders._hf import hub_resolves, looks_like_hub_id, offline_default, quiet_transformers
from eclipse_prior.errors import ModelNotFoundError
from eclipse_prior.evaluation.compbench import (  # noqa: F401  (re-exported: the scorers' default ids)
    DEFAULT_CLIPSCORE_MODEL,
    DEFAULT_DETECTOR_MODEL,
    DEFAULT_DINO_MODEL,
    DEFAULT_PICKSCORE_MODEL,
    DEFAULT_PICKSCORE_PROCESSOR,
    DEFAULT_VQA_MODEL,
    Box,
)

# The reference BLIP-VQA tokenizes questions with truncation at 35 tokens.
VQA_QUESTION_MAX_LENGTH = 35

T = TypeVar("T")


def _load(kind: str, flag: str, id_or_path: str, loader: Callable[[str, dict[str, Any]], T]) -> tuple[T, str]:
    """Run ``loader(name, from_pretrained_kwargs)``; turn every way of not finding the model into one line."""
    name = os.path.expanduser(str(id_or_path))
    local = os.path.isdir(name) or name.startswith((".", "/"))
    hint = f"pass a local folder with {flag}"
    if (local and not os.path.isdir(name)) or not (local or looks_like_hub_id(name)):
        raise ModelNotFoundError(f"cannot load {kind} model {name!r} (no such folder, nor a hub id owner/name); {hint}")
    # without DNS for the hub, use the cache only: one line now instead of a minute of retries
    kw: dict[str, Any] = {"local_files_only": local or offline_default() or not hub_resolves()}
    try:
        with quiet_transformers():
            obj = loader(name, kw)
    except (OSError, ValueError, KeyError) as err:
        why = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelNotFoundError(f"cannot load {kind} model {name!r} ({why}); {hint}") from err
    return obj, name


def _revision(model: Any, name: str) -> str:
    commit = getattr(model.config, "_commit_hash", None)
    return "local" if os.path.isdir(name) or not commit else str(commit)


def _prepare(model: torch.nn.Module, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _pair_loader(model_cls: Any, processor_cls: Any) -> Callable[[str, dict[str, Any]], tuple[Any, Any]]:
    """A ``_load`` loader for a model and its processor stored in one folder (weights from safetensors only)."""

    def loader(name: str, kw: dict[str, Any]) -> tuple[Any, Any]:
        return model_cls.from_pretrained(name, use_safetensors=True, **kw), processor_cls.from_pretrained(name, **kw)

    return loader


def _scorer(cls: Callable[..., T], model: Any, processor: Any, name: str, device: str | torch.device,
            dtype: torch.dtype, *extra: Any) -> T:
    """Wrap a loaded model (eval, frozen, on device) and processor in a scorer dataclass, recording its revision."""
    return cls(_prepare(model, device, dtype), processor, name, _revision(model, name), torch.device(device), dtype,
               *extra)


def _rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    return [im.convert("RGB") for im in images]


# ------------------------------------------------------------------------------------------------------- BLIP-VQA
@dataclass
class BlipVqaScorer:
    """P("yes") for yes/no questions about an image, as T2I-CompBench's BLIP-VQA computes it.

    BLIP's VQA head is generative. Like the reference ``vqa_prob`` we run the answer decoder from its start token,
    teacher-forced, and read the probability of the answer "yes" and of "no" (the product of their token
    probabilities: one token each with the real BERT vocabulary, so this is the first-token softmax the reference
    reads), then renormalise: P = p(yes) / (p(yes) + p(no)).
    """

    model: Any
    processor: Any
    name: str
    revision: str
    device: torch.device
    dtype: torch.dtype

    def _answer_ids(self, word: str) -> list[int]:
        ids = self.processor.tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ModelNotFoundError(f"BLIP tokenizer of {self.name!r} cannot encode the answer {word!r}")
        return list(ids)

    def _answer_log_prob(self, states: torch.Tensor, mask: torch.Tensor, answer: list[int]) -> torch.Tensor:
        """Teacher-forced log P(answer tokens | question states), summed over the answer's tokens."""
        n = states.shape[0]
        start = self.model.config.text_config.bos_token_id
        inputs = torch.tensor([[start, *answer[:-1]]], device=self.device).expand(n, -1)
        logits = self.model.text_decoder(
            input_ids=inputs, encoder_hidden_states=states, encoder_attention_mask=mask
        ).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        target = torch.tensor(answer, device=self.device).view(1, -1, 1).expand(n, -1, 1)
        return logp.gather(-1, target).squeeze(-1).sum(-1)

    @torch.inference_mode()
    def yes_probabilities(self, image: Image.Image, questions: Sequence[str]) -> list[float]:
        """P("yes") for each question about one image (the image is encoded once).

        Questions go through the text towers one at a time, unpadded: in transformers 5.24 the padding mask of a
        batched question does not fully reach the answer decoder's cross-attention (P moved by ~1e-3 in our tests).
        """
        if not questions:
            return []
        pixels = self.processor.image_processor(images=_rgb([image]), return_tensors="pt")["pixel_values"]
        image_embeds = self.model.vision_model(
            pixel_values=pixels.to(self.device, self.dtype)
        ).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        yes, no = self._answer_ids("yes"), self._answer_ids("no")
        probs = []
        for question in questions:
            q = self.processor.tokenizer(
                [question], truncation=True, max_length=VQA_QUESTION_MAX_LENGTH, return_tensors="pt"
            )
            ids, mask = q["input_ids"].to(self.device), q["attention_mask"].to(self.device)
            states = self.model.text_encoder(
                input_ids=ids,
                attention_mask=mask,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_mask,
            ).last_hidden_state
            log_yes = self._answer_log_prob(states, mask, yes)
            log_no = self._answer_log_prob(states, mask, no)
            probs.append(float(torch.sigmoid(log_yes - log_no)))  # = p_yes / (p_yes + p_no)
        return probs


def load_blip_vqa(
    id_or_path: str = DEFAULT_VQA_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BlipVqaScorer:
    """BlipForQuestionAnswering + BlipProcessor (tokenizer and image processor) from one folder or hub id."""
    from transformers import BlipForQuestionAnswering, BlipProcessor

    loader = _pair_loader(BlipForQuestionAnswering, BlipProcessor)
    (model, processor), name = _load("BLIP-VQA", "--vqa-model", id_or_path, loader)
    return _scorer(BlipVqaScorer, model, processor, name, device, dtype)


# ------------------------------------------------------------------------------------------------------- detector
@dataclass
class OwlDetector:
    """OWLv2: for each text query, the highest-scoring box above ``threshold`` (None when no box passes).

    OWLv2 pads images to a square at the bottom/right before predicting boxes relative to that square, so boxes are
    scaled by max(height, width) to land in the generated image's pixels (what the 150 px rule is stated in).
    """

    model: Any
    processor: Any
    name: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    threshold: float = 0.1

    @torch.inference_mode()
    def best_boxes(self, image: Image.Image, queries: Sequence[str]) -> list[Box | None]:
        image = image.convert("RGB")
        inputs = self.processor(text=[list(queries)], images=[image], return_tensors="pt")
        outputs = self.model(
            input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device),
            pixel_values=inputs["pixel_values"].to(self.device, self.dtype),
        )
        scores = torch.sigmoid(outputs.logits[0].float())  # (boxes, queries)
        boxes = outputs.pred_boxes[
            0
        ].float()  # (boxes, 4) centre x, centre y, w, h relative to the padded square
        side = float(max(image.size))
        found: list[Box | None] = []
        for qi in range(len(queries)):
            best = int(torch.argmax(scores[:, qi]))
            conf = float(scores[best, qi])
            if conf <= self.threshold:
                found.append(None)
                continue
            cx, cy, w, h = (float(v) * side for v in boxes[best])
            found.append(Box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, score=conf))
        return found


def _find_span(ids: list[int], part: list[int], start: int) -> int | None:
    for i in range(start, len(ids) - len(part) + 1):
        if ids[i : i + len(part)] == part:
            return i
    return None


@dataclass
class GroundingDinoDetector:
    """Grounding DINO: the queries are joined as its caption "obj1. obj2."; a box's score for a query is the highest
    token probability over that query's own tokens, and each query keeps its best box above ``threshold``.

    Boxes are relative to the (unpadded, single) image, so they scale by width and height.
    """

    model: Any
    processor: Any
    name: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    threshold: float = 0.1

    @torch.inference_mode()
    def best_boxes(self, image: Image.Image, queries: Sequence[str]) -> list[Box | None]:
        image = image.convert("RGB")
        phrases = [q.lower().strip().rstrip(".") for q in queries]
        inputs = self.processor(images=image, text=" ".join(f"{p}." for p in phrases), return_tensors="pt")
        feed = {k: v.to(self.device) for k, v in inputs.items()}
        feed["pixel_values"] = feed["pixel_values"].to(self.dtype)
        outputs = self.model(**feed)
        probs = torch.sigmoid(outputs.logits[0].float())  # (boxes, text tokens)
        boxes = outputs.pred_boxes[0].float()  # (boxes, 4) centre x, centre y, w, h relative to the image
        ids = inputs["input_ids"][0].tolist()
        width, height = image.size
        found: list[Box | None] = []
        cursor = 0
        for phrase in phrases:
            part = self.processor.tokenizer(phrase, add_special_tokens=False)["input_ids"]
            at = _find_span(ids, part, cursor) if part else None
            if at is None:  # the phrase did not survive tokenisation (e.g. truncated caption)
                found.append(None)
                continue
            cursor = at + len(part)
            per_box = probs[:, at:cursor].max(dim=1).values
            best = int(torch.argmax(per_box))
            conf = float(per_box[best])
            if conf <= self.threshold:
                found.append(None)
                continue
            cx, cy, w, h = (float(v) for v in boxes[best])
            found.append(
                Box(
                    (cx - w / 2) * width,
                    (cy - h / 2) * height,
                    (cx + w / 2) * width,
                    (cy + h / 2) * height,
                    conf,
                )
            )
        return found


def load_detector(
    id_or_path: str = DEFAULT_DETECTOR_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    threshold: float = 0.1,
) -> OwlDetector | GroundingDinoDetector:
    """An OWLv2 or Grounding DINO folder or hub id (the kind is read from its config)."""
    from transformers import AutoConfig, AutoModelForZeroShotObjectDetection, AutoProcessor

    def loader(name: str, kw: dict[str, Any]) -> tuple[Any, Any]:
        kind = AutoConfig.from_pretrained(name, **kw).model_type
        if kind not in ("owlv2", "grounding-dino"):
            raise ValueError(f"a {kind!r} model is not a supported detector (OWLv2 or Grounding DINO)")
        model = AutoModelForZeroShotObjectDetection.from_pretrained(name, use_safetensors=True, **kw)
        return model, AutoProcessor.from_pretrained(name, **kw)

    (model, processor), name = _load("detector", "--detector-model", id_or_path, loader)
    cls = OwlDetector if model.config.model_type == "owlv2" else GroundingDinoDetector
    return _scorer(cls, model, processor, name, device, dtype, threshold)


# ------------------------------------------------------------------------------------------ CLIPScore and PickScore
@dataclass
class ClipSimilarity:
    """Image-text similarity of a CLIPModel: the plain cosine (CLIPScore as T2I-CompBench uses it, not x2.5 or x100)
    or, with ``scaled``, cosine x the model's learned ``logit_scale.exp()`` (PickScore's score)."""

    model: Any
    processor: Any
    name: str
    revision: str
    device: torch.device
    dtype: torch.dtype
    scaled: bool = False

    @torch.inference_mode()
    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=_rgb(images), return_tensors="pt")["pixel_values"]
        feats = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    @torch.inference_mode()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.processor.tokenizer
        max_len = min(int(tok.model_max_length), int(self.model.config.text_config.max_position_embeddings))
        enc = tok(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        feats = self.model.get_text_features(
            input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device)
        ).pooler_output
        return torch.nn.functional.normalize(feats.float(), dim=-1)

    def scores(self, images: Sequence[Image.Image], texts: Sequence[str]) -> list[float]:
        """Score of image i against text i (paired)."""
        if len(images) != len(texts):
            raise ValueError("scores() pairs images with texts: give as many of each")
        cos = (self.image_features(images) * self.text_features(texts)).sum(-1)
        if self.scaled:
            cos = cos * float(self.model.logit_scale.exp())
        return cos.tolist()


def _load_clip_similarity(
    kind: str,
    flag: str,
    model_id: str,
    processor_id: str,
    device: str | torch.device,
    dtype: torch.dtype,
    scaled: bool,
) -> ClipSimilarity:
    from transformers import AutoProcessor, CLIPModel

    model, name = _load(
        kind, flag, model_id, lambda n, kw: CLIPModel.from_pretrained(n, use_safetensors=True, **kw)
    )
    processor, _ = _load(
        f"{kind} processor",
        flag.replace("-model", "-processor"),
        processor_id,
        lambda n, kw: AutoProcessor.from_pretrained(n, **kw),
    )
    return _scorer(ClipSimilarity, model, processor, name, device, dtype, scaled)


def load_clipscore(
    id_or_path: str = DEFAULT_CLIPSCORE_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ClipSimilarity:
    """CLIPModel + its processor from one folder or id; unscaled cosine."""
    return _load_clip_similarity(
        "CLIPScore", "--clipscore-model", id_or_path, id_or_path, device, dtype, False
    )


def load_pickscore(
    model_id: str = DEFAULT_PICKSCORE_MODEL,
    processor_id: str = DEFAULT_PICKSCORE_PROCESSOR,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> ClipSimilarity:
    """PickScore: its CLIPModel with the processor of the CLIP it was fine-tuned from; logit-scaled cosine."""
    return _load_clip_similarity(
        "PickScore", "--pickscore-model", model_id, processor_id, device, dtype, True
    )


# ---------------------------------------------------------------------------------------------------------- DINOv2
@dataclass
class DinoFeatures:
    """DINOv2 image features (the CLS token after the final layer norm: ``pooler_output``) for Frechet distances."""

    model: Any
    processor: Any
    name: str
    revision: str
    device: torch.device
    dtype: torch.dtype

    @torch.inference_mode()
    def features(self, images: Sequence[Image.Image]) -> np.ndarray:
        pixels = self.processor(images=_rgb(images), return_tensors="pt")["pixel_values"]
        out = self.model(pixel_values=pixels.to(self.device, self.dtype)).pooler_output
        return out.float().cpu().numpy().astype(np.float64)


def load_dino(
    id_or_path: str = DEFAULT_DINO_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DinoFeatures:
    """Dinov2Model + its image processor from one folder or hub id."""
    from transformers import AutoImageProcessor, Dinov2Model

    (model, processor), name = _load("DINOv2", "--dino-model", id_or_path, _pair_loader(Dinov2Model, AutoImageProcessor))
    return _scorer(DinoFeatures, model, processor, name, device, dtype)
