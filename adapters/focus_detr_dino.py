"""The DINO base of Focus-DETR: contrastive denoising queries, mixed query selection and the decoder with
look-forward-twice box refinement and a positional MLP on sine-embedded reference boxes.
"""
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torchvision.ops import box_convert

from dat_smt.ops import MSDeformAttn

from .position_encoding import box_sine_embedding
from .utils import MLP, inverse_sigmoid

__all__ = [
    "sine_box_embedding",
    "denoising_attention_mask",
    "DenoisingQueries",
    "ContrastiveDenoising",
    "denoising_match_indices",
    "select_queries",
    "DinoDecoderLayer",
    "DinoDecoder",
    "look_forward_twice_boxes",
]


def sine_box_embedding(
        boxes: torch.Tensor, num_feats: int = 128, temperature: float = 10000.0, exchange_xy: bool = True
) -> torch.Tensor:
    """Sine embedding (scale 2*pi, interleaved sin/cos) of each coordinate: (..., n) -> (..., n * num_feats).

    ``exchange_xy`` puts y before x, as DINO does for its query positional MLP.
    """
    if exchange_xy and boxes.shape[-1] >= 2:
        boxes = torch.cat([boxes[..., 1:2], boxes[..., 0:1], boxes[..., 2:]], -1)
    return box_sine_embedding(boxes, num_feats, temperature)


def denoising_attention_mask(
        num_groups: int, group_size: int, num_queries: int, device: torch.device | None = None
) -> torch.Tensor:
    """Self-attention mask (True = blocked) over ``[denoising groups..., matching queries]``.

    Matching queries cannot see any denoising query; each denoising group (``group_size`` = positives plus
    negatives) sees itself and the matching queries but no other group.
    """
    pad = num_groups * group_size
    mask = torch.zeros(pad + num_queries, pad + num_queries, dtype=torch.bool, device=device)
    mask[pad:, :pad] = True
    group = torch.arange(pad, device=device) // group_size
    mask[:pad, :pad] = group[:, None] != group[None, :]
    return mask


class DenoisingQueries(NamedTuple):
    """Noised ground-truth queries prepended to the matching queries (training only)."""

    content: torch.Tensor  # (B, pad, C) label embeddings of the noised labels
    boxes_unact: torch.Tensor  # (B, pad, 4) logits of the noised boxes (cx, cy, w, h)
    attn_mask: torch.Tensor  # (pad + Q, pad + Q) True = blocked
    num_groups: int
    group_size: int  # 2 * max objects per image: positives then negatives


class ContrastiveDenoising(nn.Module):
    """DINO's contrastive denoising: per group, every ground truth appears once with small box noise (positive,
    to be reconstructed) and once with large noise (negative, to be classified as background).

    Args:
        num_classes: Classes of the label embedding.
        d_model: Query channels.
        dn_number: Budget of noised queries per sign (groups = ``dn_number // max_objects``, at least 1).
        label_noise_ratio: Labels replaced by a random class with probability ``ratio / 2``.
        box_noise_scale: Box noise relative to half the box size.
    """

    def __init__(
            self, num_classes: int, d_model: int = 256, dn_number: int = 100, label_noise_ratio: float = 0.5,
            box_noise_scale: float = 1.0,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.dn_number = dn_number
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.label_embed = nn.Embedding(num_classes, d_model)

    def forward(self, targets: Sequence[dict], num_queries: int) -> DenoisingQueries | None:
        """``targets``: per image ``labels`` (M,) and ``boxes`` (M, 4) normalised cxcywh. None when no objects."""
        counts = [len(t["labels"]) for t in targets]
        max_objects = max(counts, default=0)
        if self.dn_number <= 0 or max_objects == 0:
            return None
        num_groups = max(self.dn_number * 2 // (2 * max_objects), 1)
        group_size = 2 * max_objects
        device = self.label_embed.weight.device
        batch = len(targets)
        labels = torch.cat([t["labels"] for t in targets]).to(device)
        boxes = torch.cat([t["boxes"] for t in targets]).to(device=device, dtype=torch.float32)
        image_index = torch.cat([torch.full((n,), i, device=device) for i, n in enumerate(counts)])
        slot = torch.cat([torch.arange(n, device=device) for n in counts])

        # Layout per group: [positives of all images' slots, negatives]; repeat labels/boxes for 2 * groups copies.
        copies = 2 * num_groups
        labels = labels.repeat(copies)
        boxes = boxes.repeat(copies, 1)
        copy_index = torch.arange(copies, device=device).repeat_interleave(len(slot))
        negative = (copy_index % 2 == 1)
        position = (copy_index // 2) * group_size + negative.long() * max_objects + slot.repeat(copies)
        image_index = image_index.repeat(copies)

        if self.label_noise_ratio > 0:
            flip = torch.rand(labels.shape, device=device) < self.label_noise_ratio * 0.5
            labels = torch.where(flip, torch.randint_like(labels, 0, self.num_classes), labels)
        if self.box_noise_scale > 0:
            corners = box_convert(boxes, "cxcywh", "xyxy")
            half = boxes[:, 2:].repeat(1, 2) / 2
            magnitude = torch.rand_like(boxes) + negative[:, None].float()
            sign = torch.randint_like(boxes, 0, 2) * 2 - 1
            corners = (corners + sign * magnitude * half * self.box_noise_scale).clamp(0, 1)
            boxes = box_convert(corners, "xyxy", "cxcywh")

        pad = num_groups * group_size
        content = self.label_embed.weight.new_zeros(batch, pad, self.label_embed.embedding_dim)
        boxes_unact = content.new_zeros(batch, pad, 4)
        content[image_index, position] = self.label_embed(labels)
        boxes_unact[image_index, position] = inverse_sigmoid(boxes)
        mask = denoising_attention_mask(num_groups, group_size, num_queries, device)
        return DenoisingQueries(content, boxes_unact, mask, num_groups, group_size)


def denoising_match_indices(
        counts: Sequence[int], num_groups: int, group_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(query index, target index) of the positive denoising queries of each image, for the DN losses."""
    indices = []
    for count in counts:
        targets = torch.arange(count).repeat(num_groups)
        queries = (torch.arange(num_groups) * group_size).repeat_interleave(count) + targets
        indices.append((queries, targets))
    return indices


def select_queries(
        class_logits: torch.Tensor, coords_unact: torch.Tensor, num_queries: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixed query selection: the proposals with the highest max-class logit (fewer on small inputs).

    Returns (indices (B, k), their box logits (B, k, 4)).
    """
    k = min(num_queries, class_logits.shape[1])
    indices = class_logits.max(-1).values.topk(k, dim=1).indices
    return indices, coords_unact.gather(1, indices[..., None].expand(-1, -1, 4))


class DinoDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention (with the denoising mask), deformable cross-attention, FFN."""

    def __init__(
            self, d_model: int = 256, n_heads: int = 8, ffn_dim: int = 2048, dropout: float = 0.0, n_levels: int = 4,
            n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
            self, tgt: torch.Tensor, query_pos: torch.Tensor, reference_points: torch.Tensor, memory: torch.Tensor,
            spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, padding_mask: torch.Tensor | None,
            attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, q, tgt, attn_mask=attn_mask, need_weights=False)[0]))
        attended = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask
        )
        tgt = self.norm2(tgt + self.dropout2(attended))
        return self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(self.linear1(tgt).relu_()))))


class DinoDecoder(nn.Module):
    """DINO decoder: each layer refines 4-d reference boxes; the query positional embedding is an MLP of the
    sine-embedded (valid-ratio scaled) box. Returns every layer's normalised output and its refined boxes; the boxes
    are kept undetached for the loss (look forward twice) but detached as the next layer's reference.
    """

    def __init__(
            self, d_model: int = 256, n_heads: int = 8, num_layers: int = 6, ffn_dim: int = 2048,
            dropout: float = 0.0, n_levels: int = 4, n_points: int = 4,
    ):
        super().__init__()
        if d_model % 2 != 0:
            raise ValueError(f"d_model must be even, got {d_model}")
        self.layers = nn.ModuleList(
            DinoDecoderLayer(d_model, n_heads, ffn_dim, dropout, n_levels, n_points) for _ in range(num_layers)
        )
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.norm = nn.LayerNorm(d_model)
        self.d_model = d_model

    def forward(
            self, tgt: torch.Tensor, reference_boxes: torch.Tensor, memory: torch.Tensor, padding_mask: torch.Tensor,
            spatial_shapes: torch.Tensor, level_start_index: torch.Tensor, valid_ratios: torch.Tensor,
            bbox_heads: Sequence[nn.Module], attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (hidden states (L, B, Q, C), refined boxes (L, B, Q, 4), undetached)."""
        hidden, boxes = [], []
        scale = torch.cat([valid_ratios, valid_ratios], -1)[:, None]
        output = tgt
        for layer, bbox_head in zip(self.layers, bbox_heads):
            reference_input = reference_boxes[:, :, None] * scale
            query_pos = self.ref_point_head(
                sine_box_embedding(reference_input[:, :, 0], num_feats=self.d_model // 2)
            )
            output = layer(
                output, query_pos, reference_input, memory, spatial_shapes, level_start_index, padding_mask, attn_mask
            )
            refined = (bbox_head(output) + inverse_sigmoid(reference_boxes)).sigmoid()
            hidden.append(self.norm(output))
            boxes.append(refined)
            reference_boxes = refined.detach()
        return torch.stack(hidden), torch.stack(boxes)


def look_forward_twice_boxes(
        hidden: torch.Tensor, initial_boxes: torch.Tensor, refined_boxes: torch.Tensor, bbox_heads: Sequence[nn.Module]
) -> torch.Tensor:
    """Box predictions of every decoder layer: layer l's head on its normalised output, added to the UNDETACHED
    boxes of layer l-1, so layer l's loss also trains layer l-1's refinement. Returns (L, B, Q, 4)."""
    references = [initial_boxes, *refined_boxes[:-1].unbind(0)]
    return torch.stack(
        [(head(h) + inverse_sigmoid(ref)).sigmoid() for head, h, ref in zip(bbox_heads, hidden, references)]
    )
