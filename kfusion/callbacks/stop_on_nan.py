import math

import keras
import numpy as np

from kfusion import _checks


def _as_float(value):
    """A logged value (Python number, NumPy or backend scalar) as a Python float."""
    return float(np.asarray(keras.ops.convert_to_numpy(value), dtype="float64").reshape(-1)[0])


class StopOnNaN(keras.callbacks.Callback):
    """Stops training with a clear error the moment the loss is NaN or infinite.

    Keras' `TerminateOnNaN` only sets `model.stop_training` by default, and the fit loop
    still ends the epoch: every `on_epoch_end` runs, so a `ModelCheckpoint` or
    `BackupAndRestore` listed with it saves the diverged (NaN) weights over the last good
    checkpoint. This callback raises `FloatingPointError` instead, from the batch whose
    logged loss is not finite (`not isfinite(loss)`), naming the epoch, the batch and the
    value. `fit` aborts there, before any `on_epoch_end`, so the checkpoints written by
    earlier epochs stay as they were. A value logged only per epoch (a validation value
    such as `"val_loss"`) is checked at the end of the epoch, still before the checkpoints.

    With `check_weights=True` it also checks, at the end of each epoch, that every
    floating-point weight of the model is finite (a step can return a finite loss and
    still produce non-finite weights, which the next batch's loss would only show after
    this epoch's checkpoint).

    Keras runs callbacks in list order: put this one before any checkpoint callback
    (`callbacks=[kf.callbacks.StopOnNaN(), keras.callbacks.ModelCheckpoint(...)]`).
    `kfusion train` does.

    Args:
        monitor: str, the logged value to watch: after every batch, and at the end of each
            epoch (where validation values such as `"val_loss"` are logged). Defaults to
            `"loss"`.
        check_weights: bool, also check the weights at the end of every epoch.
            Defaults to True.

    Raises:
        FloatingPointError: from `fit`, when the monitored value is NaN or infinite
            after a batch or at the end of an epoch, or (with `check_weights`) a weight
            is at the end of an epoch.

    Example:

    >>> import keras, numpy as np
    >>> import kfusion as kf
    >>> model = kf.FusionModel(
    ...     inputs=keras.Input((3,), name="x"),
    ...     branches=[kf.branches.MLP(units=(4,))],
    ...     head=kf.heads.Regression(),
    ... )
    >>> model.compile(optimizer=keras.optimizers.SGD(learning_rate=float("inf")))
    >>> x = np.ones((8, 3), "float32")
    >>> y = np.ones((8, 1), "float32")
    >>> model.fit(x, y, batch_size=4, verbose=0, callbacks=[kf.callbacks.StopOnNaN()])
    Traceback (most recent call last):
        ...
    FloatingPointError: Training stopped in epoch 1 at batch 2: loss is nan. ...
    """

    def __init__(self, monitor="loss", check_weights=True):
        super().__init__()
        if not isinstance(monitor, str) or not monitor:
            raise ValueError(
                f"`monitor` must be the name of a logged value. Received: monitor={monitor!r}"
            )
        self.monitor = monitor
        self.check_weights = _checks.check_bool("check_weights", check_weights)
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        value = _as_float(value)
        if not math.isfinite(value):
            raise FloatingPointError(
                f"Training stopped in epoch {self.epoch + 1} at batch {batch + 1}: "
                f"{self.monitor} is {value}. fit was aborted before this epoch's "
                "checkpoints, so earlier ones are intact. Common causes: a learning rate "
                "too high, NaN or inf values in the inputs or labels."
            )

    def on_epoch_end(self, epoch, logs=None):
        # Values logged only per epoch (validation ones such as "val_loss") are seen here.
        value = (logs or {}).get(self.monitor)
        if value is not None and not math.isfinite(_as_float(value)):
            raise FloatingPointError(
                f"Training stopped at the end of epoch {epoch + 1}: {self.monitor} is "
                f"{_as_float(value)}. fit was aborted before this epoch's checkpoints, so "
                "earlier ones are intact. Common causes: a learning rate too high, NaN or "
                "inf values in the inputs or labels (or the validation data)."
            )
        if not self.check_weights:
            return
        path = _checks.first_non_finite(self.model.weights)
        if path is not None:
            raise FloatingPointError(
                f"Training stopped at the end of epoch {epoch + 1}: weight {path!r} holds "
                "NaN or inf values. fit was aborted before this epoch's checkpoints, so "
                "earlier ones are intact. Common causes: a learning rate too high, NaN or "
                "inf values in the inputs or labels."
            )
