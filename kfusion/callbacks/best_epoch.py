import math

import keras

from kfusion import _checks
from kfusion.callbacks.stop_on_nan import _as_float

_HIGHER_IS_BETTER = ("acc", "auc", "precision", "recall", "f1", "iou")


def _higher_is_better(key):
    return any(token in key.lower() for token in _HIGHER_IS_BETTER)


class BestEpoch(keras.callbacks.Callback):
    """Early stopping on several validation values, compared in order; keeps the best.

    Keras' `EarlyStopping` follows one value. On the small validation splits of
    small-data training (a fifth of 50-200 series is 10-40 of them) the validation loss
    alone picks badly: an over-confident model that classifies 12 of 13 validation
    series right can have a higher loss than the untrained model of the first epoch,
    and restoring "the best validation loss" then restores a model that has learnt
    nothing. `BestEpoch` ranks epochs by its monitored values in order: with the default
    `("val_accuracy", "val_loss")`, the highest validation accuracy, and among epochs
    with the same accuracy, the lowest validation loss. Whether higher or lower is better
    follows the name, as keras' `mode="auto"` does: names with `acc`, `auc`,
    `precision`, `recall`, `f1` or `iou` are maximised, all others minimised. Values
    missing from the epoch logs are skipped (a regression model has no accuracy: its
    epochs are ranked by loss alone); at least one must be there. A value counts as
    better only when it beats the best by more than `min_delta`; closer than that it is a
    tie, and the next value decides.

    Training stops after `patience` epochs without a better epoch, and at the end of
    training (stopped or not) the model gets the best epoch's weights back.

    Args:
        monitor: a log name or a list of them, compared in order. Defaults to
            `("val_accuracy", "val_loss")`.
        patience: int >= 1, epochs without a better epoch before training stops.
            Defaults to 40.
        min_delta: float >= 0, the least change that counts as better. Defaults to 0.
        restore_best_weights: bool, whether to set the best epoch's weights at the end
            of training. Defaults to True.
        verbose: bool, whether to print when training stops or weights are restored.

    Attributes:
        best_epoch: the (0-based) epoch ranked best, or None before any epoch ended.
        best: the monitored values of that epoch, a dict name -> value.
        stopped_epoch: the epoch at which training stopped, 0 if it ran to the end.

    Example:

    >>> import keras
    >>> import kfusion as kf
    >>> x, y = kf.datasets.sequence_classification(n=64, length=16, features=2)
    >>> model = kf.FusionModel(
    ...     inputs=keras.Input((16, 2), name="signal"),
    ...     branches=[kf.branches.CNN(filters=(8,))],
    ...     head=kf.heads.Classification(3),
    ... )
    >>> model.compile(optimizer="adam")
    >>> best = kf.callbacks.BestEpoch(patience=5)
    >>> _ = model.fit(x, y, validation_split=0.25, epochs=3, callbacks=[best], verbose=0)
    >>> sorted(best.best)
    ['val_accuracy', 'val_loss']
    """

    def __init__(
        self,
        monitor=("val_accuracy", "val_loss"),
        patience=40,
        min_delta=0.0,
        restore_best_weights=True,
        verbose=False,
    ):
        super().__init__()
        keys = (monitor,) if isinstance(monitor, str) else monitor
        if (
            not isinstance(keys, (list, tuple))
            or not keys
            or not all(isinstance(k, str) and k for k in keys)
        ):
            raise ValueError(
                "`monitor` must be a log name or a non-empty list of them. "
                f"Received: monitor={monitor!r}"
            )
        self.monitor = tuple(keys)
        self.patience = _checks.check_int("patience", patience)
        if (
            isinstance(min_delta, bool)
            or not isinstance(min_delta, (int, float))
            or not 0.0 <= min_delta < math.inf
        ):
            raise ValueError(f"`min_delta` must be a float >= 0. Received: min_delta={min_delta!r}")
        self.min_delta = float(min_delta)
        self.restore_best_weights = _checks.check_bool("restore_best_weights", restore_best_weights)
        self.verbose = _checks.check_bool("verbose", bool(verbose))

    def on_train_begin(self, logs=None):
        self.best_epoch = None
        self.best = None
        self.best_weights = None
        self.stopped_epoch = 0
        self._wait = 0

    def _better(self, values):
        """Whether `values` rank above the best so far (lexicographic, with min_delta)."""
        if self.best is None:
            return True
        for key, value in values.items():
            change = value - self.best[key]
            if not _higher_is_better(key):
                change = -change
            if change > self.min_delta:
                return True
            if change < -self.min_delta or change != change:  # worse, or inf - inf
                return False
        return False

    def _values(self, logs):
        values = {}
        for key in self.monitor:
            if key in logs and logs[key] is not None:
                value = _as_float(logs[key])
                values[key] = value if math.isfinite(value) else math.inf
        if not values:
            raise ValueError(
                f"BestEpoch monitors {list(self.monitor)}, but the epoch logs hold none of "
                f"them (they hold {sorted(logs)}). Pass validation data to `fit`, or "
                "monitor a value that `fit` logs."
            )
        for key, value in values.items():
            if value == math.inf and _higher_is_better(key):
                values[key] = -math.inf
        return values

    def on_epoch_end(self, epoch, logs=None):
        values = self._values(logs or {})
        if self.best is not None and set(values) != set(self.best):
            raise ValueError(
                f"BestEpoch saw {sorted(self.best)} in an earlier epoch's logs but "
                f"{sorted(values)} in epoch {epoch}'s: the monitored values must be logged "
                "every epoch."
            )
        if self._better(values):
            self.best, self.best_epoch, self._wait = values, epoch, 0
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
            return
        self._wait += 1
        if self._wait >= self.patience:
            self.stopped_epoch = epoch
            self.model.stop_training = True
            if self.verbose:
                print(f"Epoch {epoch + 1}: early stopping (best epoch {self.best_epoch + 1}).")

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self.best_weights is not None:
            self.model.set_weights(self.best_weights)
            if self.verbose:
                print(f"Restored the weights of epoch {self.best_epoch + 1}.")

    def get_config(self):
        return {
            "monitor": list(self.monitor),
            "patience": self.patience,
            "min_delta": self.min_delta,
            "restore_best_weights": self.restore_best_weights,
            "verbose": self.verbose,
        }
