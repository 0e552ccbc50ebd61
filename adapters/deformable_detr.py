"""Deformable DETR (Zhu et al., ICLR 2021) on the pyramid of any timm backbone.

Single-scale (``num_feature_levels=1``) or multi-scale, with optional iterative box refinement
(``with_box_refine``) and two-stage proposals (``two_stage``); parameter names follow the official
implementation so its checkpoints load through :func:`checkpoint_filter_fn`.
"""
import math
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
from torch import nn

from dat_smt._checkpoint import check_state_dict, load_checkpoint, unwrap_state_dict
from dat_smt.ops import MSDeformAttn

from .backbone import TimmBackbone, build_backbone, mask_to_size
from .criterion import SetCriterion, deformable_detr_weight_dict
from .detector import DetrDetector
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine, box_sine_embedding
from .registry import register_detector
from .utils import MLP, clones, inverse_sigmoid, residual_ffn, valid_ratios_from_mask

__all__ = [
    "DeformableDETR",
    "DeformableTransformer",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoderLayer",
    "checkpoint_filter_fn",
    "convert_official_checkpoint",
    "flatten_levels",
    "input_projections",
    "project_levels",
]


def flatten_levels(
        srcs: List[torch.Tensor], masks: List[torch.Tensor], pos_embeds: List[torch.Tensor], level_embed: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Concatenates per-level (B, C, H, W) maps into tokens.

    Returns:
        ``(src (B, S, C), mask (B, S), pos + level embedding (B, S, C), spatial_shapes (L, 2) rows (H, W),
        level_start_index (L,), valid_ratios (B, L, 2) as (x, y))``.
    """
    spatial_shapes = torch.as_tensor([src.shape[-2:] for src in srcs], dtype=torch.long, device=srcs[0].device)
    level_start_index = torch.cat((spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]))
    src_flat = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
    mask_flat = torch.cat([mask.flatten(1) for mask in masks], 1)
    pos_flat = torch.cat(
        [pos.flatten(2).transpose(1, 2) + level_embed[lvl].view(1, 1, -1) for lvl, pos in enumerate(pos_embeds)], 1
    )
    valid_ratios = torch.stack([valid_ratios_from_mask(mask) for mask in masks], 1)
    return src_flat, mask_flat, pos_flat, spatial_shapes, level_start_index, valid_ratios


class _GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that accepts groups of a single value at batch size 1 as it does at any other batch size.

    A group holds one value when it has one channel on a 1x1 map (GroupNorm(32) of ``d_model=32`` on the coarsest
    level of a small image); it normalises to zero, so the output is the bias. ``F.group_norm`` rejects that only
    when the batch holds one image (a BatchNorm-style check on ``N * C / G``), which made the same image fail
    alone but pass in a batch. Normalisation is per image, so a two-copy batch gives the single image's result.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and x[0].numel() == self.num_groups:
            return super().forward(x.expand(2, *x.shape[1:]))[:1]
        return super().forward(x)


def input_projections(channels: Sequence[int], d_model: int, num_feature_levels: int) -> nn.ModuleList:
    """Per level a conv + GroupNorm(32) to ``d_model`` channels: a 1x1 conv on every backbone map, then a 3x3
    stride-2 conv for every extra level (the first on the raw last backbone map, the others on the previous
    level). Convs are Xavier-initialised with zero bias."""
    if d_model % 32 != 0:
        raise ValueError(f"d_model must be a multiple of 32 (GroupNorm(32) input projections), got {d_model}")
    if num_feature_levels < len(channels):
        raise ValueError(f"num_feature_levels ({num_feature_levels}) is below the backbone's {len(channels)} maps")
    projections = [nn.Sequential(nn.Conv2d(c, d_model, kernel_size=1), _GroupNorm(32, d_model)) for c in channels]
    in_channels = channels[-1]
    for _ in range(num_feature_levels - len(channels)):
        projections.append(
            nn.Sequential(nn.Conv2d(in_channels, d_model, 3, stride=2, padding=1), _GroupNorm(32, d_model))
        )
        in_channels = d_model
    for proj in projections:
        nn.init.xavier_uniform_(proj[0].weight, gain=1)
        nn.init.zeros_(proj[0].bias)
    return nn.ModuleList(projections)


def project_levels(
        input_proj: nn.ModuleList, position_embedding: nn.Module, features: Sequence[torch.Tensor],
        masks: Sequence[torch.Tensor], image_mask: torch.Tensor,
) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
    """Backbone maps and masks -> the ``len(input_proj)`` projected levels (see :func:`input_projections`),
    their padding masks and their positional embeddings (without level embeddings)."""
    srcs = [proj(f) for proj, f in zip(input_proj, features)]
    masks = list(masks)
    for lvl in range(len(features), len(input_proj)):
        src = input_proj[lvl](features[-1] if lvl == len(features) else srcs[-1])
        srcs.append(src)
        masks.append(mask_to_size(image_mask, src.shape[-2:]))
    pos = [position_embedding(m).to(s.dtype) for s, m in zip(srcs, masks)]
    return srcs, masks, pos


def encoder_reference_points(spatial_shapes: torch.Tensor, valid_ratios: torch.Tensor) -> torch.Tensor:
    """Token centres normalised by the valid region of their level, expressed in every level: (B, S, L, 2)."""
    refs = []
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        ref_y, ref_x = torch.meshgrid(
            torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=valid_ratios.device),
            torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=valid_ratios.device),
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(refs, 1)[:, :, None] * valid_ratios[:, None]


def encoder_proposals(
        memory: torch.Tensor, mask_flat: torch.Tensor, spatial_shapes: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two-stage proposals: one box per token, centred on it, 0.05 * 2**level wide, in logit space.

    Returns:
        ``(memory with padded / invalid tokens zeroed, proposals (B, S, 4) unsigmoided cxcywh)``; proposals of
        padded tokens or with a coordinate outside (0.01, 0.99) are +inf.
    """
    n = memory.shape[0]
    proposals, start = [], 0
    for lvl, (h, w) in enumerate(spatial_shapes.tolist()):
        mask_l = mask_flat[:, start:start + h * w].view(n, h, w)
        valid_h = (~mask_l[:, :, 0]).sum(1)
        valid_w = (~mask_l[:, 0, :]).sum(1)
        grid_y, grid_x = torch.meshgrid(
            torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
            torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device),
            indexing="ij",
        )
        grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
        scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
        grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
        wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
        proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
        start += h * w
    proposals = torch.cat(proposals, 1)
    valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
    proposals = torch.log(proposals / (1 - proposals))
    invalid = mask_flat.unsqueeze(-1) | ~valid
    proposals = proposals.masked_fill(invalid, float("inf"))
    memory = memory.masked_fill(invalid, 0.0)
    return memory, proposals


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: multi-scale deformable self-attention then a ReLU FFN."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        # In-place residual adds and ReLU on fresh layer outputs that autograd does not keep: at 20k tokens
        # every avoided temporary is 20-80 MB of memory traffic.
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(self.dropout1(attn).add_(src))
        return residual_ffn(src, self.linear1, self.linear2, self.norm2, self.dropout2, self.dropout3)


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer: query self-attention, deformable cross-attention, ReLU FFN."""

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8, n_points=4):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask=None):
        q = k = tgt + query_pos
        tgt = self.norm2(tgt + self.dropout2(self.self_attn(q, k, tgt, need_weights=False)[0]))
        attn = self.cross_attn(
            tgt + query_pos, reference_points, memory, spatial_shapes, level_start_index, padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(attn))
        ffn = self.linear2(self.dropout3(self.linear1(tgt).relu_()))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)

    def forward(self, src, pos, spatial_shapes, level_start_index, valid_ratios, padding_mask=None):
        reference_points = encoder_reference_points(spatial_shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return src


class DeformableTransformerDecoder(nn.Module):
    """Decoder returning every layer's output and reference (refined and detached when box heads are given)."""

    def __init__(self, layer: nn.Module, num_layers: int):
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers

    def forward(
            self, tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios, query_pos,
            padding_mask=None, bbox_embed: nn.ModuleList | None = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        output = tgt
        hidden_states, references = [], []
        for lid, layer in enumerate(self.layers):
            ratios = torch.cat([valid_ratios, valid_ratios], -1) if reference_points.shape[-1] == 4 else valid_ratios
            ref_input = reference_points[:, :, None] * ratios[:, None]
            output = layer(output, query_pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask)
            if bbox_embed is not None:
                delta = bbox_embed[lid](output)
                if reference_points.shape[-1] == 4:
                    new_reference = delta + inverse_sigmoid(reference_points)
                else:
                    new_reference = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                reference_points = new_reference.sigmoid().detach()
            hidden_states.append(output)
            references.append(reference_points)
        return torch.stack(hidden_states), torch.stack(references)


class DeformableTransformer(nn.Module):
    """Deformable encoder-decoder over flattened multi-level tokens.

    Two-stage mode generates the queries from the top ``two_stage_num_proposals`` encoder proposals (ranked by
    the class-0 logit of the encoder head); its proposal embedding uses ``d_model / 2`` sine features per
    coordinate (128 at the official d_model = 256).
    """

    def __init__(
            self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6, dim_feedforward=1024,
            dropout=0.1, num_feature_levels=4, dec_n_points=4, enc_n_points=4, two_stage=False,
            two_stage_num_proposals=300,
    ):
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        enc_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points
        )
        self.encoder = DeformableTransformerEncoder(enc_layer, num_encoder_layers)
        dec_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points
        )
        self.decoder = DeformableTransformerDecoder(dec_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m.reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed)

    def forward(
            self, srcs, masks, pos_embeds, query_embed=None, class_embed=None, bbox_embed=None, refine=False,
    ) -> Dict[str, Any]:
        """Runs encoder and decoder.

        Args:
            srcs, masks, pos_embeds: Per level (B, C, H, W) maps, (B, H, W) padding masks, (B, C, H, W) embeddings.
            query_embed: (Q, 2C) learned queries (split into positional and content halves); None in two-stage.
            class_embed, bbox_embed: The detector heads (``num_decoder_layers`` [+1 for two-stage]); the
                two-stage encoder uses the extra last ones.
            refine: Refine the reference boxes layer by layer with ``bbox_embed``.

        Returns:
            dict with ``hs`` (layers, B, Q, C), ``init_reference`` (B, Q, 2|4), ``inter_references``
            (layers, B, Q, 2|4), ``memory`` (B, S, C) and, in two-stage, ``enc_outputs_class`` and
            ``enc_outputs_coord_unact``.
        """
        src, mask, pos, spatial_shapes, level_start_index, valid_ratios = flatten_levels(
            srcs, masks, pos_embeds, self.level_embed
        )
        memory = self.encoder(src, pos, spatial_shapes, level_start_index, valid_ratios, mask)
        out: Dict[str, Any] = {"memory": memory}
        batch = memory.shape[0]
        if self.two_stage:
            output_memory, proposals = encoder_proposals(memory, mask, spatial_shapes)
            output_memory = self.enc_output_norm(self.enc_output(output_memory))
            enc_class = class_embed[-1](output_memory)
            enc_coord_unact = bbox_embed[-1](output_memory) + proposals
            num_topk = min(self.two_stage_num_proposals, enc_class.shape[1])
            topk = torch.topk(enc_class[..., 0], num_topk, dim=1)[1]
            topk_coords_unact = torch.gather(enc_coord_unact, 1, topk.unsqueeze(-1).expand(-1, -1, 4)).detach()
            reference_points = topk_coords_unact.sigmoid()
            pos_embed = box_sine_embedding(reference_points, num_pos_feats=self.d_model // 2)
            query_pos, tgt = torch.split(self.pos_trans_norm(self.pos_trans(pos_embed)), self.d_model, dim=2)
            out.update(enc_outputs_class=enc_class, enc_outputs_coord_unact=enc_coord_unact)
        else:
            query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
        hs, inter_references = self.decoder(
            tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios, query_pos, mask,
            bbox_embed=bbox_embed if refine else None,
        )
        out.update(hs=hs, init_reference=reference_points, inter_references=inter_references)
        return out


class DeformableDETR(DetrDetector):
    """Deformable DETR detector with the torchvision API (see :class:`DetrDetector`).

    Args:
        backbone: Must return strides (8, 16, 32) for ``num_feature_levels > 1`` (further levels come from
            3x3 stride-2 convs, the first on the raw last map) or the single stride-32 map for one level.
        num_classes: Object classes.
        num_queries: Decoder queries (and two-stage proposals).
        num_feature_levels: 1 (single-scale) or more (multi-scale).
        with_box_refine: Iterative box refinement with one head per decoder layer.
        two_stage: Queries from encoder proposals.
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, dec_n_points,
            enc_n_points: Transformer sizes (official defaults).
        criterion: Training losses; defaults to the official matcher costs and loss weights.
        **kwargs: :class:`DetrDetector` options (``num_detections``, ``size_divisibility``, ...).
    """

    def __init__(
            self, backbone: TimmBackbone, num_classes: int, num_queries: int = 300, num_feature_levels: int = 4,
            with_box_refine: bool = False, two_stage: bool = False, d_model: int = 256, nhead: int = 8,
            num_encoder_layers: int = 6, num_decoder_layers: int = 6, dim_feedforward: int = 1024,
            dropout: float = 0.1, dec_n_points: int = 4, enc_n_points: int = 4,
            criterion: SetCriterion | None = None, **kwargs,
    ):
        if criterion is None:
            criterion = SetCriterion(
                num_classes, HungarianMatcher(2.0, 5.0, 2.0), deformable_detr_weight_dict(num_decoder_layers, two_stage)
            )
        super().__init__(backbone, num_classes, criterion, **kwargs)
        self.num_queries = num_queries
        self.num_feature_levels = num_feature_levels
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage
        self.transformer = DeformableTransformer(
            d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, num_feature_levels,
            dec_n_points, enc_n_points, two_stage, num_queries,
        )
        self.position_embedding = PositionEmbeddingSine(d_model // 2, normalize=True, offset=-0.5)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, d_model * 2)
        self.input_proj = input_projections(backbone.channels, d_model, num_feature_levels)

        class_head = nn.Linear(d_model, num_classes)
        nn.init.constant_(class_head.bias, -math.log((1 - 0.01) / 0.01))
        box_head = MLP(d_model, d_model, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)
        num_pred = num_decoder_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = clones(class_head, num_pred)
            self.bbox_embed = clones(box_head, num_pred)
            for head in self.bbox_embed[1:]:
                nn.init.zeros_(head.layers[-1].bias[2:])
        else:
            self.class_embed = nn.ModuleList([class_head] * num_pred)
            self.bbox_embed = nn.ModuleList([box_head] * num_pred)
        if two_stage:
            for head in self.bbox_embed:
                nn.init.zeros_(head.layers[-1].bias[2:])

    def forward_features(
            self, images: torch.Tensor, mask: torch.Tensor
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        """Projected per-level maps, their masks and positional embeddings (without level embeddings)."""
        features, masks = self.backbone(images, mask)
        return project_levels(self.input_proj, self.position_embedding, features, masks, mask)

    def forward_head(self, out: Dict[str, Any]) -> Dict[str, Any]:
        """Class logits and boxes of every decoder layer from the transformer outputs."""
        hs = out["hs"]
        references = [out["init_reference"]] + list(out["inter_references"][:-1])
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            reference = inverse_sigmoid(references[lvl])
            delta = self.bbox_embed[lvl](hs[lvl])
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[lvl](hs[lvl]))
            boxes.append(delta.sigmoid())
        result = {
            "pred_logits": logits[-1],
            "pred_boxes": boxes[-1],
            "aux_outputs": [{"pred_logits": c, "pred_boxes": b} for c, b in zip(logits[:-1], boxes[:-1])],
        }
        if self.two_stage:
            result["enc_outputs"] = {
                "pred_logits": out["enc_outputs_class"],
                "pred_boxes": out["enc_outputs_coord_unact"].sigmoid(),
            }
        return result

    def forward_detr(self, images: torch.Tensor, mask: torch.Tensor) -> Dict[str, Any]:
        srcs, masks, pos = self.forward_features(images, mask)
        out = self.transformer(
            srcs, masks, pos, None if self.two_stage else self.query_embed.weight,
            class_embed=self.class_embed, bbox_embed=self.bbox_embed, refine=self.with_box_refine,
        )
        result = self.forward_head(out)
        result.update(hs=out["hs"], init_reference=out["init_reference"],
                      inter_references=out["inter_references"], memory=out["memory"])
        return result


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: DeformableDETR) -> Dict[str, torch.Tensor]:
    """Maps an official Deformable DETR state dict onto :class:`DeformableDETR` and checks it strictly.

    Official ``backbone.0.body.*`` (torchvision ResNet with FrozenBatchNorm) becomes ``backbone.body.*`` (timm's
    features-only ResNet uses the same module names); the decoder's aliases of the heads are dropped; BatchNorm
    ``num_batches_tracked`` counters are filled when the backbone keeps trainable BatchNorm.
    """
    state_dict = unwrap_state_dict(state_dict)
    expected = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("transformer.decoder.bbox_embed.", "transformer.decoder.class_embed.")):
            continue
        if key.startswith("backbone.0.body."):
            key = "backbone.body." + key[len("backbone.0.body."):]
        target = expected.get(key)
        out[key] = value.to(target.dtype) if target is not None and value.is_floating_point() else value
    for key, value in expected.items():
        if key.endswith("num_batches_tracked") and key not in out:
            out[key] = torch.zeros_like(value)
    check_state_dict(out, model, source="official Deformable DETR checkpoint")
    return out


def convert_official_checkpoint(
        checkpoint: Union[str, Dict[str, torch.Tensor]], model: DeformableDETR
) -> DeformableDETR:
    """Loads an official Deformable DETR checkpoint (path or state dict) into ``model`` (strict) and returns it."""
    if not isinstance(checkpoint, dict):
        checkpoint = load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint_filter_fn(checkpoint, model), strict=True)
    return model


@register_detector("deformable_detr")
def deformable_detr(
        backbone: Union[str, nn.Module] = "resnet50", num_classes: int = 91, pretrained_backbone: bool = False,
        backbone_kwargs: Dict[str, Any] | None = None, num_feature_levels: int = 4, **options: Any,
) -> DeformableDETR:
    """Deformable DETR; ``options`` are :class:`DeformableDETR` arguments (``with_box_refine``, ``two_stage``, ...)."""
    out_strides = (8, 16, 32) if num_feature_levels > 1 else (32,)
    body = build_backbone(backbone, out_strides, pretrained_backbone, backbone_kwargs)
    return DeformableDETR(body, num_classes, num_feature_levels=num_feature_levels, **options)
