"""Training callbacks: guards that keep a run's checkpoints and exports sound."""

from kfusion.callbacks.best_epoch import BestEpoch
from kfusion.callbacks.stop_on_nan import StopOnNaN

__all__ = ["BestEpoch", "StopOnNaN"]
