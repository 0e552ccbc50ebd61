"""SMT: Scale-Aware Modulation Meet Transformer (ICCV 2023), as timm models.

Paper: https://arxiv.org/abs/2307.08579
Official code: https://github.com/AFeng-x/SMT

Parameter and buffer names follow the official classification checkpoints (``patch_embed{i}``, ``block{i}.{j}``,
``norm{i}``, ``head``) so official files load through :func:`checkpoint_filter_fn` with renames only for the
detection / segmentation spelling.
"""
from functools import partial
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_, use_fused_attn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices

from ._checkpoint import check_state_dict, timm_adapted_keys, unwrap_state_dict
from ._layers import Linear, fold_batchnorm, gelu_, grad_free, in_batch_slices, linear
from .hub import with_release_file
from .ops.depthwise import ResidualDepthwiseConv2d
from .ops.norm import LayerNorm

__all__ = ["SMT", "checkpoint_filter_fn"]

_BLOCK_NORM = partial(LayerNorm, eps=1e-6)
_MIN_INPUT_SIZE = 4


def _tokens_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)


def _folds(bn: nn.BatchNorm2d) -> bool:
    """Whether ``bn`` normalises with its running statistics, so that it can be folded into the conv before it."""
    return not bn.training and bn.running_mean is not None


class ConvMlp(nn.Module):
    """MLP with a depthwise 3x3 conv added to the hidden tokens before the activation."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = Linear(dim, hidden_dim)
        self.dwconv = DepthwiseConv(hidden_dim, gelu=True)
        self.drop = nn.Dropout(drop)
        self.fc2 = Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return in_batch_slices(self._forward, x, self.fc1.out_features / self.fc1.in_features, height, width)

    def _forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self.fc1(x)
        x = self.dwconv(x, height, width)
        x = self.drop(x)
        return self.drop(self.fc2(x))


class DepthwiseConv(nn.Module):
    """Tokens (B, N, C) plus a depthwise 3x3 conv over them laid out as an H x W map, then GELU with ``gelu``."""

    def __init__(self, dim: int, gelu: bool = False):
        super().__init__()
        self.dwconv = ResidualDepthwiseConv2d(dim, gelu=gelu)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.dwconv(_tokens_to_map(x, height, width)).flatten(2).transpose(1, 2)


class ScaleAwareModulation(nn.Module):
    """SAM: multi-head mixed convolution (kernel 3 + 2i for head i), scale-aware aggregation, modulation of v.

    The head outputs are interleaved channel-wise (channel ``c * num_heads + i`` is channel ``c`` of head ``i``) so
    that the grouped 1x1 ``proj0`` mixes the scales of one channel within each group.
    """

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True, proj_drop: float = 0.0,
                 expand_ratio: int = 2):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by the number of SAM heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.v = Linear(dim, dim, bias=qkv_bias)
        self.s = Linear(dim, dim, bias=qkv_bias)
        for i in range(num_heads):
            kernel = 3 + 2 * i
            setattr(self, f"local_conv_{i + 1}", nn.Conv2d(head_dim, head_dim, kernel, 1, kernel // 2, groups=head_dim))
        self.proj0 = nn.Conv2d(dim, dim * expand_ratio, 1, groups=head_dim)
        self.bn = nn.BatchNorm2d(dim * expand_ratio)
        self.proj1 = nn.Conv2d(dim * expand_ratio, dim, 1)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _mixed_scale_conv(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``s`` projection and the per-head convs as one projection and one depthwise conv, interleaved.

        The rows of ``s`` are permuted into the interleaved channel order and every head's kernel is zero-padded
        to the largest size, so a single depthwise conv produces the interleaved MHMC output directly (no
        per-head slices, copies or stacking); the zero taps add exact zeros.
        """
        heads = self.num_heads
        head_dim = self.s.out_features // heads
        largest = 1 + 2 * heads
        kernels, biases = [], []
        for i in range(heads):
            conv = getattr(self, f"local_conv_{i + 1}")
            pad = heads - 1 - i
            kernels.append(F.pad(conv.weight, (pad, pad, pad, pad)))
            biases.append(conv.bias)
        weight = torch.stack(kernels, 1).reshape(heads * head_dim, 1, largest, largest)
        bias = torch.stack(biases, 1).reshape(-1)
        s_weight = self.s.weight.reshape(heads, head_dim, -1).transpose(0, 1).reshape(self.s.weight.shape)
        s_bias = None if self.s.bias is None else self.s.bias.reshape(heads, head_dim).t().reshape(-1)
        return s_weight, s_bias, weight, bias

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        s_weight, s_bias, conv_weight, conv_bias = self._mixed_scale_conv()
        # one name for the successive maps, so that each is freed as soon as the next exists
        s = _tokens_to_map(linear(x, s_weight, s_bias), height, width)
        s = F.conv2d(s, conv_weight, conv_bias, padding=self.num_heads, groups=conv_weight.shape[0])
        if _folds(self.bn):
            weight, bias = fold_batchnorm(self.proj0.weight, self.proj0.bias, self.bn)
            s = F.conv2d(s, weight, bias, groups=self.proj0.groups)
        else:
            s = self.bn(self.proj0(s))
        modulator = self.proj1(gelu_(s)).flatten(2).transpose(1, 2)
        del s
        # v only now, so that it is not held while the wider maps are alive
        v = self.v(x)
        x = modulator.mul_(v) if grad_free(modulator, v) else modulator * v
        return self.proj_drop(self.proj(x))


class SelfAttention(nn.Module):
    """Global multi-head self-attention plus a depthwise 3x3 conv on v (``local_conv``)."""

    fused_attn: torch.jit.Final[bool]

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by the number of attention heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.fused_attn = use_fused_attn()
        self.q = Linear(dim, dim, bias=qkv_bias)
        self.kv = Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.local_conv = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, num_tokens, dim = x.shape
        q = self.q(x).reshape(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        # k and v as two products so that v comes out dense for the depthwise conv (a slice of kv would be copied)
        k_weight, v_weight = self.kv.weight.chunk(2)
        k_bias, v_bias = (None, None) if self.kv.bias is None else self.kv.bias.chunk(2)
        v_tokens = linear(x, v_weight, v_bias)
        k = linear(x, k_weight, k_bias).reshape(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        v = v_tokens.reshape(batch, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = self.attn_drop(attn.softmax(dim=-1)) @ v
        out = out.transpose(1, 2).reshape(batch, num_tokens, dim)
        # summed into the conv output, whose backward does not need it (SDPA's does need its own output)
        out = self.local_conv(_tokens_to_map(v_tokens, height, width)).flatten(2).transpose(1, 2).add_(out)
        return self.proj_drop(self.proj(out))


class Block(nn.Module):
    """Pre-norm block: SAM or MSA token mixer, then the conv MLP, with optional layer scale."""

    def __init__(self, dim: int, sam: bool, ca_num_heads: int, sa_num_heads: int, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0,
                 use_layerscale: bool = False, layerscale_value: float = 1e-4, expand_ratio: int = 2):
        super().__init__()
        self.norm1 = _BLOCK_NORM(dim)
        if sam:
            self.attn = ScaleAwareModulation(dim, ca_num_heads, qkv_bias, drop, expand_ratio)
        else:
            self.attn = SelfAttention(dim, sa_num_heads, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _BLOCK_NORM(dim)
        self.mlp = ConvMlp(dim, int(dim * mlp_ratio), drop)
        self.use_layerscale = use_layerscale
        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        x = self._residual(x, self.attn(self.norm1(x), height, width), self.gamma_1 if self.use_layerscale else None)
        return self._residual(x, self.mlp(self.norm2(x), height, width), self.gamma_2 if self.use_layerscale else None)

    def _residual(self, x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        """``x + drop_path(gamma * branch)``, accumulated into the branch output (a fresh tensor of this block whose
        producer's backward does not need it), never into ``x``."""
        branch = self.drop_path(branch)
        return branch.add_(x) if gamma is None else torch.addcmul(x, gamma, branch)


class StemHead(nn.Module):
    """Stride-4 stem: conv (3x3 or 7x7, stride 2) + BN + ReLU + 2x2 stride-2 conv, then LayerNorm (eps 1e-5)."""

    def __init__(self, in_chans: int, dim: int, kernel_size: int = 3):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_chans, dim, kernel_size, 2, kernel_size // 2, bias=False),
            nn.BatchNorm2d(dim),
            nn.ReLU(inplace=True),
            nn.Conv2d(dim, dim, 2, 2),
        )
        self.norm = LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        # channels-last convs run about twice as fast here, and their output is already the token layout
        x = x.contiguous(memory_format=torch.channels_last)
        conv, bn, act, down = self.conv
        if _folds(bn):
            weight, bias = fold_batchnorm(conv.weight, conv.bias, bn)
            x = act(F.conv2d(x, weight, bias, conv.stride, conv.padding))
            x = down(x)
        else:
            x = self.conv(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class OverlapPatchEmbed(nn.Module):
    """3x3 stride-2 conv downsampling, then LayerNorm (eps 1e-5)."""

    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, 3, 2, 1)
        self.norm = LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        height, width = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), height, width


class SMT(nn.Module):
    """SMT backbone and classifier with timm's hierarchical-model interface (NCHW between stages)."""

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            ca_num_heads: Sequence[int] = (4, 4, 4, -1),
            sa_num_heads: Sequence[int] = (-1, -1, 8, 16),
            mlp_ratios: Sequence[float] = (4, 4, 4, 2),
            qkv_bias: bool = True,
            use_layerscale: bool = False,
            layerscale_value: float = 1e-4,
            depths: Sequence[int] = (2, 2, 8, 1),
            ca_attentions: Sequence[int] = (1, 1, 1, 0),
            head_conv: int = 3,
            expand_ratio: int = 2,
            drop_rate: float = 0.0,
            proj_drop_rate: float = 0.0,
            attn_drop_rate: float = 0.0,
            drop_path_rate: float = 0.0,
    ):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        if head_conv not in (3, 7):
            raise ValueError(f"head_conv must be 3 or 7, got {head_conv}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_stages = len(depths)
        self.embed_dims = list(embed_dims)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.grad_checkpointing = False
        self.feature_info = []

        total_depth = sum(depths)
        dpr = [drop_path_rate * i / max(total_depth - 1, 1) for i in range(total_depth)]
        cursor = 0
        for i in range(self.num_stages):
            if i == 0:
                embed = StemHead(in_chans, embed_dims[0], head_conv)
            else:
                embed = OverlapPatchEmbed(embed_dims[i - 1], embed_dims[i])
            # evolutionary hybrid stacking: stage 3 alternates SAM (even j) and MSA (odd j)
            blocks = nn.ModuleList([
                Block(
                    embed_dims[i], sam=bool(0 if (i == 2 and j % 2) else ca_attentions[i]),
                    ca_num_heads=ca_num_heads[i], sa_num_heads=sa_num_heads[i], mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias, drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[cursor + j],
                    use_layerscale=use_layerscale, layerscale_value=layerscale_value, expand_ratio=expand_ratio,
                )
                for j in range(depths[i])
            ])
            cursor += depths[i]
            setattr(self, f"patch_embed{i + 1}", embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", _BLOCK_NORM(embed_dims[i]))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=2 ** (i + 2), module=f"norm{i + 1}"))

        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Layer-scale parameters (SMT-L style models) are exempt from weight decay."""
        return {name for name, _ in self.named_parameters() if name.endswith((".gamma_1", ".gamma_2"))}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^patch_embed1",
            blocks=r"^(?:block|patch_embed|norm)(\d+)" if coarse else [
                (r"^block(\d+)\.(\d+)", None),
                (r"^patch_embed(\d+)", (0,)),
                (r"^norm(\d+)", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

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

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected input of shape (B, {self.in_chans}, H, W), got {tuple(x.shape)}")
        if min(x.shape[-2:]) < _MIN_INPUT_SIZE:
            raise ValueError(f"input height and width must be at least {_MIN_INPUT_SIZE}, got {tuple(x.shape[-2:])}")

    def _stage(self, index: int, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Runs stage ``index``; returns its block output before and after the stage norm, both NCHW."""
        x, height, width = getattr(self, f"patch_embed{index + 1}")(x)
        blocks = getattr(self, f"block{index + 1}")
        if self.grad_checkpointing and not torch.jit.is_scripting():
            for block in blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, height, width, use_reentrant=False)
        else:
            for block in blocks:
                x = block(x, height, width)
        normed = getattr(self, f"norm{index + 1}")(x)
        return _tokens_to_map(x, height, width), _tokens_to_map(normed, height, width)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Union[int, List[int]] | None = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Forward returning the stage outputs.

        Every stage ends with its own LayerNorm (``norm{i}``), whose output feeds the next stage. With
        ``norm=True`` the intermediates are taken after it (what the official dense backbones return, and what
        ``features_only`` models return); with ``norm=False`` they are the raw outputs of the stage's blocks.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self._check_input(x)
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        last = max_index if stop_early else self.num_stages - 1
        intermediates = []
        for i in range(last + 1):
            raw, x = self._stage(i, x)
            if i in take_indices:
                intermediates.append(x if norm else raw)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Removes the stages after the last requested intermediate (and the head)."""
        take_indices, max_index = feature_take_indices(self.num_stages, indices)
        for i in range(max_index + 1, self.num_stages):
            for prefix in ("patch_embed", "block", "norm"):
                delattr(self, f"{prefix}{i + 1}")
        if max_index < self.num_stages - 1:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        self.num_stages = max_index + 1
        self.feature_info = self.feature_info[:max_index + 1]
        if prune_head or self.num_stages < len(self.embed_dims):
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        for i in range(self.num_stages):
            x = self._stage(i, x)[1]
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(-2, -1))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(
        state_dict: Mapping[str, Any],
        model: SMT,
        head_mapping: Union[None, str, Sequence[int], torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Converts an official SMT checkpoint into ``model``'s state dict, strictly.

    Accepts a training checkpoint (``{'model': ...}``), an mmdet/mmseg file (``{'state_dict': ...}``, keys possibly
    prefixed ``backbone.``, MSA depthwise conv spelled ``attn.dw_conv``) or a bare state dict.

    The classifier must match ``model`` unless one of these explicit choices applies:

    * ``head_mapping='drop'``: keep ``model``'s own (freshly initialised) head, e.g. to fine-tune 22k weights;
    * ``head_mapping=indices`` (length ``model.num_classes``): take row ``indices[k]`` of the checkpoint head for
      class ``k``, e.g. the official 22k->1k list (``data/map22kto1k.txt`` in the SMT repository);
    * ``model`` was created through timm with a ``num_classes`` different from its pretrained cfg: the head is
      passed through so that timm's ``load_pretrained`` drops it (timm's documented behaviour).

    A model without a head (``num_classes=0``) ignores the checkpoint head; a first convolution built through timm
    for another ``in_chans`` is left to timm's ``adapt_input_conv``. Raises ``ValueError`` listing every missing,
    unexpected or mis-shaped key.
    """
    state_dict = unwrap_state_dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            key = key[len("backbone."):]
        if ".attn.dw_conv." in key:
            key = key.replace(".attn.dw_conv.", ".attn.local_conv.")
        out[key] = value

    expected = model.state_dict()
    head_keys = [k for k in ("head.weight", "head.bias") if k in out]
    if "head.weight" not in expected:
        for key in head_keys:
            out.pop(key)
    elif head_keys and out["head.weight"].shape != expected["head.weight"].shape:
        cfg_classes = getattr(model, "pretrained_cfg", {}).get("num_classes")
        if isinstance(head_mapping, str):
            if head_mapping != "drop":
                raise ValueError(f"head_mapping must be 'drop' or a sequence of class indices, got {head_mapping!r}")
            out["head.weight"], out["head.bias"] = expected["head.weight"], expected["head.bias"]
        elif head_mapping is not None:
            index = torch.as_tensor(head_mapping, dtype=torch.long)
            if index.shape != (model.num_classes,):
                raise ValueError(f"head_mapping must hold {model.num_classes} class indices, got {tuple(index.shape)}")
            if index.min() < 0 or index.max() >= out["head.weight"].shape[0]:
                raise ValueError(f"head_mapping indices must lie in [0, {out['head.weight'].shape[0]})")
            out["head.weight"], out["head.bias"] = out["head.weight"][index], out["head.bias"][index]
        elif cfg_classes not in (None, model.num_classes) and out["head.weight"].shape[0] == cfg_classes:
            # timm's load_pretrained removes the classifier when num_classes differs from the pretrained cfg
            check_state_dict(out, model, "SMT checkpoint", adapted=timm_adapted_keys(model))
            return out
        else:
            raise ValueError(
                f"checkpoint head has {out['head.weight'].shape[0]} classes but the model has {model.num_classes}; "
                "pass head_mapping='drop' or a class index mapping to load it explicitly"
            )
    check_state_dict(out, model, "SMT checkpoint", adapted=timm_adapted_keys(model))
    return out


def _create_smt(variant: str, pretrained: bool = False, **kwargs: Any) -> SMT:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    kwargs = with_release_file(variant, pretrained, kwargs)
    return build_model_with_cfg(
        SMT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        # features_only returns the normed stage outputs, as the official detection / segmentation backbones
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter", norm=True),
        **kwargs,
    )


_RELEASE = "https://github.com/AFeng-x/SMT/releases/download/v1.0.0/"


def _cfg(file: str = "", **kwargs: Any) -> Dict[str, Any]:
    return {
        "url": _RELEASE + file if file else "",
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.875, "crop_mode": "center", "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed1.conv.0", "classifier": "head",
        "license": "mit", "paper_ids": "arXiv:2307.08579",
        "paper_name": "Scale-Aware Modulation Meet Transformer",
        "origin_url": "https://github.com/AFeng-x/SMT",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "smt_tiny.in1k": _cfg("smt_tiny.pth"),
    "smt_small.in1k": _cfg("smt_small.pth"),
    "smt_base.in1k": _cfg("smt_base.pth"),
    "smt_large.in22k_ft_in1k": _cfg("smt_large_22k_224_ft.pth"),
    "smt_large.in22k": _cfg("smt_large_22k.pth", num_classes=21841),
    "smt_large_384.in22k_ft_in1k": _cfg(
        "smt_large_22k_384_ft.pth", input_size=(3, 384, 384), pool_size=(12, 12), crop_pct=1.0),
})


@register_model
def smt_tiny(pretrained: bool = False, **kwargs: Any) -> SMT:
    """SMT-T: 11.5M params, 2.4 GMACs at 224."""
    args = dict(embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 1), mlp_ratios=(4, 4, 4, 2), head_conv=3)
    return _create_smt("smt_tiny", pretrained, **dict(args, **kwargs))


@register_model
def smt_small(pretrained: bool = False, **kwargs: Any) -> SMT:
    """SMT-S: 22.6M params, 4.8 GMACs at 224."""
    args = dict(embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 2), mlp_ratios=(4, 4, 4, 2), head_conv=3)
    return _create_smt("smt_small", pretrained, **dict(args, **kwargs))


@register_model
def smt_base(pretrained: bool = False, **kwargs: Any) -> SMT:
    """SMT-B: 32.0M params, 8.0 GMACs at 224 (7x7 stem)."""
    args = dict(embed_dims=(64, 128, 256, 512), depths=(4, 6, 28, 2), mlp_ratios=(8, 6, 4, 2), head_conv=7)
    return _create_smt("smt_base", pretrained, **dict(args, **kwargs))


_LARGE_ARGS = dict(embed_dims=(96, 192, 384, 768), depths=(4, 6, 28, 4), mlp_ratios=(8, 6, 4, 2), head_conv=7,
                   use_layerscale=True)


@register_model
def smt_large(pretrained: bool = False, **kwargs: Any) -> SMT:
    """SMT-L: 80.6M params (1k head), 17.9 GMACs at 224, 7x7 stem and layer scale."""
    return _create_smt("smt_large", pretrained, **dict(_LARGE_ARGS, **kwargs))


@register_model
def smt_large_384(pretrained: bool = False, **kwargs: Any) -> SMT:
    """SMT-L fine-tuned at 384x384 (55 GMACs)."""
    return _create_smt("smt_large_384", pretrained, **dict(_LARGE_ARGS, **kwargs))
