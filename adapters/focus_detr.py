"""Focus-DETR on any timm backbone: ``create_detector('focus_detr', backbone=..., num_classes=...)``.

DINO (contrastive denoising, mixed query selection, look-forward-twice refinement) with Focus-DETR's sparse
encoder (foreground token selector + multi-category score + dual attention). Fixes of the release: the selector
strides come from the backbone's actual levels, gathers use the model width, inputs with few tokens keep fewer
tokens/queries instead of crashing, and the multi-category score uses the encoder-output class head for any
number of encoder and decoder layers.
"""
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .backbone import TimmBackbone, build_backbone
from .criterion import SetCriterion
from .deformable_detr import encoder_proposals, input_projections, project_levels
from .detector import DetrDetector
from .focus_detr_dino import (
    ContrastiveDenoising,
    DinoDecoder,
    denoising_match_indices,
    look_forward_twice_boxes,
    select_queries,
)
from .focus_detr_encoder import FocusEncoder
from .focus_detr_selector import DEFAULT_CASCADE, foreground_targets, level_size_ranges, selector_focal_loss
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .registry import register_detector
from .utils import MLP, box_cxcywh_to_xyxy, clones

__all__ = ["FocusDETR", "FocusCriterion", "focus_detr_weight_dict", "focus_detr"]


def focus_detr_weight_dict(
        num_decoder_layers: int, ce: float = 1.0, bbox: float = 5.0, giou: float = 2.0, select: float = 1.5
) -> dict[str, float]:
    """Loss weights: every decoder layer (``_<i>``), the encoder proposals (``_enc``), the denoising queries
    (``_dn`` and ``_dn_<i>``) and the foreground selector (``loss_select``)."""
    base = {"loss_ce": ce, "loss_bbox": bbox, "loss_giou": giou}
    suffixes = [""] + [f"_{i}" for i in range(num_decoder_layers - 1)] + ["_enc", "_dn"]
    suffixes += [f"_dn_{i}" for i in range(num_decoder_layers - 1)]
    weights = {k + s: v for s in suffixes for k, v in base.items()}
    weights["loss_select"] = select
    return weights


class FocusCriterion(SetCriterion):
    """DINO/Focus-DETR losses: the set losses of every layer, the encoder proposals with their real classes, the
    denoising reconstruction (positives matched to their ground truth by construction) and the selector focal loss.
    """

    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        main = {k: v for k, v in outputs.items() if k != "enc_outputs"}
        losses = super().forward(main, targets)
        num_boxes = self.num_boxes(targets, outputs["pred_logits"].device)
        enc = outputs.get("enc_outputs")
        if enc is not None:
            enc_losses = self.get_losses(enc, targets, self.matcher(enc, targets), num_boxes)
            losses.update({f"{k}_enc": v for k, v in enc_losses.items()})
        dn = outputs.get("dn_outputs")
        if dn is not None:
            indices = denoising_match_indices(
                [len(t["labels"]) for t in targets], outputs["dn_num_groups"], outputs["dn_group_size"]
            )
            dn_boxes = num_boxes * outputs["dn_num_groups"]
            for i, layer_out in enumerate(dn):
                suffix = "_dn" if i == len(dn) - 1 else f"_dn_{i}"
                layer_losses = self.get_losses(layer_out, targets, indices, dn_boxes)
                losses.update({k + suffix: v for k, v in layer_losses.items()})
        if "foreground_logits" in outputs:
            losses["loss_select"] = selector_focal_loss(outputs["foreground_logits"], outputs["foreground_targets"])
        return losses


class FocusDETR(DetrDetector):
    """Focus-DETR detector with the torchvision API (see :class:`DetrDetector`).

    Args:
        backbone: Must return strides (8, 16, 32); further levels come from 3x3 stride-2 convs (the first on the
            raw last map).
        num_classes: Object classes.
        num_queries: Matching queries (900); fewer on inputs with fewer tokens.
        num_feature_levels: Levels fed to the transformer (>= the backbone's maps).
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, enc_n_points,
            dec_n_points: Transformer sizes (release defaults).
        keep_ratio: Foreground fraction of valid tokens (0.5); 1.0 keeps every token (no pruning).
        cascade: Fraction of the kept tokens updated per encoder layer.
        topk_sa: Fine-grained tokens in each encoder self-attention (300).
        dn_number, label_noise_ratio, box_noise_scale: Contrastive denoising (training only); ``dn_number=0``
            disables it.
        overlapping_ranges: Use the paper's overlapping object-size ranges for the selector targets.
        criterion: Training losses; defaults to the release's matcher costs and weights.
        **kwargs: :class:`DetrDetector` options.
    """

    def __init__(
            self, backbone: TimmBackbone, num_classes: int, num_queries: int = 900, num_feature_levels: int = 4,
            d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
            dim_feedforward: int = 2048, dropout: float = 0.0, enc_n_points: int = 4, dec_n_points: int = 4,
            keep_ratio: float = 0.5, cascade: Sequence[float] = DEFAULT_CASCADE, topk_sa: int = 300,
            dn_number: int = 100, label_noise_ratio: float = 0.5, box_noise_scale: float = 1.0,
            overlapping_ranges: bool = False, criterion: SetCriterion | None = None, **kwargs,
    ):
        if criterion is None:
            criterion = FocusCriterion(
                num_classes, HungarianMatcher(2.0, 5.0, 2.0), focus_detr_weight_dict(num_decoder_layers)
            )
        super().__init__(backbone, num_classes, criterion, **kwargs)
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        extra = num_feature_levels - len(backbone.channels)
        self.strides = list(backbone.strides) + [backbone.strides[-1] * 2 ** (i + 1) for i in range(extra)]
        self.size_ranges = level_size_ranges(num_feature_levels, overlapping=overlapping_ranges)

        self.input_proj = input_projections(backbone.channels, d_model, num_feature_levels)
        self.position_embedding = PositionEmbeddingSine(d_model // 2, normalize=True, offset=-0.5)

        self.encoder = FocusEncoder(
            d_model, nhead, num_encoder_layers, dim_feedforward, dropout, num_feature_levels, enc_n_points,
            keep_ratio, cascade, topk_sa,
        )
        self.tgt_embed = nn.Embedding(num_queries, d_model)
        self.decoder = DinoDecoder(
            d_model, nhead, num_decoder_layers, dim_feedforward, dropout, num_feature_levels, dec_n_points
        )
        self.denoising = ContrastiveDenoising(num_classes, d_model, dn_number, label_noise_ratio, box_noise_scale)

        class_head = nn.Linear(d_model, num_classes)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
        box_head = MLP(d_model, d_model, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        # One head per decoder layer plus the encoder-output head (also the multi-category score head).
        self.class_embed = clones(class_head, num_decoder_layers + 1)
        self.bbox_embed = clones(box_head, num_decoder_layers + 1)

    def forward_outputs(
            self, images: torch.Tensor, mask: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]] | None,
            image_sizes: Sequence[tuple[int, int]],
    ) -> dict[str, Any]:
        return self.forward_detr(images, mask, targets, image_sizes)

    def forward_features(
            self, images: torch.Tensor, mask: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Projected per-level maps, their masks and positional embeddings (without level embeddings)."""
        features, masks = self.backbone(images, mask)
        return project_levels(self.input_proj, self.position_embedding, features, masks, mask)

    def forward_detr(
            self, images: torch.Tensor, mask: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]] | None = None,
            image_sizes: Sequence[tuple[int, int]] | None = None,
    ) -> dict[str, Any]:
        """Raw predictions; with ``targets`` (normalised cxcywh) also the denoising and selector outputs."""
        srcs, masks, pos = self.forward_features(images, mask)
        enc = self.encoder(srcs, masks, pos, score_head=self.class_embed[-1])
        proposal_tokens, proposals = encoder_proposals(enc.memory, enc.padding_mask, enc.spatial_shapes)
        proposal_tokens = self.encoder.input_norm(self.encoder.input_proj(proposal_tokens))
        enc_class = self.class_embed[-1](proposal_tokens)
        enc_coords_unact = self.bbox_embed[-1](proposal_tokens) + proposals
        topk, topk_coords_unact = select_queries(enc_class, enc_coords_unact, self.num_queries)
        num_selected = topk.shape[1]
        reference = topk_coords_unact.detach().sigmoid()
        tgt = self.tgt_embed.weight[:num_selected].unsqueeze(0).expand(images.shape[0], -1, -1)

        dn = self.denoising(targets, num_selected) if targets is not None else None
        attn_mask = None
        if dn is not None:
            tgt = torch.cat([dn.content, tgt], 1)
            reference = torch.cat([dn.boxes_unact.sigmoid(), reference], 1)
            attn_mask = dn.attn_mask
        hidden, refined = self.decoder(
            tgt, reference, enc.memory, enc.padding_mask, enc.spatial_shapes, enc.level_start_index,
            enc.valid_ratios, self.bbox_embed[:-1], attn_mask,
        )
        boxes = look_forward_twice_boxes(hidden, reference, refined, self.bbox_embed[:-1])
        logits = torch.stack([head(h) for head, h in zip(self.class_embed[:-1], hidden)])
        num_dn = 0 if dn is None else dn.content.shape[1]
        layers = [{"pred_logits": c[:, num_dn:], "pred_boxes": b[:, num_dn:]} for c, b in zip(logits, boxes)]
        result: dict[str, Any] = {
            **layers[-1],
            "aux_outputs": layers[:-1],
            "enc_outputs": {
                "pred_logits": enc_class.gather(1, topk[..., None].expand(-1, -1, enc_class.shape[-1])),
                "pred_boxes": topk_coords_unact.sigmoid(),
            },
            "memory": enc.memory,
            "foreground_indices": enc.foreground_indices,
        }
        if dn is not None:
            result["dn_outputs"] = [{"pred_logits": c[:, :num_dn], "pred_boxes": b[:, :num_dn]} for c, b in
                                    zip(logits, boxes)]
            result["dn_num_groups"] = dn.num_groups
            result["dn_group_size"] = dn.group_size
        if targets is not None:
            if image_sizes is None:
                raise ValueError("image_sizes are needed with targets (to place the boxes in pixels)")
            absolute = [
                box_cxcywh_to_xyxy(t["boxes"]) * t["boxes"].new_tensor([w, h, w, h])
                for t, (h, w) in zip(targets, image_sizes)
            ]
            result["foreground_logits"] = enc.foreground_logits
            result["foreground_targets"] = foreground_targets(
                absolute, enc.spatial_shapes, self.strides, self.size_ranges
            )
        return result


@register_detector("focus_detr")
def focus_detr(
        backbone: str | nn.Module = "resnet50", num_classes: int = 91, pretrained_backbone: bool = False,
        backbone_kwargs: dict[str, Any] | None = None, num_feature_levels: int = 4, **options: Any,
) -> FocusDETR:
    """Focus-DETR; ``options`` are :class:`FocusDETR` arguments (``keep_ratio``, ``num_queries``, sizes, ...)."""
    body = build_backbone(backbone, (8, 16, 32), pretrained_backbone, backbone_kwargs)
    return FocusDETR(body, num_classes, num_feature_levels=num_feature_levels, **options)
