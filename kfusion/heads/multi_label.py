import math
import numbers

import keras

from kfusion import _checks
from kfusion.heads._base import BaseHead, check_unit_interval
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class MultiLabel(BaseHead):
    """A multi-label classification head: one independent sigmoid per label.

    Each label is a separate binary decision (binary relevance, Tsoumakas & Katakis 2007,
    *Multi-Label Classification: An Overview*):

        h_0 = x;  h_i = dropout(relu(W_i h_{i-1} + b_i))
        p_l = sigmoid(w_l . h + b_l)          for l = 1..num_labels

    A label is predicted present when `p_l >= threshold`. The output layer and its sigmoid
    compute in float32 under mixed precision; hidden layers follow the dtype policy.

    `default_loss()` returns `BinaryCrossentropy` (targets are 0/1 matrices of shape
    `(batch, num_labels)`); `default_metrics()` returns binary accuracy at `threshold`
    (named `"accuracy"`) and a multi-label ROC AUC (named `"auc"`).

    Args:
        num_labels: int >= 1, the number of labels.
        threshold: float in (0, 1), the probability above which a label counts as present
            in the accuracy metric. Defaults to 0.5.
        hidden_units: int or list of ints, widths of optional ReLU hidden layers.
            Defaults to `()` (none).
        dropout: float in [0, 1). Dropout after each hidden layer, or on the input
            features when there is no hidden layer.
        from_logits: bool. If True the head returns logits (no sigmoid) and the default
            loss and metrics expect logits (the threshold is applied as `logit(threshold)`).
        label_smoothing: float in [0, 1). Label smoothing of `default_loss()`.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor of shape `(batch, D)`.
        training: bool, whether dropout is active.

    Returns:
        A float32 tensor of shape `(batch, num_labels)`: probabilities, or logits when
        `from_logits=True`.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> head = kf.heads.MultiLabel(5, threshold=0.3)
    >>> tuple(head(np.ones((4, 8), "float32")).shape)
    (4, 5)
    >>> [m.name for m in head.default_metrics()]
    ['accuracy', 'auc']
    """

    def __init__(
        self,
        num_labels,
        threshold=0.5,
        hidden_units=(),
        dropout=0.0,
        from_logits=False,
        label_smoothing=0.0,
        **kwargs,
    ):
        num_labels = _checks.check_int("num_labels", num_labels)
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, numbers.Real)
            or not 0.0 < float(threshold) < 1.0
        ):
            raise ValueError(
                f"`threshold` must be a float in (0, 1). Received: threshold={threshold!r}"
            )
        from_logits = _checks.check_bool("from_logits", from_logits)
        label_smoothing = _checks.check_rate("label_smoothing", label_smoothing)
        super().__init__(
            output_units=num_labels, hidden_units=hidden_units, dropout=dropout, **kwargs
        )
        self.num_labels = num_labels
        self.threshold = float(threshold)
        self.from_logits = from_logits
        self.label_smoothing = label_smoothing

    def _activate(self, logits):
        if self.from_logits:
            return logits
        return _utils.sigmoid_float32(logits)

    def default_loss(self):
        """A fresh `BinaryCrossentropy` for 0/1 label matrices."""
        return keras.losses.BinaryCrossentropy(
            from_logits=self.from_logits, label_smoothing=self.label_smoothing
        )

    def _check_label_values(self, y, name):
        check_unit_interval(y, name, self)

    def default_metrics(self):
        """Fresh metric objects: binary accuracy at `threshold` and multi-label AUC."""
        threshold = self.threshold
        if self.from_logits:
            threshold = math.log(threshold / (1.0 - threshold))
        return [
            keras.metrics.BinaryAccuracy(threshold=threshold, name="accuracy"),
            keras.metrics.AUC(
                multi_label=True,
                num_labels=self.num_labels,
                from_logits=self.from_logits,
                name="auc",
            ),
        ]

    def get_config(self):
        return {
            **super().get_config(),
            "num_labels": self.num_labels,
            "threshold": self.threshold,
            "from_logits": self.from_logits,
            "label_smoothing": self.label_smoothing,
        }
