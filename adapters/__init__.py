"""DETR-family detection adapters over the ``features_only`` pyramid of any timm backbone.

Installed and imported as ``dat_smt.adapters``.
"""
