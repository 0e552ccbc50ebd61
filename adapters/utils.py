"""Image batching, box helpers and small layers shared by the DETR-family detectors."""
import copy
from typing import List, Sequence, Tuple, Union

import torch
from torch import nn
from torchvision.ops import box_convert

from dat_smt._layers import caching_allowed, grad_free

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MLP",
    "batch_images",
    "box_cxcywh_to_xyxy",
    "box_xyxy_to_cxcywh",
    "clones",
    "inverse_sigmoid",
    "residual_ffn",
    "valid_ratios_from_mask",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Images = Union[torch.Tensor, Sequence[torch.Tensor]]


def _check_image(image: torch.Tensor, where: str) -> None:
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"{where} must be a torch.Tensor, got {type(image).__name__}")
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{where} must be a (3, H, W) RGB image tensor, got shape {tuple(image.shape)}")
    if not image.is_floating_point():
        raise TypeError(f"{where} must be a float tensor with values in [0, 1], got dtype {image.dtype}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"{where} is empty: shape {tuple(image.shape)}")
    if not torch.isfinite(image).all():
        raise ValueError(f"{where} contains NaN or infinite values")


def batch_images(
        images: Images,
        size_divisibility: int = 32,
) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, int]]]:
    """Pads images of any sizes into one batch with a padding mask.

    Args:
        images: A list of (3, H, W) float tensors in [0, 1], or an already padded (B, 3, H, W) batch (every
            image then counts as full size).
        size_divisibility: The padded height and width are rounded up to a multiple of it (patch-based
            backbones such as Swin need this; 1 disables it).

    Returns:
        ``(batch, mask, image_sizes)``: (B, 3, H, W) zero-padded images, (B, H, W) bool mask (True = padding)
        and the (height, width) of every image before padding.
    """
    if isinstance(images, torch.Tensor):
        if images.dim() != 4:
            raise ValueError(
                f"a batch of images must be a (B, 3, H, W) tensor, got shape {tuple(images.shape)}; "
                "pass images of different sizes as a list of (3, H, W) tensors"
            )
        images = list(images.unbind(0))
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise TypeError("images must be a non-empty list of (3, H, W) tensors or a (B, 3, H, W) tensor")
    for i, image in enumerate(images):
        _check_image(image, f"images[{i}]")
    sizes = [(int(im.shape[1]), int(im.shape[2])) for im in images]
    height = max(h for h, _ in sizes)
    width = max(w for _, w in sizes)
    if size_divisibility > 1:
        height = -(-height // size_divisibility) * size_divisibility
        width = -(-width // size_divisibility) * size_divisibility
    batch = images[0].new_zeros((len(images), 3, height, width))
    mask = torch.ones((len(images), height, width), dtype=torch.bool, device=images[0].device)
    for i, (image, (h, w)) in enumerate(zip(images, sizes)):
        batch[i, :, :h, :w].copy_(image)
        mask[i, :h, :w] = False
    return batch, mask, sizes


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, in_fmt="cxcywh", out_fmt="xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, in_fmt="xyxy", out_fmt="cxcywh")


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The logit of ``x`` clamped to [0, 1], with both sides kept at least ``eps`` away from 0."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def valid_ratios_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """(B, H, W) padding mask -> (B, 2) fraction (x, y) of the map that holds image content."""
    _, height, width = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).to(torch.float32)
    valid_w = (~mask[:, 0, :]).sum(1).to(torch.float32)
    return torch.stack([valid_w / width, valid_h / height], -1)


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    """``n`` independent deep copies of ``module``."""
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class MLP(nn.Module):
    """Plain multi-layer perceptron with ReLU between layers (the DETR box head); weights in ``layers.<i>``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = x.relu()
        return x


FFN_CHUNK_BYTES = 8 << 20


def residual_ffn(x: torch.Tensor, linear1: nn.Linear, linear2: nn.Linear, norm: nn.LayerNorm,
                 dropout_hidden: nn.Module, dropout_out: nn.Module) -> torch.Tensor:
    """The post-norm ReLU FFN block ``norm(x + dropout_out(linear2(dropout_hidden(relu(linear1(x))))))`` of a
    fresh tensor ``x`` that the caller gives up (it may be overwritten).

    In inference (eval mode, no gradient, eager) the tokens go through in chunks whose hidden map stays within
    :data:`FFN_CHUNK_BYTES`, written back into ``x``: a whole-map hidden tensor (80 MB for the 20k tokens of an
    800x1216 image) is mapped afresh by glibc on every call and page-faults on every page, while chunks reuse
    the allocator's memory. Every token is computed as in one pass.
    """
    hidden_bytes = x.numel() // x.shape[-1] * linear1.out_features * x.element_size()
    if (norm.training or hidden_bytes <= FFN_CHUNK_BYTES or not x.is_contiguous()
            or not (grad_free(x) and caching_allowed())):
        ffn = linear2(dropout_hidden(linear1(x).relu_()))
        return norm(dropout_out(ffn).add_(x))
    tokens = x.view(-1, x.shape[-1])
    for chunk in tokens.split(max(1, FFN_CHUNK_BYTES // (linear1.out_features * x.element_size()))):
        chunk.copy_(norm(linear2(linear1(chunk).relu_()).add_(chunk)))
    return x
