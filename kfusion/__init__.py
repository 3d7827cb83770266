"""kfusion: multi-branch deep learning models for Keras 3."""

import importlib

from kfusion import _startup
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


def __getattr__(name):
    # Submodules not imported yet: only while the `kfusion` command starts (see below).
    if name in _startup.SUBMODULES:
        return importlib.import_module(f"kfusion.{name}")
    if name == "FusionModel":
        return importlib.import_module("kfusion.models").FusionModel
    raise AttributeError(f"module 'kfusion' has no attribute {name!r}")


if not _startup.started_as_command():
    # Every submodule, so that every class a `.keras` file names is registered. The
    # `kfusion` command imports them itself once it has checked its arguments (quickly,
    # before Keras and TensorFlow load).
    from kfusion import (  # noqa: E402
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
    from kfusion.models import FusionModel  # noqa: E402
