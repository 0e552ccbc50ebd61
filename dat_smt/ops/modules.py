"""The multi-scale deformable attention module used by the detection adapters."""
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .msda import multi_scale_deformable_attention

__all__ = ["MSDeformAttn"]


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR) over a flattened multi-level value map.

    Args:
        d_model: Channels of queries and values.
        n_levels: Number of feature levels.
        n_heads: Number of attention heads; ``d_model`` must be divisible by it.
        n_points: Sampling points per head and level.
        backend: MSDA backend, see :func:`dat_smt.ops.multi_scale_deformable_attention`.
    """

    def __init__(
            self,
            d_model: int = 256,
            n_levels: int = 4,
            n_heads: int = 8,
            n_points: int = 4,
            backend: str = "auto",
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn(
                f"head dim {head_dim} is not a power of 2; the CUDA kernel is fastest with powers of 2", stacklevel=2
            )
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.backend = backend
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        # Ring initialisation: head h looks along direction 2*pi*h/M, point p at (p + 1) times that step.
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
            self,
            query: torch.Tensor,
            reference_points: torch.Tensor,
            input_flatten: torch.Tensor,
            spatial_shapes: torch.Tensor,
            level_start_index: torch.Tensor,
            input_padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            query: (N, Lq, C) queries (with positional embedding added by the caller).
            reference_points: (N, Lq, L, 2) points (x, y) in [0, 1], or (N, Lq, L, 4) boxes (cx, cy, w, h).
            input_flatten: (N, S, C) values of all levels.
            spatial_shapes: (L, 2) rows (H, W).
            level_start_index: (L,) start of each level in S.
            input_padding_mask: (N, S) True at padding tokens, whose values are zeroed.

        Returns:
            (N, Lq, C)
        """
        n, lq, _ = query.shape
        s = input_flatten.shape[1]
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            # In place: the projection's output is a fresh tensor that autograd does not keep.
            value = value.masked_fill_(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # offsets / (W, H) + reference, in place on the projection's fresh output (its backward does not need
            # it) and over rows of (level, point, xy) per head: broadcasting both operands there gives the
            # elementwise loops 32 contiguous values instead of 2, and the same values and gradients.
            normalizer = torch.stack([spatial_shapes[..., 1], spatial_shapes[..., 0]], -1).to(offsets.dtype)
            normalizer = normalizer[:, None].expand(self.n_levels, self.n_points, 2).reshape(-1)
            reference = reference_points[:, :, None, :, None].expand(n, lq, 1, self.n_levels, self.n_points, 2)
            locations = offsets.view(n, lq, self.n_heads, -1).div_(normalizer).add_(reference.reshape(n, lq, 1, -1))
            locations = locations.view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        elif reference_points.shape[-1] == 4:
            offsets = offsets.view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
            locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                f"reference_points must end in 2 (x, y) or 4 (cx, cy, w, h), got shape {tuple(reference_points.shape)}"
            )
        output = multi_scale_deformable_attention(
            value, spatial_shapes, level_start_index, locations, weights, backend=self.backend
        )
        return self.output_proj(output)
