"""The DETR-family set criterion: focal classification, L1 and GIoU box losses over Hungarian matches."""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchvision.ops import generalized_box_iou, sigmoid_focal_loss

from .matcher import HungarianMatcher
from .utils import box_cxcywh_to_xyxy

__all__ = ["SetCriterion", "deformable_detr_weight_dict"]

Targets = Sequence[Dict[str, torch.Tensor]]
Indices = List[Tuple[torch.Tensor, torch.Tensor]]


def deformable_detr_weight_dict(
        num_decoder_layers: int, two_stage: bool = False, ce: float = 2.0, bbox: float = 5.0, giou: float = 2.0
) -> Dict[str, float]:
    """Deformable DETR loss weights: final layer, ``_<i>`` for each earlier decoder layer, ``_enc`` for two-stage."""
    base = {"loss_ce": ce, "loss_bbox": bbox, "loss_giou": giou}
    weights = dict(base)
    suffixes = [f"_{i}" for i in range(num_decoder_layers - 1)] + (["_enc"] if two_stage else [])
    for suffix in suffixes:
        weights.update({k + suffix: v for k, v in base.items()})
    return weights


class SetCriterion(nn.Module):
    """Losses of a set-prediction detector with sigmoid classification (no "no-object" logit).

    ``forward`` matches the final predictions, every ``aux_outputs`` entry (suffix ``_<i>``) and, for two-stage
    models, ``enc_outputs`` against class-agnostic targets (every label set to 0, suffix ``_enc``), and returns
    the UNWEIGHTED losses; ``weight_dict`` holds the weights (the detector applies them). Subclasses add terms
    by overriding :meth:`get_losses`.

    Targets are dicts with ``labels`` (T,) int64 in ``[0, num_classes)`` and ``boxes`` (T, 4) normalised
    (cx, cy, w, h). Box losses are summed and divided by the number of target boxes in the batch (averaged over
    processes when ``torch.distributed`` is initialised, at least 1); the focal loss is summed over queries and
    classes and divided by the same number.

    Args:
        num_classes: Number of classification logits.
        matcher: Assigns predictions to targets.
        weight_dict: Loss name -> weight.
        focal_alpha: Alpha of the sigmoid focal loss.
        focal_gamma: Gamma of the sigmoid focal loss.
    """

    def __init__(
            self,
            num_classes: int,
            matcher: HungarianMatcher | None = None,
            weight_dict: Dict[str, float] | None = None,
            focal_alpha: float = 0.25,
            focal_gamma: float = 2.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weight_dict = dict(weight_dict) if weight_dict is not None else deformable_detr_weight_dict(1)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @staticmethod
    def _matched_queries(indices: Indices) -> Tuple[torch.Tensor, torch.Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        return batch_idx, query_idx

    def loss_labels(self, outputs: Dict[str, torch.Tensor], targets: Targets, indices: Indices, num_boxes: float):
        logits = outputs["pred_logits"]
        batch_idx, query_idx = self._matched_queries(indices)
        matched_labels = torch.cat([t["labels"][j] for t, (_, j) in zip(targets, indices)])
        onehot = torch.zeros_like(logits)
        onehot[batch_idx.to(logits.device), query_idx.to(logits.device), matched_labels] = 1.0
        loss = sigmoid_focal_loss(logits, onehot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")
        return {"loss_ce": loss / num_boxes}

    def loss_boxes(self, outputs: Dict[str, torch.Tensor], targets: Targets, indices: Indices, num_boxes: float):
        batch_idx, query_idx = self._matched_queries(indices)
        pred = outputs["pred_boxes"][batch_idx, query_idx]
        tgt = torch.cat([t["boxes"][j] for t, (_, j) in zip(targets, indices)]).to(pred.dtype)
        loss_bbox = F.l1_loss(pred, tgt, reduction="sum")
        giou = torch.diag(generalized_box_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(tgt)))
        return {"loss_bbox": loss_bbox / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    def get_losses(
            self, outputs: Dict[str, torch.Tensor], targets: Targets, indices: Indices, num_boxes: float
    ) -> Dict[str, torch.Tensor]:
        """Every loss of one set of predictions given its matching."""
        losses = self.loss_labels(outputs, targets, indices, num_boxes)
        losses.update(self.loss_boxes(outputs, targets, indices, num_boxes))
        return losses

    def num_boxes(self, targets: Targets, device: torch.device) -> float:
        """Target boxes per process, averaged over processes, at least 1."""
        count = torch.as_tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        return max(count.item(), 1.0)

    def forward(self, outputs: Dict[str, torch.Tensor], targets: Targets) -> Dict[str, torch.Tensor]:
        """Unweighted losses of ``outputs`` (``pred_logits``, ``pred_boxes``, optional ``aux_outputs`` list and
        ``enc_outputs`` dict) against ``targets``."""
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        losses = self.get_losses(outputs, targets, self.matcher(outputs, targets), num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self.get_losses(aux, targets, self.matcher(aux, targets), num_boxes)
            losses.update({f"{k}_{i}": v for k, v in aux_losses.items()})
        enc = outputs.get("enc_outputs")
        if enc is not None:
            agnostic = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc_losses = self.get_losses(enc, agnostic, self.matcher(enc, agnostic), num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        return losses
