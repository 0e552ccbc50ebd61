"""dat-smt: DAT, DAT++ and SMT backbones for timm, DETR-family detection adapters and a deformable sampling op.

Importing the package registers every model of the zoo with timm, so ``timm.create_model('dat_tiny')`` works.
"""
from . import _checkpoint, ops  # noqa: F401  (_checkpoint allow-lists the official yacs configs)
from .hub import create_model  # also makes dat_smt.hub available

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
__all__ += ["hub", "create_model"]
