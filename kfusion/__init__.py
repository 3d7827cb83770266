"""kfusion: multi-branch deep learning models for Keras 3."""

from kfusion import (
    branches,
    callbacks,
    datasets,
    ensemble,
    export,
    heads,
    inspect,
    layers,
    models,
    recipes,
    tune,
)
from kfusion.models import FusionModel
from kfusion.version import __version__

__all__ = [
    "__version__",
    "FusionModel",
    "branches",
    "callbacks",
    "datasets",
    "ensemble",
    "export",
    "heads",
    "inspect",
    "layers",
    "models",
    "recipes",
    "tune",
]
