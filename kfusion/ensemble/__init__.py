"""Model-level fusion: averaging, stacking, weight soups, distillation, fine-tuning, CV.

Output convention shared by these tools: a `FusionModel`'s head says whether it outputs
logits (`from_logits=True`) or probabilities; any other model is taken to output
probabilities unless the tool's `from_logits=True` says otherwise.
"""

from kfusion.ensemble.average import average
from kfusion.ensemble.cross_validate import cross_validate
from kfusion.ensemble.distiller import Distiller
from kfusion.ensemble.finetune import UnfreezeBackbone, freeze, unfreeze
from kfusion.ensemble.soup import soup
from kfusion.ensemble.stack import stack

__all__ = [
    "Distiller",
    "UnfreezeBackbone",
    "average",
    "cross_validate",
    "freeze",
    "soup",
    "stack",
    "unfreeze",
]
