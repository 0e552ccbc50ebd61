"""Hungarian matching of predictions to ground truth (DETR family), solved with scipy."""
from typing import Dict, List, Sequence, Tuple

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou

from .utils import box_cxcywh_to_xyxy

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising ``cost_class * C_cls + cost_bbox * L1 - cost_giou * GIoU``.

    Args:
        cost_class: Weight of the classification cost.
        cost_bbox: Weight of the L1 distance between normalised (cx, cy, w, h) boxes.
        cost_giou: Weight of the negative generalised IoU.
        focal: Use the sigmoid focal classification cost (Deformable DETR); otherwise ``-softmax prob``.
        alpha: Focal cost alpha.
        gamma: Focal cost gamma.
    """

    def __init__(
            self,
            cost_class: float = 2.0,
            cost_bbox: float = 5.0,
            cost_giou: float = 2.0,
            focal: bool = True,
            alpha: float = 0.25,
            gamma: float = 2.0,
    ):
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("at least one matching cost must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal = focal
        self.alpha = alpha
        self.gamma = gamma

    def class_cost(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(Q, C) logits, (T,) labels -> (Q, T) classification cost."""
        if not self.focal:
            return -logits.softmax(-1)[:, labels]
        prob = logits.sigmoid()
        neg = (1 - self.alpha) * prob ** self.gamma * -(1 - prob + 1e-8).log()
        pos = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        return pos[:, labels] - neg[:, labels]

    def cost_matrix(self, logits: torch.Tensor, boxes: torch.Tensor, target: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The (Q, T) matching cost of one image: logits (Q, C), boxes (Q, 4) cxcywh, target labels/boxes."""
        tgt_boxes = target["boxes"].to(boxes.dtype)
        cost = self.cost_bbox * torch.cdist(boxes, tgt_boxes, p=1)
        cost = cost + self.cost_class * self.class_cost(logits, target["labels"])
        giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        return cost - self.cost_giou * giou

    @torch.no_grad()
    def forward(
            self, outputs: Dict[str, torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]]
    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Matches ``outputs['pred_logits']`` (B, Q, C) / ``['pred_boxes']`` (B, Q, 4) to normalised cxcywh targets.

        Returns:
            Per image, ``(query_indices, target_indices)`` int64 CPU tensors of equal length ``min(Q, T)``.
        """
        indices = []
        for logits, boxes, target in zip(outputs["pred_logits"], outputs["pred_boxes"], targets):
            if target["labels"].numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_matrix(logits.float(), boxes.float(), target)
            rows, cols = linear_sum_assignment(cost.cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
