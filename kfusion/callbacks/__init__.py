"""Training callbacks: guards for checkpoints and exports, and branch balance."""

from kfusion.callbacks.best_epoch import BestEpoch
from kfusion.callbacks.modality_balance import ModalityBalance
from kfusion.callbacks.stop_on_nan import StopOnNaN

__all__ = ["BestEpoch", "ModalityBalance", "StopOnNaN"]
