"""DAT (Vision Transformer with Deformable Attention, CVPR 2022) and DAT++ (Spatially Dynamic Vision Transformer
with Deformable Attention) as timm models.

Official code: https://github.com/LeapLabTHU/DAT. The numerics follow the official implementation (see
``checkpoint_filter_fn`` for the key mapping); unlike the official code every model runs at any input size:
windows are padded, shifted-window masks are built for the runtime size and the deformable relative position
bias tables are addressed with normalised coordinates, so nothing is tied to the construction resolution.
"""
import math
import re
import warnings
from typing import Any, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ._checkpoint import check_state_dict, timm_adapted_keys, unwrap_state_dict
from ._layers import (
    GELU,
    Linear,
    SizeCache,
    caching_allowed,
    eager_cpu_inference,
    gelu_,
    in_batch_slices,
    linear,
)
from .hub import with_release_file
from .ops._extension import extension_status
from .ops.depthwise import ResidualDepthwiseConv2d
from .ops.neighborhood import neighborhood_attention_2d
from .ops.norm import LayerNorm2d

__all__ = ["DAT", "checkpoint_filter_fn"]


def _pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad an NCHW tensor at the bottom/right so that H and W are multiples of ``multiple``."""
    pad_h = (multiple - x.shape[2] % multiple) % multiple
    pad_w = (multiple - x.shape[3] % multiple) % multiple
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


def _eager_inference() -> bool:
    """Whether in-place fast paths may run: no gradient is recorded and the code runs eagerly (not traced,
    compiled or exported, where graphs are kept functional)."""
    return not torch.is_grad_enabled() and caching_allowed()


class WindowAttention(nn.Module):
    """Local window attention (``L``) or shifted window attention (``S``, shift ``ceil(ws/2)``), NCHW in and out.

    Eager float32 inference on the CPU runs the extension's kernel, which gathers each window from the projection
    of the whole map (no partition, roll or mask tensors); autograd, other devices and dtypes and traced or
    compiled graphs run the PyTorch formulation below.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, shifted: bool, attn_drop: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift = math.ceil(window_size / 2) if shifted else 0
        self.attn_drop = attn_drop
        self.proj_qkv = Linear(dim, 3 * dim)
        self.proj_out = Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        trunc_normal_(self.relative_position_bias_table, std=0.01)
        coords = torch.stack(torch.meshgrid(
            torch.arange(window_size, device="cpu"), torch.arange(window_size, device="cpu"), indexing="ij"))
        coords = coords.flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window_size - 1
        index = rel[..., 0] * (2 * window_size - 1) + rel[..., 1]
        self.register_buffer("relative_position_index", index, persistent=False)
        self._mask_cache = SizeCache(16)
        self._order_cache = SizeCache(16)

    def _shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """(nW, N, N) additive mask (0 / -100) for the padded runtime size, cached per size."""
        return self._mask_cache.get((height, width, str(device)), lambda: self._build_shift_mask(height, width, device))

    def _build_shift_mask(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        ws, s = self.window_size, self.shift
        labels = torch.zeros(height, width, device=device)
        slices = (slice(0, -ws), slice(-ws, -s), slice(-s, None))
        label = 0
        for rows in slices:
            for cols in slices:
                labels[rows, cols] = label
                label += 1
        labels = labels.reshape(height // ws, ws, width // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
        return (labels[:, :, None] != labels[:, None, :]).float() * -100.0

    def _token_order(self, height: int, width: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Flat token indices that cut the padded map, rolled by the shift, into windows, and the inverse that
        pastes the window tokens back (cropped to ``height x width``): one ``index_select`` each way instead of a
        roll (a copy per axis) and a partition copy. Cached per size."""
        return self._order_cache.get(
            (height, width, str(device)), lambda: self._build_token_order(height, width, device)
        )

    def _build_token_order(self, height: int, width: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        ws = self.window_size
        padded_h, padded_w = -(-height // ws) * ws, -(-width // ws) * ws
        grid = torch.arange(padded_h * padded_w, device=device).view(padded_h, padded_w)
        if self.shift:
            grid = torch.roll(grid, shifts=(-self.shift, -self.shift), dims=(0, 1))
        gather = grid.view(padded_h // ws, ws, padded_w // ws, ws).transpose(1, 2).reshape(-1)
        scatter = gather.argsort().view(padded_h, padded_w)[:height, :width].reshape(-1)
        return gather, scatter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        ws = self.window_size
        # windows are cut from and pasted back into NHWC, which is free for channels-last maps
        x = x.permute(0, 2, 3, 1)
        pad_h, pad_w = (ws - height % ws) % ws, (ws - width % ws) % ws
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = x.shape[1:3]
        bias = self.relative_position_bias_table[self.relative_position_index].permute(2, 0, 1)
        dropout = self.attn_drop if self.training else 0.0
        # (the kernel has no backward: the qkv projection's parameters must not need a gradient either)
        if dropout == 0.0 and eager_cpu_inference(x, bias, *self.proj_qkv.parameters()) and extension_status("cpu"):
            # the extension's kernel cuts the (shifted) windows out of the whole map's projection itself
            out = torch.ops.dat_smt_ext.window_attention_forward(
                self.proj_qkv(x), bias, ws, self.shift, self.num_heads, (channels // self.num_heads) ** -0.5)
            return self.proj_out(out[:, :height, :width]).permute(0, 3, 1, 2)
        gather, scatter = self._token_order(height, width, x.device)
        windows = x.reshape(batch, padded_h * padded_w, channels).index_select(1, gather).view(-1, ws * ws, channels)
        qkv = self.proj_qkv(windows).reshape(windows.shape[0], ws * ws, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.shift:
            mask = self._shift_mask(padded_h, padded_w, x.device)
            bias = (bias[None] + mask[:, None]).repeat(batch, 1, 1, 1)
        else:
            bias = bias[None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        out = self.proj_out(out.transpose(1, 2).reshape(batch, -1, channels))
        return out.index_select(1, scatter).view(batch, height, width, channels).permute(0, 3, 1, 2)


class NeighborhoodAttention(nn.Module):
    """Neighborhood attention with relative position bias (natten 0.14 semantics), NCHW in and out."""

    def __init__(self, dim: int, num_heads: int, kernel_size: int = 7):
        super().__init__()
        self.num_heads = num_heads
        self.kernel_size = kernel_size
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = Linear(dim, 3 * dim)
        self.rpb = nn.Parameter(torch.zeros(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1))
        trunc_normal_(self.rpb, std=0.02)
        self.proj = Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        batch, height, width, channels = x.shape
        pad_h, pad_w = max(0, self.kernel_size - height), max(0, self.kernel_size - width)
        if pad_h or pad_w:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        padded_h, padded_w = x.shape[1:3]
        qkv = self.qkv(x).reshape(batch, padded_h, padded_w, 3, self.num_heads, -1).permute(3, 0, 4, 1, 2, 5)
        q, k, v = qkv.unbind(0)
        out = neighborhood_attention_2d(q, k, v, self.rpb, self.kernel_size, scale=self.scale)
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, padded_h, padded_w, channels)
        out = self.proj(out[:, :height, :width])
        return out.permute(0, 3, 1, 2)


class DeformableAttention(nn.Module):
    """Deformable attention (``D``) of DAT (``plus=False``) or DAT++ (``plus=True``), NCHW in and out.

    Keys and values are bilinearly sampled from the input at offset reference points; the relative position bias
    is read from ``rpe_table`` with normalised coordinates, which makes it valid at every input size.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            num_groups: int,
            q_size: Tuple[int, int],
            kernel_size: int,
            stride: int,
            offset_range_factor: float,
            plus: bool,
            attn_drop: float = 0.0,
    ):
        super().__init__()
        if num_heads % num_groups:
            raise ValueError(f"heads ({num_heads}) must be divisible by offset groups ({num_groups})")
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.stride = stride
        self.offset_range_factor = offset_range_factor
        self.plus = plus
        self.attn_drop = attn_drop
        group_channels = dim // num_groups
        padding = 0 if kernel_size == stride else kernel_size // 2
        self.conv_offset = nn.Sequential(
            nn.Conv2d(group_channels, group_channels, kernel_size, stride, padding, groups=group_channels),
            LayerNorm2d(group_channels, eps=1e-5),
            GELU(inplace=True),
            nn.Conv2d(group_channels, 2, 1, bias=False),
        )
        self.proj_q = nn.Conv2d(dim, dim, 1)
        self.proj_k = nn.Conv2d(dim, dim, 1)
        self.proj_v = nn.Conv2d(dim, dim, 1)
        self.proj_out = nn.Conv2d(dim, dim, 1)
        self.rpe_table = nn.Parameter(torch.zeros(num_heads, 2 * q_size[0] - 1, 2 * q_size[1] - 1))
        trunc_normal_(self.rpe_table, std=0.01)
        self._grid_cache = SizeCache(16)

    def _grids(self, height: int, width: int, key_h: int, key_w: int, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        """Reference points (Hk, Wk, 2) and half the query positions (H*W, 2), normalised, in grid_sample's
        (x, y) order.

        DAT++ divides by (Hk - 1) and places queries on the pixel grid; DAT divides by Hk and places queries at
        pixel centres. Cached per size (they depend on sizes only) outside tracing and compilation.
        """
        return self._grid_cache.get(
            (height, width, key_h, key_w, x.dtype, str(x.device)),
            lambda: self._build_grids(height, width, key_h, key_w, x),
        )

    def _build_grids(self, height: int, width: int, key_h: int, key_w: int,
                     x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        def axis(length: int, centres: bool) -> torch.Tensor:
            positions = torch.arange(length, device=x.device, dtype=x.dtype)
            if centres:
                return (positions + 0.5) / (length - 1 if self.plus else length) * 2 - 1
            return positions / (length - 1) * 2 - 1

        def grid(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            return torch.stack(torch.meshgrid(cols, rows, indexing="xy"), -1)

        reference = grid(axis(key_h, True), axis(key_w, True))
        queries = grid(axis(height, not self.plus), axis(width, not self.plus)).reshape(-1, 2) * 0.5
        return reference, queries

    @staticmethod
    def _split_groups(x: torch.Tensor, groups: int) -> torch.Tensor:
        """(B, H, W, C) to (B * groups, C / groups, H, W) in one copy, channels-last like the other maps (so that
        the offset convolution does not reorder it again)."""
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height, width, groups, channels // groups).permute(0, 3, 1, 2, 4)
        return x.reshape(batch * groups, height, width, channels // groups).permute(0, 3, 1, 2)

    @staticmethod
    def _pointwise(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        """A 1x1 conv applied to the last (channel) dimension of a channels-last tensor."""
        return linear(x, conv.weight.flatten(1), conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        groups, heads = self.num_groups, self.num_heads
        group_channels = channels // groups
        head_dim = channels // heads
        # projections run on NHWC (free for the channels-last maps between blocks) so that the heads split off the
        # channels keep a unit stride, which SDPA needs for its fused kernel
        q = self._pointwise(x.permute(0, 2, 3, 1), self.proj_q)
        offset = self.conv_offset(self._split_groups(q, groups))
        key_h, key_w = offset.shape[2:]
        if self.plus and (key_h < 2 or key_w < 2 or height < 2 or width < 2):
            raise ValueError(
                f"DAT++ deformable attention needs maps of at least 2x2 (got {height}x{width},"
                f" sampled {key_h}x{key_w});"
                " the input image is too small"
            )
        # positions are kept in grid_sample's (x, y) order: the offset conv emits (y, x)
        offset = offset.permute(0, 2, 3, 1).flip(-1)
        if self.offset_range_factor > 0:
            denom_h, denom_w = (key_h - 1, key_w - 1) if self.plus else (key_h, key_w)
            scale = torch.tensor([1.0 / denom_w, 1.0 / denom_h], device=x.device, dtype=x.dtype)
            offset = offset.tanh() * scale * self.offset_range_factor
        reference, queries = self._grids(height, width, key_h, key_w, x)
        if self.offset_range_factor >= 0:
            pos = offset + reference
        elif self.plus:
            pos = (offset + reference).clamp(-1.0, 1.0)
        else:
            pos = (offset + reference).tanh()
        sampled = F.grid_sample(
            self._split_groups(x.permute(0, 2, 3, 1), groups), pos, mode="bilinear", align_corners=True,
        )
        sampled = sampled.reshape(batch, groups, group_channels, -1).permute(0, 3, 1, 2).reshape(-1, channels)
        q = q.reshape(batch, height * width, heads, head_dim).transpose(1, 2)
        # keys and values in one GEMM over one contiguous copy of the samples (the permuted view would be copied
        # once per projection and get its bias added in a separate pass)
        kv = linear(
            sampled.contiguous(),
            torch.cat([self.proj_k.weight.flatten(1), self.proj_v.weight.flatten(1)]),
            torch.cat([self.proj_k.bias, self.proj_v.bias]),
        )
        k, v = kv.reshape(batch, -1, 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)

        # the bias is read at half the query-to-key displacement: the table spans twice the map
        # (queries repeated per key first: broadcasting them over (x, y) pairs would make the subtraction's inner
        # loop two elements long, four times slower)
        queries = queries[:, None].expand(-1, key_h * key_w, 2).contiguous()
        displacement = torch.sub(queries, pos.reshape(batch * groups, 1, -1, 2), alpha=0.5)
        table = self.rpe_table[None].expand(batch, -1, -1, -1)
        table = table.reshape(batch * groups, heads // groups, *self.rpe_table.shape[1:])
        bias = F.grid_sample(table, displacement, mode="bilinear", align_corners=True)
        bias = bias.reshape(batch, heads, height * width, key_h * key_w)
        dropout = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout)
        out = self._pointwise(out.transpose(1, 2).reshape(batch, height, width, channels), self.proj_out)
        return out.permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    """DAT++ MLP: 1x1 conv, depthwise 3x3 conv with a residual, GELU, 1x1 conv (NCHW)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden_dim, 1)
        self.dwconv = ResidualDepthwiseConv2d(hidden_dim, gelu=True)
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_batch_slices(self._forward, x, self.fc1.out_channels / self.fc1.in_channels)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.dwconv(self.fc1(x)))))


class TokenMlp(nn.Module):
    """DAT v1 MLP applied to the channels of an NCHW map."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.mlp = Mlp(dim, hidden_dim, drop=drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return in_batch_slices(self._forward, x, self.mlp.fc1.out_features / self.mlp.fc1.in_features)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.mlp
        x = gelu_(linear(x.permute(0, 2, 3, 1), mlp.fc1.weight, mlp.fc1.bias))
        x = linear(mlp.norm(mlp.drop1(x)), mlp.fc2.weight, mlp.fc2.bias)
        return mlp.drop2(x).permute(0, 3, 1, 2)


class DatBlock(nn.Module):
    """Pre-norm block: optional local perception unit, attention, MLP (one DropPath shared by both residuals)."""

    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module, use_lpu: bool, drop_path: float):
        super().__init__()
        self.lpu = ResidualDepthwiseConv2d(dim) if use_lpu else None
        self.norm1 = LayerNorm2d(dim, eps=1e-5)
        self.attn = attn
        self.norm2 = LayerNorm2d(dim, eps=1e-5)
        self.mlp = mlp
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lpu is not None:
            x = self.lpu(x)
        if not self.training and _eager_inference():
            # the branch outputs are fresh: add the residual into them rather than allocating the sums
            x = self.attn(self.norm1(x)).add_(x)
            return self.mlp(self.norm2(x)).add_(x)
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class DatStage(nn.Module):
    """Optional downsampling (conv + LN) followed by the blocks of one stage."""

    def __init__(self, downsample: nn.Module | None, blocks: List[nn.Module]):
        super().__init__()
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


def _per_stage(value: Any, count: int = 4) -> List[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


class DAT(nn.Module):
    """DAT / DAT++ backbone and classifier; constructor arguments follow the official ``DAT`` class."""

    def __init__(
            self,
            img_size: int = 224,
            patch_size: int = 4,
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = "avg",
            expansion: int = 4,
            dim_stem: int = 96,
            dims: Sequence[int] = (96, 192, 384, 768),
            depths: Sequence[int] = (2, 2, 6, 2),
            stage_spec: Sequence[Sequence[str]] = (("L", "S"), ("L", "S"), ("L", "D") * 3, ("L", "D")),
            heads: Sequence[int] = (3, 6, 12, 24),
            window_sizes: Sequence[int] = (7, 7, 7, 7),
            groups: Sequence[int] = (-1, -1, 3, 6),
            strides: Sequence[int] = (-1, -1, 1, 1),
            offset_range_factor: Sequence[float] = (-1, -1, 2, 2),
            use_dwc_mlps: Sequence[bool] = (False,) * 4,
            use_lpus: Sequence[bool] = (False,) * 4,
            use_conv_patches: bool = False,
            ksizes: Sequence[int] | None = None,
            nat_ksizes: Sequence[int] = (7,) * 4,
            drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
            **unused_official: Any,
    ):
        super().__init__()
        self._check_official_options(unused_official)
        if patch_size != 4:
            raise ValueError(f"only patch_size=4 is supported, got {patch_size}")
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        self.plus = ksizes is not None
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[-1]
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        ksizes = list(ksizes) if self.plus else [9, 7, 5, 3]
        strides = [s if s > 0 else 1 for s in strides]

        if use_conv_patches:
            self.stem = nn.Sequential(
                nn.Conv2d(in_chans, dim_stem // 2, 3, 2, 1), LayerNorm2d(dim_stem // 2, eps=1e-5), GELU(inplace=True),
                nn.Conv2d(dim_stem // 2, dim_stem, 3, 2, 1), LayerNorm2d(dim_stem, eps=1e-5),
            )
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, dim_stem, 4, 4), LayerNorm2d(dim_stem, eps=1e-5))
        down_kernel = 3 if use_conv_patches else 2

        total = sum(depths)
        rates = [drop_path_rate * j / max(total - 1, 1) for j in range(total)]
        dpr = [rates[sum(depths[:i]):sum(depths[:i + 1])] for i in range(4)]
        self.feature_info = []
        stages = []
        for i in range(4):
            fmap = img_size // 4 // 2 ** i
            blocks = []
            for d in range(depths[i]):
                kind = stage_spec[i][d]
                if kind in ("L", "S"):
                    attn = WindowAttention(dims[i], heads[i], window_sizes[i], kind == "S", attn_drop_rate)
                elif kind == "N":
                    attn = NeighborhoodAttention(dims[i], heads[i], nat_ksizes[i])
                elif kind == "D":
                    attn = DeformableAttention(
                        dims[i], heads[i], groups[i], (fmap, fmap), ksizes[i], strides[i], offset_range_factor[i],
                        self.plus, attn_drop_rate,
                    )
                else:
                    raise ValueError(f"unsupported block kind {kind!r} (expected one of L, S, N, D)")
                mlp_cls = ConvMlp if use_dwc_mlps[i] else TokenMlp
                blocks.append(DatBlock(dims[i], attn, mlp_cls(dims[i], dims[i] * expansion, drop_rate),
                                       use_lpus[i], dpr[i][d]))
            downsample = None
            if i > 0:
                downsample = nn.Sequential(
                    nn.Conv2d(dims[i - 1], dims[i], down_kernel, 2, (down_kernel - 1) // 2, bias=False),
                    LayerNorm2d(dims[i], eps=1e-5),
                )
            stages.append(DatStage(downsample, blocks))
            self.feature_info.append(dict(num_chs=dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = LayerNorm2d(dims[-1], eps=1e-5)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[-1], num_classes) if num_classes > 0 else nn.Identity()

    @staticmethod
    def _check_official_options(options: Dict[str, Any]) -> None:
        """Accept the official constructor's switches only at the values every released model uses."""
        defaults = dict(dwc_pes=False, no_offs=False, fixed_pes=False, use_pes=None, sr_ratios=None,
                        layer_scale_values=-1, log_cpb=False)
        for name, value in options.items():
            if name not in defaults:
                raise TypeError(f"DAT got an unexpected argument {name!r}")
            if defaults[name] is None:
                continue
            if any(v != defaults[name] for v in _per_stage(value)):
                raise ValueError(
                    f"{name}={value!r} is not supported (only {defaults[name]!r}, as in every released model)")

    @property
    def _min_stride(self) -> int:
        return 4 if self.plus else 32

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        tables = ("relative_position_bias_table", "rpe_table", "rpb")
        return {n for n, _ in self.named_parameters() if n.endswith(tables)}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if x.shape[2] < 32 or x.shape[3] < 32:
            raise ValueError(f"input images must be at least 32x32, got {x.shape[2]}x{x.shape[3]}")
        if not self.plus:
            x = _pad_to_multiple(x, 32)
        # the whole network runs on channels-last maps; a channels-last image makes the stem conv write one too,
        # which the LayerNorm after it reads without a copy (same values, 1.2-1.8x faster stem on CPU)
        return x.contiguous(memory_format=torch.channels_last)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Union[int, List[int]] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs (strides 4/8/16/32, cropped to ``ceil(input / stride)``) and optionally the final features."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        height, width = x.shape[2:]
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(self._prepare_input(x))
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[:max_index + 1]
        intermediates = []
        last = len(self.stages) - 1
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feat = self.norm(x) if norm and i == last else x
                stride = 4 * 2 ** i
                intermediates.append(feat[:, :, :-(-height // stride), :-(-width // stride)])
        if intermediates_only:
            return intermediates
        if len(stages) == len(self.stages):
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drop the stages (and optionally norm / head) that ``forward_intermediates`` no longer needs."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self._prepare_input(x))
        x = self.stages(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _resize_table(table: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
    """Bicubically resize a position-bias table, as the official ``load_pretrained`` does."""
    if table.shape == shape:
        return table
    if table.dim() == 3:  # rpe_table / rpb (heads, 2H-1, 2W-1)
        return F.interpolate(table[None], size=shape[1:], mode="bicubic", align_corners=False)[0]
    # relative_position_bias_table ((2ws-1)^2, heads)
    old, new = int(math.isqrt(table.shape[0])), int(math.isqrt(shape[0]))
    grid = table.t().reshape(1, -1, old, old)
    return F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)[0].reshape(-1, new * new).t()


_OFFICIAL_BUFFERS = ("relative_position_index", "attn_mask")


def _keep_own_classifier(state_dict: Dict[str, torch.Tensor], target: Dict[str, torch.Tensor]) -> None:
    """A dense-prediction backbone file has no final norm or classifier: keep the model's own (features only)."""
    own = [k for k in target if k.startswith(("norm.", "head.")) and k not in state_dict]
    if own:
        warnings.warn(
            "the checkpoint is a dense-prediction DAT backbone without the classifier's final norm and head; "
            f"{', '.join(own)} keep their initial values (use the model for features, e.g. features_only=True)",
            stacklevel=3,
        )
        state_dict.update({k: target[k] for k in own})


def checkpoint_filter_fn(state_dict: Dict[str, Any], model: DAT) -> Dict[str, torch.Tensor]:
    """Convert an official DAT / DAT++ checkpoint (classification or dense-prediction backbone) to this model.

    Accepts the whole official file (``model`` / ``state_dict`` entries, optimizer state and configs are ignored),
    strips a ``backbone.`` prefix, drops recomputed buffers and the dense variants' extra output norms (such a file
    has no final norm or head: the model keeps its own, with a warning, so that ``features_only`` loads it), resizes
    position-bias tables of another resolution and finally checks that every parameter is filled exactly (except
    the classifier and first convolution when timm adapts them to another class or input channel count).
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(k.startswith("backbone.") for k in state_dict):
        state_dict = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    dense_backbone = any(k.startswith("norms.") for k in state_dict) and "cls_head.weight" not in state_dict
    if "stem.0.weight" in state_dict:  # already in our format
        check_state_dict(state_dict, model, "DAT checkpoint", adapted=timm_adapted_keys(model))
        return state_dict
    target = model.state_dict()
    out = {}
    for key, value in state_dict.items():
        if key.endswith(_OFFICIAL_BUFFERS) or key.startswith("norms."):
            continue
        key = key.replace(".norm.weight", ".weight").replace(".norm.bias", ".bias")
        key = re.sub(r"^patch_proj\.", "stem.", key)
        key = re.sub(r"^down_projs\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample.", key)
        key = re.sub(r"^cls_norm\.", "norm.", key)
        key = re.sub(r"^cls_head\.", "head.", key)
        key = re.sub(r"^stages\.(\d+)\.layer_norms\.(\d+)\.",
                     lambda m: f"stages.{m.group(1)}.blocks.{int(m.group(2)) // 2}.norm{int(m.group(2)) % 2 + 1}.", key)
        key = re.sub(r"^stages\.(\d+)\.attns\.(\d+)\.", r"stages.\1.blocks.\2.attn.", key)
        key = re.sub(r"^stages\.(\d+)\.local_perception_units\.(\d+)\.", r"stages.\1.blocks.\2.lpu.", key)
        key = re.sub(r"^stages\.(\d+)\.mlps\.(\d+)\.chunk\.linear(\d)\.", r"stages.\1.blocks.\2.mlp.mlp.fc\3.", key)
        key = re.sub(r"^stages\.(\d+)\.mlps\.(\d+)\.linear(\d)\.0\.", r"stages.\1.blocks.\2.mlp.fc\3.", key)
        key = re.sub(r"^stages\.(\d+)\.mlps\.(\d+)\.dwc\.", r"stages.\1.blocks.\2.mlp.dwconv.", key)
        if key.endswith(("relative_position_bias_table", "rpe_table", "rpb")) and key in target:
            value = _resize_table(value, tuple(target[key].shape))
        out[key] = value
    if "head.weight" not in target:  # classifier reset or removed: the official head is not needed
        out = {k: v for k, v in out.items() if not k.startswith("head.")}
    if dense_backbone:
        _keep_own_classifier(out, target)
    check_state_dict(out, model, "DAT checkpoint", adapted=timm_adapted_keys(model))
    return out


def _create_dat(variant: str, pretrained: bool = False, **kwargs: Any) -> DAT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    kwargs = with_release_file(variant, pretrained, kwargs)
    return build_model_with_cfg(
        DAT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(url: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": url,
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": "head",
        "license": "apache-2.0", "origin_url": "https://github.com/LeapLabTHU/DAT",
        **kwargs,
    }


def _drive(file_id: str) -> str:
    return f"https://drive.google.com/uc?export=download&id={file_id}"


def _tsinghua(file_id: str) -> str:
    return f"https://cloud.tsinghua.edu.cn/f/{file_id}/?dl=1"


_V1 = dict(paper_ids="arXiv:2201.00520", paper_name="Vision Transformer with Deformable Attention")
_PP = dict(paper_ids="arXiv:2309.01430",
           paper_name="DAT++: Spatially Dynamic Vision Transformer with Deformable Attention")

default_cfgs = generate_default_cfgs({
    "dat_tiny.in1k": _cfg(_tsinghua("1367349deefc48efa650"), **_V1),
    "dat_small.in1k": _cfg(_tsinghua("f04b18081e3e4606adb7"), **_V1),
    "dat_base.in1k": _cfg(_tsinghua("a8d2a9645d454120b635"), **_V1),
    "dat_base_384.in1k": _cfg(_tsinghua("cf6a6b543cd64e0d8e43"), input_size=(3, 384, 384), pool_size=(12, 12),
                              crop_pct=0.875, **_V1),
    "dat_pp_tiny.in1k": _cfg(_tsinghua("14c5ddae10b642e68089"), first_conv="stem.0", **_PP),
    "dat_pp_small.in1k": _cfg(_tsinghua("4c2a76360c964fbd81d5"), **_PP),
    "dat_pp_base.in1k": _cfg(_tsinghua("8e30492404d348d89f25"), **_PP),
    "dat_pp_base_384.in1k": _cfg(_tsinghua("032dc804cdf44bf18bb5"), input_size=(3, 384, 384), pool_size=(12, 12),
                                 crop_pct=1.0, **_PP),
})

_V1_SPEC = (("L", "S"), ("L", "S"), ("L", "D") * 9, ("L", "D"))
_PP_SPEC = (("N", "D"), ("N", "D") * 2, ("N", "D") * 9, ("D", "D"))


def _v1_args(dim: int, depth3: int, heads: Tuple[int, ...], groups: Tuple[int, ...], window: int = 7,
             img_size: int = 224) -> Dict[str, Any]:
    spec = list(_V1_SPEC)
    spec[2] = ("L", "D") * (depth3 // 2)
    return dict(img_size=img_size, dim_stem=dim, dims=(dim, 2 * dim, 4 * dim, 8 * dim), depths=(2, 2, depth3, 2),
                stage_spec=tuple(spec), heads=heads, window_sizes=(window,) * 4, groups=(-1, -1) + groups,
                strides=(-1, -1, 1, 1), offset_range_factor=(-1, -1, 2, 2))


def _pp_args(dim: int, heads: Tuple[int, ...], groups: Tuple[int, ...]) -> Dict[str, Any]:
    return dict(img_size=224, dim_stem=dim, dims=(dim, 2 * dim, 4 * dim, 8 * dim), depths=(2, 4, 18, 2),
                stage_spec=_PP_SPEC, heads=heads, groups=groups, strides=(8, 4, 2, 1),
                offset_range_factor=(-1,) * 4, use_dwc_mlps=(True,) * 4, use_lpus=(True,) * 4,
                use_conv_patches=True, ksizes=(9, 7, 5, 3), nat_ksizes=(7,) * 4)


@register_model
def dat_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    args = _v1_args(96, 6, (3, 6, 12, 24), (3, 6))
    return _create_dat("dat_tiny", pretrained, **{**args, "drop_path_rate": 0.2, **kwargs})


@register_model
def dat_small(pretrained: bool = False, **kwargs: Any) -> DAT:
    args = _v1_args(96, 18, (3, 6, 12, 24), (3, 6))
    return _create_dat("dat_small", pretrained, **{**args, "drop_path_rate": 0.3, **kwargs})


@register_model
def dat_base(pretrained: bool = False, **kwargs: Any) -> DAT:
    args = _v1_args(128, 18, (4, 8, 16, 32), (4, 8))
    return _create_dat("dat_base", pretrained, **{**args, "drop_path_rate": 0.5, **kwargs})


@register_model
def dat_base_384(pretrained: bool = False, **kwargs: Any) -> DAT:
    args = _v1_args(128, 18, (4, 8, 16, 32), (4, 8), window=12, img_size=384)
    return _create_dat("dat_base_384", pretrained, **{**args, "drop_path_rate": 0.5, **kwargs})


@register_model
def dat_pp_tiny(pretrained: bool = False, **kwargs: Any) -> DAT:
    args = _pp_args(64, (2, 4, 8, 16), (1, 2, 4, 8))
    return _create_dat("dat_pp_tiny", pretrained, **{**args, "drop_path_rate": 0.2, **kwargs})


@register_model
def dat_pp_small(pretrained: bool = False, **kwargs: Any) -> DAT:
    args = _pp_args(96, (3, 6, 12, 24), (1, 2, 3, 6))
    return _create_dat("dat_pp_small", pretrained, **{**args, "drop_path_rate": 0.4, **kwargs})


@register_model
def dat_pp_base(pretrained: bool = False, **kwargs: Any) -> DAT:
    args = _pp_args(128, (4, 8, 16, 32), (2, 4, 8, 16))
    return _create_dat("dat_pp_base", pretrained, **{**args, "drop_path_rate": 0.7, **kwargs})


@register_model
def dat_pp_base_384(pretrained: bool = False, **kwargs: Any) -> DAT:
    # the official 384 model is built with img_size 224 (same table shapes as dat_pp_base) and run at 384
    args = _pp_args(128, (4, 8, 16, 32), (2, 4, 8, 16))
    return _create_dat("dat_pp_base_384", pretrained, **{**args, "drop_path_rate": 0.6, **kwargs})
