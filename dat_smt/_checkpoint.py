"""Safe loading and strict checking of official checkpoints.

The official DAT and SMT training scripts save a yacs ``CfgNode`` next to the weights. ``torch.load`` with
``weights_only=True`` refuses it, so on import this module allow-lists the name ``yacs.config.CfgNode`` with a
stand-in that rebuilds it as a plain ``OrderedDict`` of data: no code from the file runs, and timm's own loader
(``pretrained_cfg_overlay=dict(file=...)``) accepts the official files too.
"""
import collections
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Set, Union

import torch
from torch import nn

__all__ = ["load_checkpoint", "unwrap_state_dict", "check_state_dict", "timm_adapted_keys"]


class _YacsConfigAsDict(dict):
    """Unpickles a yacs ``CfgNode`` as an ``OrderedDict``: the weights-only unpickler can fill and build those."""

    def __new__(cls, *args, **kwargs):
        return collections.OrderedDict()


torch.serialization.add_safe_globals([(_YacsConfigAsDict, "yacs.config.CfgNode")])


def load_checkpoint(path: Union[str, Path]) -> Dict[str, Any]:
    """Loads a ``.safetensors`` file or a torch pickle with ``weights_only=True`` onto the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RuntimeError(
            f"could not load {path} as a weights-only torch checkpoint ({type(e).__name__}: {e}); "
            "expected an official .pth file or a .safetensors file, possibly truncated or of another format"
        ) from e


def unwrap_state_dict(checkpoint: Mapping[str, Any], keys: Iterable[str] = ("model", "state_dict")) -> Dict[str, Any]:
    """Returns the state dict inside a training checkpoint (``{'model': ..., 'optimizer': ...}``) or the dict itself."""
    for key in keys:
        if key in checkpoint and isinstance(checkpoint[key], Mapping):
            return dict(checkpoint[key])
    return dict(checkpoint)


def check_state_dict(
        state_dict: Mapping[str, torch.Tensor],
        model: nn.Module,
        source: str = "checkpoint",
        adapted: Iterable[str] = (),
) -> None:
    """Raises ``ValueError`` listing every missing, unexpected or mis-shaped key of ``state_dict`` against ``model``.

    Keys in ``adapted`` (see :func:`timm_adapted_keys`) may be absent or of another shape.
    """
    expected = model.state_dict()
    adapted = set(adapted)
    missing = [k for k in expected if k not in state_dict and k not in adapted]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k}: {tuple(state_dict[k].shape)} in {source}, {tuple(v.shape)} in model"
        for k, v in expected.items()
        if k in state_dict and k not in adapted and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match {type(model).__name__}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
        raise ValueError("\n".join(lines))


def _layer_names(names: Union[str, Iterable[str], None]) -> tuple:
    return (names,) if isinstance(names, str) else tuple(names or ())


def timm_adapted_keys(model: nn.Module) -> Set[str]:
    """Keys that timm's ``load_pretrained`` still changes after the checkpoint filter, so their shapes may differ.

    From the ``pretrained_cfg`` timm attached to ``model``: the classifier (``classifier``) when the model was built
    for another class count (timm drops it), and the first convolution (``first_conv``) when it was built for
    another number of input channels than ``input_size`` (timm adapts it with ``adapt_input_conv``).
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}
    keys = set()
    if cfg.get("num_classes") is not None and getattr(model, "num_classes", cfg["num_classes"]) != cfg["num_classes"]:
        keys.update(f"{name}.{p}" for name in _layer_names(cfg.get("classifier")) for p in ("weight", "bias"))
    in_chans = (cfg.get("input_size") or (3,))[0]
    for name in _layer_names(cfg.get("first_conv")):
        try:
            conv = model.get_submodule(name)
        except AttributeError:
            continue
        if getattr(conv, "in_channels", in_chans) != in_chans:
            keys.add(f"{name}.weight")
    return keys
