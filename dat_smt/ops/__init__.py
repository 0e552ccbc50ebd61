"""Custom operators: multi-scale deformable attention sampling, neighborhood attention, depthwise convolution and
LayerNorm over channels."""
from .depthwise import depthwise_conv2d
from .modules import MSDeformAttn
from .msda import ms_deform_attn_reference, multi_scale_deformable_attention
from .neighborhood import neighborhood_attention_2d, neighborhood_attention_2d_reference
from .norm import layer_norm

__all__ = [
    "depthwise_conv2d",
    "layer_norm",
    "MSDeformAttn",
    "ms_deform_attn_reference",
    "multi_scale_deformable_attention",
    "neighborhood_attention_2d",
    "neighborhood_attention_2d_reference",
]
