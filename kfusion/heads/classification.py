import keras
import numpy as np

from kfusion import _checks
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
        labels: None, or the class labels in the user's own vocabulary (strings or
            numbers, all distinct), the label of class id `i` at index `i`. With labels,
            `num_classes` may be None (it is `len(labels)`); `FusionModel.fit` and
            `evaluate` take labels of the vocabulary's type (strings, say) and map them
            to ids (`encode`), and `FusionModel.predict_labels` answers in the
            vocabulary (`decode`). Class ids are still accepted as labels when the
            vocabulary holds strings.
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
    >>> named = kf.heads.Classification(labels=["cat", "dog"])
    >>> named.encode(["dog", "cat"]).tolist(), named.decode([1, 0]).tolist()
    ([1, 0], ['dog', 'cat'])
    """

    def __init__(
        self,
        num_classes=None,
        hidden_units=(),
        dropout=0.0,
        from_logits=False,
        label_smoothing=0.0,
        labels=None,
        **kwargs,
    ):
        labels = _check_vocabulary(labels)
        if num_classes is None and labels is not None:
            num_classes = len(labels)
        num_classes = _checks.check_int("num_classes", num_classes)
        if labels is not None and len(labels) != num_classes:
            raise ValueError(
                f"`labels` must hold one label per class ({num_classes}). "
                f"Received: labels={labels!r}"
            )
        from_logits = _checks.check_bool("from_logits", from_logits)
        label_smoothing = _checks.check_rate("label_smoothing", label_smoothing)
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
        self.labels = labels
        self.binary = binary

    # ------------------------------------------------------------------ labels
    def encode(self, y):
        """Class ids (int32 NumPy array) for labels `y` of this head's vocabulary.

        Without `labels`, or for numeric `y` when the vocabulary holds strings, `y` is
        returned as class ids unchanged (checked later against `num_classes`).

        Raises:
            ValueError: naming a label that is not in the vocabulary.
        """
        y = np.asarray(y)
        if not self._is_vocabulary_data(y):
            return y
        index = {label: i for i, label in enumerate(self.labels)}
        flat = y.reshape(-1)
        unknown = [v for v in dict.fromkeys(flat.tolist()) if v not in index]
        if unknown:
            raise ValueError(
                f"The labels hold {unknown[:5]!r}, not in the vocabulary of head "
                f"'{self.name}': labels={self.labels!r}."
            )
        return np.array([index[v] for v in flat.tolist()], dtype="int32").reshape(y.shape)

    def decode(self, ids):
        """The labels (NumPy array) of class ids; the ids themselves without `labels`."""
        ids = np.asarray(ids).astype("int64")
        if self.labels is None:
            return ids
        return np.asarray(self.labels, dtype=object if self._mixed_types() else None)[ids]

    def class_ids(self, outputs):
        """Class ids `(batch,)` from this head's outputs (probabilities or logits).

        Multiclass: the argmax. Binary (one unit): the output above the threshold (0.5
        on probabilities, 0 on logits), so a binary head never answers class 0 for
        every row as `argmax` over its single unit would.
        """
        outputs = np.asarray(outputs)
        if self.binary:
            threshold = 0.0 if self.from_logits else 0.5
            return (outputs.reshape(len(outputs), -1)[:, 0] > threshold).astype("int32")
        return outputs.argmax(-1).astype("int32")

    def _is_vocabulary_data(self, y):
        if self.labels is None:
            return False
        strings = all(isinstance(v, str) for v in self.labels)
        if y.dtype.kind in "USO":
            return True
        return not strings

    def _mixed_types(self):
        return len({type(v) for v in self.labels}) > 1

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
            "labels": None if self.labels is None else list(self.labels),
        }


def _check_vocabulary(labels):
    """A list of distinct str/int/float labels, or None; ValueError otherwise."""
    if labels is None:
        return None
    if isinstance(labels, np.ndarray):
        labels = labels.tolist()
    ok = isinstance(labels, (list, tuple)) and len(labels) >= 1
    ok = ok and all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in labels)
    if not ok or len(set(labels)) != len(labels):
        raise ValueError(
            "`labels` must be a non-empty list of distinct strings or numbers (the label of "
            f"class id i at index i). Received: labels={labels!r}"
        )
    return list(labels)
