"""Fusion layers and the reusable blocks kfusion's branches are built from."""

from kfusion.layers.concat_fusion import ConcatFusion

__all__ = [
    "ConcatFusion",
]
