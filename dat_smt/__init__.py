"""dat-smt: DAT, DAT++ and SMT backbones for timm, DETR-family detection adapters and a deformable sampling op.

Importing the package registers every model of the zoo with timm, so ``timm.create_model('dat_tiny')`` works.
"""
from typing import List

import timm
from timm.models import get_arch_name, model_entrypoint

# _checkpoint allow-lists the official yacs configs; dat and smt register the models with timm
from . import _checkpoint, dat, ops, smt  # noqa: F401
from .hub import create_model  # also makes dat_smt.hub available

__version__ = "0.1.0"
__all__ = ["list_models", "ops", "__version__"]
__all__ += ["hub", "create_model"]


def list_models(pattern: str = "") -> List[str]:
    """Names of the timm models registered by dat-smt, optionally filtered by a glob ``pattern``."""
    names = timm.list_models(pattern or "*")
    return [n for n in names if model_entrypoint(get_arch_name(n)).__module__.startswith(__name__ + ".")]
