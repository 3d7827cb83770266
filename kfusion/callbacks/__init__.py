"""Training callbacks: guards that keep a run's checkpoints and exports sound."""

from kfusion.callbacks.stop_on_nan import StopOnNaN

__all__ = ["StopOnNaN"]
