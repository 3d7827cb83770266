"""Heads: layers that turn fused features into predictions, with their default loss/metrics."""

from kfusion.heads.classification import Classification
from kfusion.heads.multi_label import MultiLabel
from kfusion.heads.multi_task import MultiTask
from kfusion.heads.regression import Regression

__all__ = [
    "Classification",
    "MultiLabel",
    "MultiTask",
    "Regression",
]
