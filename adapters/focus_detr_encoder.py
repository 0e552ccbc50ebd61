"""Focus-DETR's sparse encoder: foreground token selection, multi-category score and dual attention.

Only the foreground tokens chosen by the :class:`ForegroundTokenSelector` are updated, with a cascade that keeps
fewer tokens in deeper layers. Inside a layer, the top fine-grained tokens (foreground logit times the best class
logit) exchange information by self-attention, then all kept tokens run deformable attention over the input
multi-scale features. Results are scattered back; background tokens keep their input value.
"""
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import nn

from dat_smt.ops import MSDeformAttn

from .deformable_detr import encoder_proposals, encoder_reference_points, flatten_levels
from .focus_detr_selector import DEFAULT_CASCADE, ForegroundTokenSelector, cascade_token_indices
from .utils import residual_ffn

__all__ = [
    "DualAttentionEncoderLayer",
    "FocusEncoder",
    "FocusEncoderOutput",
    "gather_tokens",
]


def gather_tokens(tokens: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Rows ``indices`` (B, K) of ``tokens`` (B, S, *rest) -> (B, K, *rest), any trailing shape."""
    trailing = tokens.shape[2:]
    expanded = indices.view(*indices.shape, *([1] * len(trailing))).expand(*indices.shape, *trailing)
    return tokens.gather(1, expanded)


class DualAttentionEncoderLayer(nn.Module):
    """Encoder layer over the kept foreground tokens: self-attention on the top fine-grained tokens (then its own
    LayerNorm), deformable attention on all kept tokens over the input features, FFN; post-norm.

    Args:
        d_model: Token channels.
        n_heads: Attention heads of both attentions.
        ffn_dim: Hidden width of the FFN.
        dropout: Dropout after attentions and in the FFN.
        n_levels: Feature levels of the deformable attention.
        n_points: Sampling points per head and level.
        topk_sa: Fine-grained tokens taking part in the self-attention (fewer when fewer tokens are kept).
    """

    def __init__(
            self,
            d_model: int = 256,
            n_heads: int = 8,
            ffn_dim: int = 1024,
            dropout: float = 0.0,
            n_levels: int = 4,
            n_points: int = 4,
            topk_sa: int = 300,
    ):
        super().__init__()
        self.topk_sa = topk_sa
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.self_attn_norm = nn.LayerNorm(d_model)
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
            self,
            query: torch.Tensor,
            pos: torch.Tensor,
            reference_points: torch.Tensor,
            fine_grained_score: torch.Tensor,
            value: torch.Tensor,
            spatial_shapes: torch.Tensor,
            level_start_index: torch.Tensor,
            padding_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            query: (B, K, C) kept tokens; pos: their positional embeddings.
            reference_points: (B, K, L, 2) reference points of the kept tokens.
            fine_grained_score: (B, K) ranking for the self-attention.
            value: (B, S, C) the full input feature map (all levels).
            spatial_shapes, level_start_index, padding_mask: of ``value``.

        Returns:
            (updated tokens (B, K, C), indices (B, k) of the self-attention tokens within ``query``).
        """
        topk = min(self.topk_sa, query.shape[1])
        selected = fine_grained_score.topk(topk, dim=1).indices
        tokens = gather_tokens(query, selected)
        tokens_pos = tokens + gather_tokens(pos, selected)
        attended = tokens + self.self_attn(tokens_pos, tokens_pos, tokens, need_weights=False)[0]
        query = query.scatter(1, selected[..., None].expand_as(attended), self.self_attn_norm(attended))

        attended = self.cross_attn(
            query + pos, reference_points, value, spatial_shapes, level_start_index, padding_mask
        )
        query = self.norm1(self.dropout1(attended).add_(query))
        return residual_ffn(query, self.linear1, self.linear2, self.norm2, self.dropout2, self.dropout3), selected


class FocusEncoderOutput(NamedTuple):
    """Everything the detector and the tests need from the sparse encoder."""

    memory: torch.Tensor  # (B, S, C) encoder output
    padding_mask: torch.Tensor  # (B, S) True at padding
    spatial_shapes: torch.Tensor  # (L, 2) rows (H, W)
    level_start_index: torch.Tensor  # (L,)
    valid_ratios: torch.Tensor  # (B, L, 2)
    foreground_logits: torch.Tensor  # (B, S) selector logits (before the padding fill)
    foreground_indices: list[torch.Tensor]  # per cascade entry (B, k_i), highest score first
    focus_counts: torch.Tensor  # (B,) tokens actually written back per image
    class_logits: list[torch.Tensor]  # per layer (B, k_i, num_classes) multi-category logits (empty if no head)
    self_attn_indices: list[torch.Tensor]  # per layer (B, topk) indices into the kept set


class FocusEncoder(nn.Module):
    """The encoder side of Focus-DETR: level embeddings, the token selector and the dual-attention layers.

    ``input_proj``/``input_norm`` project the (masked) input tokens for the selector; the detector reuses the same
    pair for its two-stage proposals, as the release does.

    Args:
        d_model: Token channels.
        n_heads: Attention heads.
        num_layers: Encoder layers (at most ``len(cascade)``).
        ffn_dim: FFN hidden width.
        dropout: Dropout rate.
        n_levels: Feature levels.
        n_points: Deformable sampling points.
        keep_ratio: Fraction of valid tokens treated as foreground (1.0 disables the pruning gain).
        cascade: Fraction of the kept tokens updated by each layer.
        topk_sa: Fine-grained tokens in each layer's self-attention.
    """

    def __init__(
            self,
            d_model: int = 256,
            n_heads: int = 8,
            num_layers: int = 6,
            ffn_dim: int = 2048,
            dropout: float = 0.0,
            n_levels: int = 4,
            n_points: int = 4,
            keep_ratio: float = 0.5,
            cascade: Sequence[float] = DEFAULT_CASCADE,
            topk_sa: int = 300,
    ):
        super().__init__()
        if len(cascade) < num_layers:
            raise ValueError(f"cascade needs one ratio per encoder layer: {num_layers} layers, {len(cascade)} ratios")
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        self.keep_ratio = keep_ratio
        self.cascade = tuple(cascade)
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model).normal_())
        self.input_proj = nn.Linear(d_model, d_model)
        self.input_norm = nn.LayerNorm(d_model)
        self.selector = ForegroundTokenSelector(d_model, n_levels)
        self.layers = nn.ModuleList(
            DualAttentionEncoderLayer(d_model, n_heads, ffn_dim, dropout, n_levels, n_points, topk_sa)
            for _ in range(num_layers)
        )

    def forward(
            self,
            features: Sequence[torch.Tensor],
            masks: Sequence[torch.Tensor],
            pos_embeds: Sequence[torch.Tensor],
            score_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> FocusEncoderOutput:
        """
        Args:
            features: Per level (B, C, H_l, W_l), fine to coarse.
            masks: Per level (B, H_l, W_l) True at padding.
            pos_embeds: Per level (B, C, H_l, W_l) positional embeddings (without level embedding).
            score_head: Class head for the multi-category score (the detector's encoder-output classifier);
                without it the self-attention tokens are ranked by the foreground logit alone.
        """
        if not len(features) == len(masks) == len(pos_embeds) == self.level_embed.shape[0]:
            raise ValueError(
                f"expected {self.level_embed.shape[0]} levels of features, masks and positions, got "
                f"{len(features)}, {len(masks)}, {len(pos_embeds)}"
            )
        src, padding_mask, pos, spatial_shapes, level_start_index, ratios = flatten_levels(
            list(features), list(masks), list(pos_embeds), self.level_embed
        )
        reference_points = encoder_reference_points(spatial_shapes, ratios)

        # The selector sees the tokens the two-stage proposals see: masked where a proposal is unusable, projected.
        selector_tokens, _ = encoder_proposals(src + pos, padding_mask, spatial_shapes)
        selector_tokens = self.input_norm(self.input_proj(selector_tokens))
        foreground_logits = self.selector(selector_tokens, spatial_shapes, level_start_index)
        indices, ranked_scores, counts = cascade_token_indices(
            foreground_logits, padding_mask, self.keep_ratio, self.cascade
        )

        output = src
        class_logits, sa_indices = [], []
        for layer, layer_indices in zip(self.layers, indices):
            query = gather_tokens(output, layer_indices)
            fine_grained = gather_tokens(ranked_scores, layer_indices)
            if score_head is not None:
                logits = score_head(query)
                class_logits.append(logits)
                fine_grained = logits.max(-1).values * fine_grained
            updated, selected = layer(
                query,
                gather_tokens(pos, layer_indices),
                gather_tokens(reference_points, layer_indices),
                fine_grained,
                src,
                spatial_shapes,
                level_start_index,
                padding_mask,
            )
            sa_indices.append(selected)
            # Only the top K_b tokens of image b are written back; the rest of the gathered rows are batch padding.
            rank = torch.arange(layer_indices.shape[1], device=src.device)
            written = (rank[None] < counts[:, None])[..., None]
            updated = torch.where(written, updated, query)
            output = output.scatter(1, layer_indices[..., None].expand_as(updated), updated)
        return FocusEncoderOutput(
            output, padding_mask, spatial_shapes, level_start_index, ratios, foreground_logits, indices, counts,
            class_logits, sa_indices,
        )
