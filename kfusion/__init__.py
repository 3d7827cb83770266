"""kfusion: multi-branch deep learning models for Keras 3."""

from kfusion import layers
from kfusion.version import __version__

__all__ = [
    "__version__",
    "layers",
]
