"""Multi-scale deformable attention sampling (MSDA), the operator of Deformable DETR.

Semantics (see Zhu et al., "Deformable DETR", ICLR 2021): for every query and head, a weighted sum of bilinear
samples taken at ``L * P`` fractional locations in ``L`` value maps, with the pixel-centre convention
(``x = u * W - 0.5``) and zero padding outside each map.
"""
from typing import List

import torch
import torch.nn.functional as F

__all__ = ["multi_scale_deformable_attention", "ms_deform_attn_reference"]

BACKENDS = ("auto", "cpp", "cuda", "reference")


def ms_deform_attn_reference(
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Pure PyTorch MSDA built on ``F.grid_sample``; differentiable by autograd, the oracle of the tests.

    Args:
        value: (N, S, M, D) values of all levels, levels concatenated, each level row-major.
        spatial_shapes: (L, 2) int64 rows (H, W).
        level_start_index: (L,) int64 offsets of each level in S (unused: the levels are split by size).
        sampling_locations: (N, Lq, M, L, P, 2) locations as (x, y) normalised to [0, 1].
        attention_weights: (N, Lq, M, L, P) weights of the samples.

    Returns:
        (N, Lq, M * D) the weighted samples, heads concatenated.
    """
    n, _, m, d = value.shape
    _, lq, _, num_levels, num_points, _ = sampling_locations.shape
    shapes: List[List[int]] = spatial_shapes.tolist()
    value_levels = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for level, (h, w) in enumerate(shapes):
        value_l = value_levels[level].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled.append(F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, num_levels * num_points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)
    return output.view(n, m * d, lq).transpose(1, 2).contiguous()


def multi_scale_deformable_attention(
        value: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        sampling_locations: torch.Tensor,
        attention_weights: torch.Tensor,
        *,
        backend: str = "auto",
) -> torch.Tensor:
    """Multi-scale deformable attention sampling; see :func:`ms_deform_attn_reference` for the layouts."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
