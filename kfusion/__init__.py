"""kfusion: multi-branch deep learning models for Keras 3."""

from kfusion import branches, layers
from kfusion.version import __version__

__all__ = [
    "__version__",
    "branches",
    "layers",
]
