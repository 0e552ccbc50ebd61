"""dat-smt: DAT, DAT++ and SMT backbones for timm, DETR-family detection adapters and a deformable sampling op.

Importing the package registers every model of the zoo with timm, so ``timm.create_model('dat_tiny')`` works.
"""
# _checkpoint allow-lists the official yacs configs; smt registers the SMT models with timm
from . import _checkpoint, ops, smt  # noqa: F401

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
