import keras
import numpy as np

from kfusion.heads._base import (
    BaseHead,
    SparseCategoricalCrossentropyWithSmoothing,
    check_unit_interval,
)
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class Classification(BaseHead):
    """A single-label classification head on fused features.

    Optional ReLU hidden layers with dropout, then a linear output layer and, unless
    `from_logits=True`, the final activation (multinomial logistic regression, e.g. Bishop
    2006, *Pattern Recognition and Machine Learning*, ch. 4.3):

        h_0 = x;  h_i = dropout(relu(W_i h_{i-1} + b_i))
        binary (num_classes 1 or 2):  p = sigmoid(w . h + b)        one unit
        K > 2 classes:                 p = softmax(W h + b)          K units

    The output layer and its activation compute in float32 under mixed precision; hidden
    layers follow the dtype policy.

    `default_loss()` returns `BinaryCrossentropy` (binary; labels 0/1) or a sparse
    categorical cross-entropy (integer labels `0..K-1`), both aware of `from_logits` and
    `label_smoothing`. `default_metrics()` returns an accuracy named `"accuracy"` that fits
    the output: binary accuracy (threshold 0.5 on probabilities, 0 on logits) or sparse
    categorical accuracy.

    Args:
        num_classes: int >= 1. 1 or 2 gives a binary head with one sigmoid unit.
        hidden_units: int or list of ints, widths of optional ReLU hidden layers.
            Defaults to `()` (none).
        dropout: float in [0, 1). Dropout after each hidden layer, or on the input
            features when there is no hidden layer.
        from_logits: bool. If True the head returns logits (no final activation) and
            `default_loss()` / `default_metrics()` expect logits.
        label_smoothing: float in [0, 1). Label smoothing of `default_loss()`.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor of shape `(batch, D)`.
        training: bool, whether dropout is active.

    Returns:
        A float32 tensor of shape `(batch, 1)` (binary) or `(batch, num_classes)`:
        probabilities, or logits when `from_logits=True`.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import kfusion as kf
    >>> head = kf.heads.Classification(3, hidden_units=(8,))
    >>> probs = head(np.ones((4, 5), "float32"))
    >>> tuple(probs.shape), keras.backend.standardize_dtype(probs.dtype)
    ((4, 3), 'float32')
    >>> type(head.default_loss()).__name__
    'SparseCategoricalCrossentropy'
    >>> tuple(kf.heads.Classification(2)(np.ones((4, 5), "float32")).shape)
    (4, 1)
    """

    def __init__(
        self,
        num_classes,
        hidden_units=(),
        dropout=0.0,
        from_logits=False,
        label_smoothing=0.0,
        **kwargs,
    ):
        num_classes = _utils.check_int("num_classes", num_classes)
        from_logits = _utils.check_bool("from_logits", from_logits)
        label_smoothing = _utils.check_rate("label_smoothing", label_smoothing)
        binary = num_classes <= 2
        super().__init__(
            output_units=1 if binary else num_classes,
            hidden_units=hidden_units,
            dropout=dropout,
            **kwargs,
        )
        self.num_classes = num_classes
        self.from_logits = from_logits
        self.label_smoothing = label_smoothing
        self.binary = binary

    def _activate(self, logits):
        if self.from_logits:
            return logits
        if self.binary:
            return _utils.sigmoid_float32(logits)
        return _utils.softmax_float32(logits)

    def default_loss(self):
        """A fresh loss object for this head's output and labels."""
        if self.binary:
            return keras.losses.BinaryCrossentropy(
                from_logits=self.from_logits, label_smoothing=self.label_smoothing
            )
        if self.label_smoothing:
            return SparseCategoricalCrossentropyWithSmoothing(
                from_logits=self.from_logits, label_smoothing=self.label_smoothing
            )
        return keras.losses.SparseCategoricalCrossentropy(from_logits=self.from_logits)

    def _check_label_shape(self, y, name):
        # Binary (one sigmoid unit) or not, the labels hold one class id per row.
        if y.ndim not in (1, 2) or (y.ndim == 2 and y.shape[-1] != 1):
            raise ValueError(
                f"The labels {name} for head '{self.name}' (Classification, "
                f"num_classes={self.num_classes}) must be class ids of shape (batch,) or "
                f"(batch, 1). Received shape {y.shape}; for one-hot labels pass "
                f"`{name}.argmax(-1)`."
            )

    def _check_label_values(self, y, name):
        if self.binary:
            check_unit_interval(y, name, self)
            return
        low, high = y.min(), y.max()
        if low < 0 or high >= self.num_classes or (y != np.round(y)).any():
            raise ValueError(
                f"The labels {name} for head '{self.name}' (Classification, "
                f"num_classes={self.num_classes}) must be whole class ids in "
                f"[0, {self.num_classes}). Received values from {low} to {high}."
            )

    def default_metrics(self):
        """Fresh metric objects: `[accuracy]` matched to the output (binary or sparse)."""
        if self.binary:
            threshold = 0.0 if self.from_logits else 0.5
            return [keras.metrics.BinaryAccuracy(threshold=threshold, name="accuracy")]
        return [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]

    def get_config(self):
        return {
            **super().get_config(),
            "num_classes": self.num_classes,
            "from_logits": self.from_logits,
            "label_smoothing": self.label_smoothing,
        }
