"""Sine positional embeddings of DETR (no offset) and Deformable DETR (``offset=-0.5``), and of boxes."""
import math

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine", "box_sine_embedding"]


def _sine_dim_t(num_pos_feats: int, temperature: float, device: torch.device) -> torch.Tensor:
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)


def _interleave_sin_cos(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((x[..., 0::2].sin(), x[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """2-d sine embedding of the valid (unpadded) region of a padding mask.

    Output channels are ``[pos_y (num_pos_feats), pos_x (num_pos_feats)]``, each interleaving sin (even) and cos
    (odd) of ``coordinate / temperature ** (2 * (i // 2) / num_pos_feats)``.

    Args:
        num_pos_feats: Channels per axis (half the model width).
        temperature: Frequency base.
        normalize: Scale the cumulative coordinates to ``[0, scale]`` over the valid region.
        scale: Range of the normalised coordinates (2 pi).
        offset: Added to the cumulative coordinate before normalising: 0 in DETR / SMCA, -0.5 in Deformable
            DETR / DINO (pixel centres).
        eps: Guards the normalisation.
    """

    def __init__(
            self,
            num_pos_feats: int = 128,
            temperature: float = 10000.0,
            normalize: bool = True,
            scale: float = 2 * math.pi,
            offset: float = 0.0,
            eps: float = 1e-6,
    ):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = scale
        self.offset = offset
        self.eps = eps

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, H, W) bool mask (True = padding) -> (B, 2 * num_pos_feats, H, W) float32 embedding."""
        not_mask = (~mask).to(torch.float32)
        y_embed = not_mask.cumsum(1)
        x_embed = not_mask.cumsum(2)
        if self.normalize:
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + self.eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + self.eps) * self.scale
        dim_t = _sine_dim_t(self.num_pos_feats, self.temperature, mask.device)
        pos_x = _interleave_sin_cos(x_embed[..., None] / dim_t)
        pos_y = _interleave_sin_cos(y_embed[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return f"num_pos_feats={self.num_pos_feats}, normalize={self.normalize}, offset={self.offset}"


def box_sine_embedding(
        boxes: torch.Tensor, num_pos_feats: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi
) -> torch.Tensor:
    """(..., K) coordinates in [0, 1] -> (..., K * num_pos_feats) sine embedding, coordinates in input order.

    The two-stage Deformable DETR query embedding of its (cx, cy, w, h) proposals.
    """
    dim_t = _sine_dim_t(num_pos_feats, temperature, boxes.device)
    return _interleave_sin_cos(boxes[..., None] * scale / dim_t).flatten(-2)
