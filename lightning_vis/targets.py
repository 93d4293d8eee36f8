"""Targets for models whose output is not (N, classes) logits: what score a method explains, per input.

A target is any callable ``f(output) -> (N,)`` scores (one per input, differentiable); the methods apply it to
whatever the model returns (tensor, dict, list of dicts, tuple, dataclass) before looking at the output's type.
Ready-made ones, in the spirit of pytorch-grad-cam's ``model_targets``:

    lv.grad_cam(fcn, images, "backbone.layer4", target=targets.segmentation(15, mask))    # person pixels
    lv.grad_cam(frcnn, images, "backbone.body.layer4", target=targets.detection(boxes, labels))
    lv.saliency(embedder, images, target=targets.similarity(reference_embedding))
    lv.saliency(model_with_tuple_output, images, target=targets.classifier(281, key=0))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def describe(output, depth: int = 0) -> str:
    """A one-line description of a model output's structure: 'dict with out (2, 21, 64, 64), aux (...)', 'list of 2
    dicts with boxes (5, 4), labels (5,), scores (5,)'."""
    if isinstance(output, Tensor):
        return f"tensor {tuple(output.shape)}"
    if depth > 2:
        return type(output).__name__
    if isinstance(output, dict):
        items = ", ".join(f"{k!s} {describe(v, depth + 1).removeprefix('tensor ')}"
                          for k, v in list(output.items())[:6])
        return f"dict with {items}" + (", ..." if len(output) > 6 else "")
    if isinstance(output, (list, tuple)):
        if output and all(isinstance(v, dict) for v in output):
            return f"{type(output).__name__} of {len(output)} dicts, the first: {describe(output[0], depth + 1)}"
        items = ", ".join(describe(v, depth + 1) for v in output[:4])
        return f"{type(output).__name__} of {len(output)}: {items}" + (", ..." if len(output) > 4 else "")
    fields = getattr(output, "__dataclass_fields__", None)
    if fields:
        items = ", ".join(f"{k} {describe(getattr(output, k), depth + 1).removeprefix('tensor ')}" for k in fields)
        return f"{type(output).__name__}({items})"
    return type(output).__name__


def _pick(output, key, what: str):
    if key is None:
        if isinstance(output, Tensor):
            return output
        raise ValueError(f"{what}: the model returned a {describe(output)}; pass key= to say which part to use")
    try:
        picked = getattr(output, key) if isinstance(key, str) and not isinstance(output, dict) else output[key]
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ValueError(f"{what}: no {key!r} in the model output, a {describe(output)}") from None
    if not isinstance(picked, Tensor):
        raise ValueError(f"{what}: output[{key!r}] is a {describe(picked)}, not a tensor")
    return picked


def _class_indices(category) -> Tensor:
    """Class indices (one, or one per input) as a flat int64 tensor; integer-valued floats (3.0) are accepted,
    anything else (3.5, booleans, text) is refused."""
    try:
        t = torch.as_tensor(category)
    except (TypeError, ValueError, RuntimeError, OverflowError):
        raise ValueError(f"classifier target: category must be a class index or one per input, not "
                         f"{category!r}") from None
    if t.dtype == torch.bool or t.is_complex() or t.dim() > 1 or t.numel() == 0:
        raise ValueError(f"classifier target: category must be a class index or one per input (integers), not "
                         f"{category!r}")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()) or bool((t != t.round()).any()):
            raise ValueError(f"classifier target: class indices must be whole numbers, got {category!r}")
    return t.long().flatten()


class classifier:
    """The logit of `category` (one class, or one per input) in (N, classes) logits, or in output[key] for dict,
    tuple and dataclass outputs."""

    def __init__(self, category, key=None):
        self.category, self.key = category, key
        self._classes = _class_indices(category)

    def __call__(self, output) -> Tensor:
        logits = _pick(output, self.key, "classifier target")
        if logits.dim() != 2:
            raise ValueError(f"classifier target: expected (N, classes) logits, got {tuple(logits.shape)}")
        c = self._classes.to(logits.device)
        c = c.expand(logits.shape[0]) if c.numel() == 1 else c
        if c.numel() != logits.shape[0]:
            raise ValueError(f"classifier target: {c.numel()} classes for a batch of {logits.shape[0]}")
        if int(c.min()) < 0 or int(c.max()) >= logits.shape[1]:
            raise ValueError(f"classifier target: class out of range 0..{logits.shape[1] - 1}")
        return logits.gather(1, c.view(-1, 1))[:, 0]


class segmentation:
    """Semantic segmentation: the sum of `category`'s score over the pixels of `mask` ((H, W) or (N, H, W), bool or
    0/1; default: the pixels the model assigns to `category`), from (N, classes, H, W) scores, or output[key]
    (default "out", torchvision's segmentation models)."""

    def __init__(self, category: int, mask: Tensor | None = None, key="out"):
        self.category, self.mask, self.key = int(category), mask, key

    def __call__(self, output) -> Tensor:
        scores = _pick(output, self.key if isinstance(output, dict) else None, "segmentation target")
        if scores.dim() != 4:
            raise ValueError(f"segmentation target: expected (N, classes, H, W) scores, got {tuple(scores.shape)}")
        if not 0 <= self.category < scores.shape[1]:
            raise ValueError(f"segmentation target: class {self.category} out of range 0..{scores.shape[1] - 1}")
        if self.mask is None:
            mask = scores.detach().argmax(1) == self.category
        else:
            mask = self.mask.to(scores.device).bool()
            if mask.shape[-2:] != scores.shape[-2:]:
                raise ValueError(f"segmentation target: mask {tuple(mask.shape)} does not match the scores' "
                                 f"{tuple(scores.shape[-2:])}")
            mask = mask.expand(scores.shape[0], *scores.shape[-2:])
        return (scores[:, self.category] * mask).flatten(1).sum(1)


def _iou(a: Tensor, b: Tensor) -> Tensor:
    lt = torch.maximum(a[:, None, :2], b[None, :, :2])
    rb = torch.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = (rb - lt).clamp_min(0).prod(-1)
    area = lambda t: (t[:, 2:] - t[:, :2]).clamp_min(0).prod(-1)  # noqa: E731
    return inter / (area(a)[:, None] + area(b)[None] - inter).clamp_min(1e-12)


class detection:
    """Object detection (torchvision's Faster/Mask/RetinaNet/FCOS/SSD outputs: a list of dicts with boxes, labels,
    scores): per image, the sum over target boxes of the score of the best detection with the same label and an IoU
    of at least `iou` (pytorch-grad-cam's FasterRCNNBoxScoreTarget). boxes: (K, 4) xyxy for every image, or one
    (K_i, 4) per image; labels likewise."""

    def __init__(self, boxes, labels, iou: float = 0.5):
        self.boxes, self.labels, self.iou = boxes, labels, float(iou)

    def _for(self, value, i, n):
        if isinstance(value, (list, tuple)) and len(value) == n and not isinstance(value[0], (int, float)):
            return torch.as_tensor(value[i])
        return torch.as_tensor(value)

    def __call__(self, output) -> Tensor:
        fields = {"boxes", "labels", "scores"}
        if not (isinstance(output, (list, tuple)) and all(isinstance(d, dict) and fields <= set(d) for d in output)):
            raise ValueError(f"detection target: expected a list of dicts with boxes, labels and scores, got a "
                             f"{describe(output)}")
        n = len(output)
        totals = []
        for i, det in enumerate(output):
            boxes = self._for(self.boxes, i, n).to(det["boxes"]).view(-1, 4)
            labels = self._for(self.labels, i, n).to(det["labels"].device).long().view(-1)
            if boxes.shape[0] != labels.shape[0]:
                raise ValueError(f"detection target: {boxes.shape[0]} boxes but {labels.shape[0]} labels")
            total = det["scores"].sum() * 0  # stays in the graph where nothing matches
            if det["boxes"].numel():
                ious = _iou(boxes, det["boxes"])
                for k in range(boxes.shape[0]):
                    ok = (ious[k] >= self.iou) & (det["labels"] == labels[k])
                    if ok.any():
                        total = total + det["scores"][ok].max()
            totals.append(total)
        return torch.stack(totals)


class similarity:
    """Embedding similarity: the cosine similarity of each input's embedding (N, D) (or output[key]) to
    `reference` (D,) or one per input (N, D) (pytorch-grad-cam's SimilarityToConceptTarget)."""

    def __init__(self, reference: Tensor, key=None):
        self.reference, self.key = reference, key

    def __call__(self, output) -> Tensor:
        emb = _pick(output, self.key, "similarity target").flatten(1)
        ref = self.reference.to(emb).flatten() if self.reference.dim() == 1 else self.reference.to(emb).flatten(1)
        if ref.shape[-1] != emb.shape[1]:
            raise ValueError(f"similarity target: reference has {ref.shape[-1]} dims, the embedding {emb.shape[1]}")
        return F.cosine_similarity(emb, ref.expand_as(emb), dim=1)


__all__ = ["classifier", "describe", "detection", "segmentation", "similarity"]
