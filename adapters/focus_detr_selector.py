"""Focus-DETR's Foreground Token Selector: score network, top-down modulation, label assignment, cascade.

The selector ranks every encoder token by a foreground logit. Scores are predicted coarse to fine: each finer
level's tokens are modulated by the upsampled logits of the next coarser level before being scored. Training
targets come from an FCOS-like, class-agnostic assignment of ground-truth boxes to the level whose stride suits
the box size.
"""
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import sigmoid_focal_loss

__all__ = [
    "ForegroundScorer",
    "ForegroundTokenSelector",
    "level_size_ranges",
    "foreground_targets",
    "selector_focal_loss",
    "foreground_token_counts",
    "cascade_token_indices",
    "DEFAULT_CASCADE",
]

# Fraction of the kept foreground tokens each encoder layer updates, as released.
DEFAULT_CASCADE = (1.0, 0.8, 0.6, 0.6, 0.4, 0.2)


class ForegroundScorer(nn.Module):
    """Token-wise foreground logit from a local half and a level-global (mean-pooled) half of a hidden embedding.

    Args:
        dim: Token channels.
        hidden_dim: Hidden width; its second half is averaged over all tokens of the level.
    """

    def __init__(self, dim: int = 256, hidden_dim: int = 256):
        super().__init__()
        if hidden_dim % 4 != 0:
            raise ValueError(f"hidden_dim must be divisible by 4, got {hidden_dim}")
        self.hidden_dim = hidden_dim
        self.embed = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden_dim), nn.GELU())
        self.head = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 2),
            nn.GELU(),
            nn.Linear(hidden_dim // 2, hidden_dim // 4),
            nn.GELU(),
            nn.Linear(hidden_dim // 4, 1),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) tokens of ONE level -> (B, N) logits."""
        hidden = self.embed(tokens)
        local, global_ = hidden.split(self.hidden_dim // 2, dim=-1)
        # The released model averages over every token of the level, padding included; kept for weight parity.
        global_ = global_.mean(dim=1, keepdim=True).expand_as(local)
        return self.head(torch.cat([local, global_], dim=-1)).squeeze(-1)


class ForegroundTokenSelector(nn.Module):
    """Scores all tokens of a multi-level map coarse to fine with top-down modulation.

    For levels ordered fine (0) to coarse (L-1): ``s_{L-1} = f(x_{L-1})`` and, going down,
    ``s_l = f(x_l * (1 + alpha_k * up(s_{l+1})))`` where ``up`` is bilinear (align_corners=True) and ``alpha_k``
    is the k-th learnable scalar counted from the second-coarsest level. Works for any number of levels.
    As released, the factor multiplies whole tokens and the score network starts with a LayerNorm, so the
    modulation only acts where ``1 + alpha_k * up(s)`` is negative (the token flips sign) or tiny.

    Args:
        dim: Token channels.
        num_levels: Number of feature levels (``num_levels - 1`` modulation coefficients).
        hidden_dim: Hidden width of the score network.
    """

    def __init__(self, dim: int = 256, num_levels: int = 4, hidden_dim: int | None = None):
        super().__init__()
        if num_levels < 1:
            raise ValueError(f"num_levels must be >= 1, got {num_levels}")
        self.num_levels = num_levels
        self.scorer = ForegroundScorer(dim, hidden_dim or dim)
        self.alpha = nn.Parameter(torch.empty(num_levels - 1).uniform_(-0.3, 0.3))

    def forward(
            self, tokens: torch.Tensor, spatial_shapes: torch.Tensor, level_start_index: torch.Tensor
    ) -> torch.Tensor:
        """(B, S, dim) projected tokens of all levels (fine to coarse) -> (B, S) foreground logits."""
        if spatial_shapes.shape[0] != self.num_levels:
            raise ValueError(f"selector built for {self.num_levels} levels, got {spatial_shapes.shape[0]}")
        batch = tokens.shape[0]
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        starts = [int(s) for s in level_start_index.tolist()]
        scores: list[torch.Tensor] = [tokens.new_empty(0)] * self.num_levels
        coarser_map = None
        for level in reversed(range(self.num_levels)):
            h, w = shapes[level]
            level_tokens = tokens[:, starts[level]:starts[level] + h * w]
            if coarser_map is not None:
                up = F.interpolate(coarser_map, size=(h, w), mode="bilinear", align_corners=True)
                alpha = self.alpha[self.num_levels - 2 - level]
                level_tokens = level_tokens + level_tokens * up.flatten(2).transpose(1, 2) * alpha
            scores[level] = self.scorer(level_tokens)
            coarser_map = scores[level].view(batch, 1, h, w)
        return torch.cat(scores, dim=1)


def level_size_ranges(num_levels: int, base: float = 64.0, overlapping: bool = False) -> list[tuple[float, float]]:
    """Object-size range ``(lo, hi]`` (max distance from a token to the box sides, pixels) of each level.

    The release uses contiguous ranges ``(-1, 64], (64, 128], (128, 256], (256, inf)`` for strides 8 to 64, i.e.
    upper bound ``base * 2**l``. ``overlapping=True`` gives the paper's variant where each level's range starts at
    half of the previous level's upper bound, so adjacent ranges overlap by 50 %.
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    ranges = []
    for level in range(num_levels):
        hi = math.inf if level == num_levels - 1 else base * 2**level
        if level == 0:
            lo = -1.0
        else:
            previous_hi = base * 2 ** (level - 1)
            lo = previous_hi / 2 if overlapping else previous_hi
        ranges.append((lo, hi))
    return ranges


def foreground_targets(
        boxes: Sequence[torch.Tensor],
        spatial_shapes: torch.Tensor,
        strides: Sequence[int],
        ranges: Sequence[tuple[float, float]] | None = None,
) -> torch.Tensor:
    """Class-agnostic FCOS-like foreground labels of every token.

    Token ``(i, j)`` of a level with stride ``s`` sits at pixel ``(j*s + s//2, i*s + s//2)``. It is positive when it
    lies strictly inside a ground-truth box (absolute xyxy pixels) whose largest side distance
    ``max(l, t, r, b)`` falls in the level's range ``(lo, hi]``.

    Args:
        boxes: Per image, (M, 4) absolute xyxy boxes (M may be 0).
        spatial_shapes: (L, 2) rows (H, W), fine to coarse.
        strides: Stride of each level in input pixels (from the actual levels).
        ranges: Size range of each level; defaults to :func:`level_size_ranges` (contiguous, as released).

    Returns:
        (B, S) float tensor of 0/1 labels in flattened level order.
    """
    num_levels = spatial_shapes.shape[0]
    if len(strides) != num_levels:
        raise ValueError(f"need one stride per level: {num_levels} levels, {len(strides)} strides")
    ranges = level_size_ranges(num_levels) if ranges is None else ranges
    if len(ranges) != num_levels:
        raise ValueError(f"need one size range per level: {num_levels} levels, {len(ranges)} ranges")
    device = spatial_shapes.device
    labels = []
    for image_boxes in boxes:
        image_boxes = image_boxes.to(device=device, dtype=torch.float32).reshape(-1, 4)
        per_level = []
        for (h, w), stride, (lo, hi) in zip(spatial_shapes.tolist(), strides, ranges):
            stride = int(stride)
            ys = torch.arange(h, device=device, dtype=torch.float32) * stride + stride // 2
            xs = torch.arange(w, device=device, dtype=torch.float32) * stride + stride // 2
            y, x = torch.meshgrid(ys, xs, indexing="ij")
            x, y = x.reshape(-1, 1), y.reshape(-1, 1)
            sides = torch.stack(
                [x - image_boxes[:, 0], y - image_boxes[:, 1], image_boxes[:, 2] - x, image_boxes[:, 3] - y], -1
            )
            inside = sides.min(-1).values > 0
            largest = sides.max(-1).values
            positive = inside & (largest > lo) & (largest <= hi)
            per_level.append(positive.any(-1))
        labels.append(torch.cat(per_level))
    return torch.stack(labels).float()


def selector_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0):
    """Binary focal loss over all tokens, summed per image, divided by max(1, positives), averaged over images."""
    loss = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="none").sum(-1)
    return (loss / targets.sum(-1).clamp(min=1)).mean()


def foreground_token_counts(padding_mask: torch.Tensor, keep_ratio: float) -> torch.Tensor:
    """Foreground tokens kept per image: ``int(keep_ratio * valid_tokens) + 1``, capped at the token count."""
    valid = (~padding_mask).sum(-1)
    counts = (valid.float() * keep_ratio).int() + 1
    return counts.clamp(max=padding_mask.shape[1])


def cascade_token_indices(
        scores: torch.Tensor,
        padding_mask: torch.Tensor,
        keep_ratio: float,
        cascade: Sequence[float] = DEFAULT_CASCADE,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per-layer indices of the tokens each encoder layer updates, highest foreground score first.

    Args:
        scores: (B, S) foreground logits.
        padding_mask: (B, S) True at padding tokens; they get the global minimum score before ranking.
        keep_ratio: Fraction of valid tokens kept (``K_b = int(ratio * valid) + 1``).
        cascade: Fraction of ``K = max_b K_b`` used by each layer.

    Returns:
        (indices per cascade entry, each (B, k_i) with ``k_i = int(c_i * K)`` (at least 1); masked scores (B, S);
        per-image counts ``K_b`` (B,)).
    """
    masked = scores.masked_fill(padding_mask, scores.min())
    counts = foreground_token_counts(padding_mask, keep_ratio)
    kept = int(counts.max())
    # float32 product as released, so the per-layer sizes match it bit for bit.
    sizes = (torch.tensor(list(cascade), dtype=torch.float32) * kept).int().clamp(min=1).tolist()
    # One top-k per layer (not slices of one) so ties among padding tokens resolve as in the release.
    return [masked.topk(k, dim=1).indices for k in sizes], masked, counts
