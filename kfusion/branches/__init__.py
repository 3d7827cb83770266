"""Branches: layers that turn one input into features, adapting to its rank and dtype."""

from kfusion.branches.mlp import MLP

__all__ = [
    "MLP",
]
