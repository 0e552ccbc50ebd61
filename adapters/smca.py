"""SMCA-DETR (Spatially Modulated Co-Attention, ICCV 2021): the single-scale transformer and heads.

The decoder cross-attention gets an additive, Gaussian-like spatial prior ``log G = -|E| / beta`` on its
logits, where ``E`` is a (per-head, per-axis scaled) squared distance between each key's cell and a centre
predicted from the query. Parameter names follow the official code (gaopengcuhk/SMCA-DETR) so official
checkpoints convert by renaming the backbone only; d_model, heads and stride are arguments (the official
code hard-codes 256, 8 and 32, kept here as defaults).

Half-cell convention (as official): the centre is ``(w_img, h_img) * sigmoid(r) / stride`` from the
*unpadded* image size, in feature-cell units, while the key grid is the integer cell index ``(j, i)`` of the
padded map, without +0.5. A centre at the image's left edge is therefore at the left edge of cell 0, not at
its centre; the learned offsets absorb the half cell.
"""
from typing import Dict, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dat_smt._checkpoint import check_state_dict

from .backbone import TimmBackbone
from .criterion import SetCriterion, deformable_detr_weight_dict
from .detector import DetrDetector
from .matcher import HungarianMatcher
from .position_encoding import PositionEmbeddingSine
from .registry import register_detector

__all__ = [
    "DYNAMIC_SCALES",
    "SMCADETR",
    "SMCAHead",
    "SMCATransformer",
    "convert_smca_checkpoint",
    "gaussian_log_prior",
    "scale_selection_attention",
]

DYNAMIC_SCALES = {"type1": 0, "type2": 1, "type3": 2, "type4": 3}
"""Number of learned scale terms per head for each ``dynamic_scale`` variant."""


class MLP(nn.Module):
    """Linear layers with ReLU between them (the DETR box / centre MLP)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < len(self.layers) - 1:
                x = F.relu(x)
        return x


def gaussian_log_prior(
    centres: Tensor, scales: Tensor | None, feature_hw: Tuple[int, int], dynamic_scale: str, beta: float
) -> Tensor:
    """Additive attention-logit term ``-|E| / beta`` of SMCA.

    Args:
        centres: (B, Q, heads, 2) per-head centres (x, y) in feature-cell units.
        scales: (B, Q, heads, K) squared learned scales (K = 1, 2, 3 for type2/3/4) or None for type1.
        feature_hw: (h, w) of the padded feature map; keys are its integer cell indices in row-major order.
        dynamic_scale: one of ``type1`` .. ``type4``.
        beta: the smoothing constant (official ``--smooth``, 8).

    Returns:
        (B, heads, Q, h*w) log prior.
    """
    h, w = feature_hw
    ys, xs = torch.meshgrid(
        torch.arange(h, device=centres.device, dtype=centres.dtype),
        torch.arange(w, device=centres.device, dtype=centres.dtype),
        indexing="ij",
    )
    grid = torch.stack((xs.flatten(), ys.flatten()), -1)  # (h*w, 2)
    squared = (centres.unsqueeze(-2) - grid).pow(2)  # (B, Q, heads, h*w, 2)
    if dynamic_scale == "type1":
        energy = squared.sum(-1)
    elif dynamic_scale == "type2":
        energy = squared.sum(-1) * scales
    elif dynamic_scale == "type3":
        energy = (squared * scales.unsqueeze(-2)).sum(-1)
    elif dynamic_scale == "type4":
        terms = torch.cat([squared, squared.prod(-1, keepdim=True)], -1)
        energy = (terms * scales.unsqueeze(-2)).sum(-1)
    else:
        raise ValueError(f"dynamic_scale must be one of {sorted(DYNAMIC_SCALES)}, got {dynamic_scale!r}")
    return (-energy.abs() / beta).permute(0, 2, 1, 3)



def scale_selection_attention(
    q: Tensor,
    keys: list[Tensor],
    values: list[Tensor],
    log_priors: list[Tensor],
    key_padding_masks: list[Tensor | None],
    scale_logits: Tensor,
) -> tuple[Tensor, Tensor]:
    """Multi-scale SMCA co-attention with scale selection (paper form): ``sum_s a_s softmax(q k_s / sqrt(d) +
    log G_s) v_s`` with ``a = softmax(scale_logits)`` over scales.

    The scale weights are computed for every image of the batch; the released multi-scale code instead takes
    batch element 0's weights for the whole batch (``scale_attention[:, 0, k]``), harmless only at batch size 1,
    which its recipe uses. That bug is deliberately not reproduced.

    Args:
        q: (B, heads, Q, d) projected queries.
        keys, values: per scale (B, heads, S_s, d).
        log_priors: per scale (B, heads, Q, S_s) additive Gaussian terms.
        key_padding_masks: per scale (B, S_s) bool (True = padding) or None.
        scale_logits: (B, Q, num_scales).

    Returns:
        (B, heads, Q, d) attended values and the (B, Q, num_scales) scale weights.
    """
    if not len(keys) == len(values) == len(log_priors) == len(key_padding_masks) == scale_logits.shape[-1]:
        raise ValueError(
            f"need one key, value, prior and mask per scale and scale_logits (..., {len(keys)}); got "
            f"{len(values)} values, {len(log_priors)} priors, {len(key_padding_masks)} masks, "
            f"scale_logits {tuple(scale_logits.shape)}"
        )
    weights = scale_logits.softmax(-1)
    out = 0
    for index, (k, v, prior, mask) in enumerate(zip(keys, values, log_priors, key_padding_masks)):
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + prior
        if mask is not None:
            logits = logits.masked_fill(mask[:, None, None, :], float("-inf"))
        out = out + weights[:, None, :, index, None] * (logits.softmax(-1) @ v)
    return out, weights

class GaussianCrossAttention(nn.Module):
    """Multi-head attention whose logits receive an additive (B, heads, Q, S) bias before the softmax.

    Parameters are laid out like ``nn.MultiheadAttention`` (``in_proj_weight``, ``in_proj_bias``,
    ``out_proj``), as in the official ``GaussianMultiheadAttention``.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, bias: Tensor, key_padding_mask: Tensor | None):
        """query (B, Q, C), key/value (B, S, C), bias (B, heads, Q, S), key_padding_mask (B, S) True = pad."""
        batch, num_queries, channels = query.shape
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)

        def split(x: Tensor) -> Tensor:
            return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

        q, k, v = split(F.linear(query, w_q, b_q)), split(F.linear(key, w_k, b_k)), split(F.linear(value, w_v, b_v))
        logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
        if key_padding_mask is not None:
            logits = logits.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = F.dropout(logits.softmax(-1), self.dropout, self.training)
        out = (attn @ v).transpose(1, 2).reshape(batch, num_queries, channels)
        return self.out_proj(out), attn


class SMCAEncoderLayer(nn.Module):
    """Post-norm DETR encoder layer (self-attention on src + pos, FFN)."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        q = src + pos
        src = self.norm1(src + self.dropout(self.self_attn(q, q, src, key_padding_mask=key_padding_mask)[0]))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


class SMCADecoderLayer(nn.Module):
    """Post-norm decoder layer with the spatially modulated co-attention.

    ``o = norm4(tgt + query_pos)`` (from the layer input) drives the centre MLP (``point1``, first layer only),
    the per-head centre offsets (``point2``) and the per-head scales (``point3``, squared).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        dropout: float,
        dynamic_scale: str,
        beta: float,
        predicts_centre: bool,
    ) -> None:
        super().__init__()
        if dynamic_scale not in DYNAMIC_SCALES:
            raise ValueError(f"dynamic_scale must be one of {sorted(DYNAMIC_SCALES)}, got {dynamic_scale!r}")
        self.num_heads = num_heads
        self.dynamic_scale = dynamic_scale
        self.beta = beta
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.multihead_attn = GaussianCrossAttention(d_model, num_heads, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.norm4 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        if predicts_centre:
            self.point1 = MLP(d_model, d_model, 2, 3)
        self.point2 = nn.Linear(d_model, 2 * num_heads)
        num_scales = DYNAMIC_SCALES[dynamic_scale]
        if num_scales:
            self.point3 = nn.Linear(d_model, num_scales * num_heads)
            nn.init.zeros_(self.point3.weight)
            nn.init.ones_(self.point3.bias)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        pos: Tensor,
        query_pos: Tensor,
        key_padding_mask: Tensor | None,
        feature_hw: Tuple[int, int],
        cell_size_wh: Tensor,
        centre: Tensor | None,
    ) -> Tuple[Tensor, Tensor | None, Tensor, Tensor]:
        """Returns (tgt, reference logits (first layer) or None, centre (B, Q, 2) in cells, log prior)."""
        batch, num_queries, _ = tgt.shape
        o = self.norm4(tgt + query_pos)
        reference = None
        if centre is None:
            reference = self.point1(o)
            centre = cell_size_wh[:, None, :] * reference.sigmoid()
        head_centres = centre.unsqueeze(2) + self.point2(o).view(batch, num_queries, self.num_heads, 2)
        scales = None
        if self.dynamic_scale != "type1":
            scales = self.point3(o).pow(2).view(batch, num_queries, self.num_heads, -1)
        log_prior = gaussian_log_prior(head_centres, scales, feature_hw, self.dynamic_scale, self.beta)

        q = tgt + query_pos
        tgt = self.norm1(tgt + self.dropout(self.self_attn(q, q, tgt)[0]))
        attended = self.multihead_attn(tgt + query_pos, memory + pos, memory, log_prior, key_padding_mask)[0]
        tgt = self.norm2(tgt + self.dropout(attended))
        tgt = self.norm3(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))
        return tgt, reference, centre, log_prior


class SMCAEncoder(nn.Module):
    """Stack of encoder layers (no final norm, as in post-norm DETR)."""

    def __init__(self, num_layers: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SMCAEncoderLayer(**layer_kwargs) for _ in range(num_layers))

    def forward(self, src: Tensor, pos: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, key_padding_mask)
        return src


class SMCADecoder(nn.Module):
    """Decoder layers; the first predicts the centre, later ones reuse it. Outputs pass a shared LayerNorm."""

    def __init__(self, num_layers: int, d_model: int, **layer_kwargs) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            SMCADecoderLayer(d_model=d_model, predicts_centre=index == 0, **layer_kwargs) for index in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)


class SMCATransformer(nn.Module):
    """Single-scale SMCA encoder-decoder.

    Args:
        d_model: model width (official 256).
        num_heads: attention heads (official 8).
        num_encoder_layers, num_decoder_layers: depths (official 6 / 6).
        dim_feedforward: FFN width (official 2048).
        dropout: dropout on attention and residual branches (official 0.1).
        dynamic_scale: ``type1`` .. ``type4`` (official recipe ``type3``).
        beta: smoothing of the log prior (official ``--smooth`` 8).
        stride: feature stride in pixels, converts the unpadded image size into feature cells.
    """

    def __init__(
        self,
        d_model: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        dynamic_scale: str = "type3",
        beta: float = 8.0,
        stride: int = 32,
    ) -> None:
        super().__init__()
        if num_decoder_layers < 1:
            raise ValueError("SMCA needs at least one decoder layer (the first predicts the centres)")
        self.d_model = d_model
        self.stride = stride
        common = dict(num_heads=num_heads, dim_feedforward=dim_feedforward, dropout=dropout)
        self.encoder = SMCAEncoder(num_encoder_layers, d_model=d_model, **common)
        self.decoder = SMCADecoder(num_decoder_layers, d_model, dynamic_scale=dynamic_scale, beta=beta, **common)
        for name, p in self.named_parameters():
            if p.dim() > 1 and not name.endswith("point3.weight"):
                nn.init.xavier_uniform_(p)

    def forward(
        self, src: Tensor, mask: Tensor, query_embed: Tensor, pos: Tensor, image_sizes_hw: Tensor
    ) -> Dict[str, object]:
        """Run encoder and decoder.

        Args:
            src: (B, C, h, w) projected feature map; mask: (B, h, w) bool, True on padding.
            query_embed: (Q, C) learned query positions; pos: (B, C, h, w) sine position embedding.
            image_sizes_hw: (B, 2) unpadded image (h, w) in pixels.

        Returns:
            dict with ``memory`` (B, h*w, C), ``hs`` (layers, B, Q, C) after the shared norm, ``reference``
            (B, Q, 2) first-layer centre logits (x, y), ``log_priors`` list of (B, heads, Q, h*w).
        """
        batch, _, h, w = src.shape
        src_flat = src.flatten(2).transpose(1, 2)
        pos_flat = pos.flatten(2).transpose(1, 2)
        key_padding_mask = mask.flatten(1)
        memory = self.encoder(src_flat, pos_flat, key_padding_mask)

        cell_size_wh = image_sizes_hw.flip(-1).to(src.dtype) / self.stride
        query_pos = query_embed.unsqueeze(0).expand(batch, -1, -1)
        tgt = torch.zeros_like(query_pos)
        centre, reference = None, None
        hs, log_priors = [], []
        for layer in self.decoder.layers:
            tgt, layer_reference, centre, log_prior = layer(
                tgt, memory, pos_flat, query_pos, key_padding_mask, (h, w), cell_size_wh, centre
            )
            reference = layer_reference if layer_reference is not None else reference
            hs.append(self.decoder.norm(tgt))
            log_priors.append(log_prior)
        return {"memory": memory, "hs": torch.stack(hs), "reference": reference, "log_priors": log_priors}


class SMCAHead(nn.Module):
    """Input projection, queries, SMCA transformer and the class / box heads on one feature map.

    The box centre logits are the head output plus the first-layer reference logits, before the sigmoid,
    for every decoder layer. The class head has ``num_classes + 1`` outputs (official; trained with a sigmoid
    focal loss, the extra column never gets a positive).
    """

    def __init__(self, in_channels: int, num_classes: int, num_queries: int = 300, **transformer_kwargs) -> None:
        super().__init__()
        self.transformer = SMCATransformer(**transformer_kwargs)
        d_model = self.transformer.d_model
        self.input_proj = nn.Conv2d(in_channels, d_model, kernel_size=1)
        self.query_embed = nn.Embedding(num_queries, d_model)
        self.class_embed = nn.Linear(d_model, num_classes + 1)
        self.bbox_embed = MLP(d_model, d_model, 4, 3)
        nn.init.constant_(self.class_embed.bias, -torch.log(torch.tensor(99.0)).item())

    def forward(self, feature: Tensor, mask: Tensor, pos: Tensor, image_sizes_hw: Tensor) -> Dict[str, object]:
        """Returns the transformer outputs plus ``pred_logits`` / ``pred_boxes`` (layers, B, Q, ...)."""
        src = self.input_proj(feature)
        out = self.transformer(src, mask, self.query_embed.weight, pos, image_sizes_hw)
        hs = out["hs"]
        box_logits = self.bbox_embed(hs)
        centre_logits = box_logits[..., :2] + out["reference"]
        out["pred_boxes"] = torch.cat([centre_logits, box_logits[..., 2:]], -1).sigmoid()
        out["pred_logits"] = self.class_embed(hs)
        return out


def convert_smca_checkpoint(
    state_dict: Mapping[str, Tensor], head: nn.Module, backbone: nn.Module | None = None
) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
    """Split an official single-scale SMCA ``model`` state dict into (head, backbone) state dicts.

    ``backbone.0.body.*`` (torchvision ResNet names, FrozenBatchNorm buffers) maps onto timm's resnet
    ``features_only`` model by dropping the prefix (timm keeps the torchvision names); ``num_batches_tracked``
    buffers the timm model expects are filled with zeros. The remaining keys keep their official names.
    Both parts are checked strictly with :func:`dat_smt._checkpoint.check_state_dict` (``backbone`` optional).
    """
    head_state, backbone_state = {}, {}
    prefix = "backbone.0.body."
    for key, value in state_dict.items():
        if key.startswith(prefix):
            backbone_state[key[len(prefix):]] = value
        elif key.startswith("backbone."):
            raise ValueError(f"unexpected backbone key {key!r}: expected {prefix}* (a ResNet body)")
        else:
            head_state[key] = value
    check_state_dict(head_state, head, "SMCA checkpoint (transformer and heads)")
    if backbone is not None:
        for key, value in backbone.state_dict().items():
            if key.endswith("num_batches_tracked") and key not in backbone_state:
                backbone_state[key] = torch.zeros_like(value)
        check_state_dict(backbone_state, backbone, "SMCA checkpoint (backbone.0.body)")
    return head_state, backbone_state


class SMCADETR(DetrDetector):
    """Single-scale SMCA-DETR on the last (deepest) map of a timm backbone, with the torchvision API.

    The stride comes from the backbone's ``feature_info``. DETR sine position embeddings (no -0.5 offset);
    the unpadded image size of every image is read from the padding mask. The official class head has
    ``num_classes + 1`` outputs trained with a sigmoid focal loss (the extra column is never positive); it is
    kept for checkpoint compatibility and dropped before the loss and post-processing. Losses and matching
    follow the official config: focal (alpha 0.25, gamma 2) weight 2, L1 5, GIoU 2, on every decoder layer.

    Args:
        backbone: A :class:`TimmBackbone` returning one map.
        num_classes: Object classes.
        num_queries: Object queries (official recipe 300).
        num_detections: Detections kept per image in eval mode.
        **transformer_kwargs: :class:`SMCATransformer` arguments (``d_model``, ``num_heads``, ``dynamic_scale``,
            ``beta``, layer counts, ...); ``stride`` is taken from the backbone.
    """

    def __init__(
        self,
        backbone: TimmBackbone,
        num_classes: int,
        num_queries: int = 300,
        num_detections: int = 100,
        **transformer_kwargs,
    ) -> None:
        num_decoder_layers = transformer_kwargs.get("num_decoder_layers", 6)
        criterion = SetCriterion(num_classes, HungarianMatcher(), deformable_detr_weight_dict(num_decoder_layers))
        super().__init__(backbone, num_classes, criterion, num_detections=num_detections)
        if "stride" in transformer_kwargs:
            raise ValueError("stride is derived from the backbone's feature_info; do not pass it")
        self.head = SMCAHead(
            backbone.channels[-1], num_classes, num_queries, stride=backbone.strides[-1], **transformer_kwargs
        )
        self.position_embedding = PositionEmbeddingSine(self.head.transformer.d_model // 2, normalize=True)

    def forward_detr(self, images: Tensor, mask: Tensor) -> Dict[str, object]:
        maps, masks = self.backbone(images, mask)
        feature, feature_mask = maps[-1], masks[-1]
        pos = self.position_embedding(feature_mask).to(feature.dtype)
        image_sizes_hw = torch.stack([(~mask[:, :, 0]).sum(-1), (~mask[:, 0, :]).sum(-1)], -1)
        out = self.head(feature, feature_mask, pos, image_sizes_hw)
        logits = out["pred_logits"][..., : self.num_classes]
        boxes = out["pred_boxes"]
        aux = [{"pred_logits": lg, "pred_boxes": bx} for lg, bx in zip(logits[:-1], boxes[:-1])]
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1], "aux_outputs": aux}


@register_detector("smca")
def smca(
    backbone: str | nn.Module = "resnet50",
    num_classes: int = 91,
    pretrained_backbone: bool = False,
    backbone_kwargs: Dict[str, object] | None = None,
    multi_scale: bool = False,
    **options: object,
) -> SMCADETR:
    """SMCA-DETR; ``options`` are :class:`SMCADETR` arguments (``num_queries``, ``dynamic_scale``, ``d_model``...)."""
    if multi_scale:
        raise NotImplementedError("multi-scale SMCA (multi_scale=True) is not implemented yet; use multi_scale=False")
    if isinstance(backbone, TimmBackbone):
        body = backbone
    else:
        kwargs = dict(backbone_kwargs or {})
        out_strides = kwargs.pop("out_strides", (32,))
        extra = {"pretrained": pretrained_backbone} if isinstance(backbone, str) else {}
        body = TimmBackbone(backbone, out_strides=out_strides, **extra, **kwargs)
    return SMCADETR(body, num_classes, **options)
