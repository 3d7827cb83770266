"""Composite models built from branches, fusion layers and heads."""

from kfusion.models.fusion_model import FusionModel

__all__ = ["FusionModel"]
