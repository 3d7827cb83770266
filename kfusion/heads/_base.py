"""The contract every kfusion head follows (private base class) and the heads' private loss.

A head is a keras Layer that turns the fused features `(batch, D)` into predictions:

    x -> [Dense(h_i, relu) -> Dropout]* -> Dropout (only when there is no hidden layer)
      -> output Dense (float32) -> final activation (float32)

Hidden layers follow the layer's dtype policy; the output Dense and its activation always
compute in float32, so predictions and losses are float32 under mixed precision.

Subclasses pass `output_units` to `BaseHead.__init__` and implement:
- `_activate(logits)`: the final activation on float32 logits (identity for logits/regression).
- `default_loss()`: a fresh keras loss object for this head.
- `default_metrics()`: a list of fresh keras metric objects for this head.
- `_check_label_shape(y, name)` (optional): raise `ValueError` when the NumPy labels `y`
  don't have the shape `default_loss()` needs; the default asks for `(batch, output_units)`,
  or `(batch,)` too when `output_units == 1`.
- `_check_label_values(y, name)` (optional): raise `ValueError` when the NumPy labels `y`
  can't be targets of `default_loss()`; `check_labels` has already checked they are finite
  numbers of the right shape.
"""

import keras
import numpy as np
from keras import ops

from kfusion import _checks, _quantization


class BaseHead(keras.layers.Layer):
    """Base of all kfusion heads (see the module docstring for the contract)."""

    def __init__(self, output_units, hidden_units=(), dropout=0.0, **kwargs):
        hidden_units = _checks.check_int_tuple("hidden_units", hidden_units, allow_empty=True)
        dropout = _checks.check_rate("dropout", dropout)
        super().__init__(**kwargs)
        self.hidden_units = hidden_units
        self.dropout = dropout
        self.output_units = output_units
        self.supports_masking = True
        self.hidden_layers = [
            keras.layers.Dense(
                width, activation="relu", dtype=self.dtype_policy, name=f"hidden_{i}"
            )
            for i, width in enumerate(self.hidden_units)
        ]
        # One dropout after every hidden layer; with no hidden layer, one on the features.
        self.dropout_layers = [
            keras.layers.Dropout(self.dropout, dtype=self.dtype_policy, name=f"dropout_{i}")
            for i in range(max(1, len(self.hidden_units)))
        ]
        self.output_layer = keras.layers.Dense(
            output_units, dtype=_quantization.float32_policy(self.dtype_policy), name="output"
        )
        if not self.trainable:
            # Sub-layers made after `Layer.__init__` do not inherit `trainable=False`;
            # the setter is called directly because `self.trainable = False` is a no-op
            # on TensorFlow when the value does not change.
            keras.layers.Layer.trainable.fset(self, False)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 2 or input_shape[-1] is None:
            raise ValueError(
                f"{type(self).__name__} head '{self.name}' expects fused features of shape "
                f"(batch, D) with a known D. Received input shape {input_shape}."
            )
        shape = input_shape
        for dense in self.hidden_layers:
            dense.build(shape)
            shape = (shape[0], dense.units)
        self.output_layer.build(shape)
        self.built = True

    def call(self, inputs, training=None, mask=None):
        x = inputs
        for dense, drop in zip(self.hidden_layers, self.dropout_layers):
            x = drop(dense(x), training=training)
        if not self.hidden_layers:
            x = self.dropout_layers[0](x, training=training)
        logits = self.output_layer(x)
        return self._activate(logits)

    def _activate(self, logits):
        return logits

    def compute_output_shape(self, input_shape):
        return (tuple(input_shape)[0], self.output_units)

    def compute_output_spec(self, inputs, training=None, mask=None):
        return keras.KerasTensor(self.compute_output_shape(inputs.shape), dtype="float32")

    def compute_mask(self, inputs, mask=None):
        return None

    def default_loss(self):
        raise NotImplementedError

    def default_metrics(self):
        raise NotImplementedError

    def check_labels(self, y, name="y"):
        """Raises `ValueError` naming `name` when labels can't be `default_loss()` targets.

        Checks NumPy arrays and nested lists (datasets and backend tensors are left to
        keras): the labels must be finite numbers of the shape the head's output needs
        (`(batch, units)`, or `(batch,)` for one output), and each head checks their values
        (class ids in range for `Classification`, values in [0, 1] for `MultiLabel`).

        Args:
            y: the labels passed to `fit` or `evaluate`.
            name: how the error message names them.
        """
        if not isinstance(y, (np.ndarray, list)):
            return
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise ValueError(
                f"The labels {name} for head '{self.name}' must be numbers. "
                f"Received an array of dtype {y.dtype} and shape {y.shape}."
            )
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            raise ValueError(
                f"The labels {name} for head '{self.name}' must be finite; "
                f"{int((~np.isfinite(y)).sum())} of {y.size} are NaN or infinite."
            )
        self._check_label_shape(y, name)
        if y.size:
            self._check_label_values(y, name)

    def _check_label_shape(self, y, name):
        units = self.output_units
        if (y.ndim == 2 and y.shape[-1] == units) or (units == 1 and y.ndim == 1):
            return
        expected = f"(batch, {units})" + (" or (batch,)" if units == 1 else "")
        raise ValueError(
            f"The labels {name} for head '{self.name}' ({type(self).__name__}) must have "
            f"shape {expected}, one column per output. Received shape {y.shape}."
        )

    def _check_label_values(self, y, name):
        return None

    def get_config(self):
        config = {
            **super().get_config(),
            "hidden_units": list(self.hidden_units),
            "dropout": self.dropout,
        }
        # Quantized sub-layers (model.quantize) are rebuilt quantized when loaded.
        return _quantization.with_quantized_sublayers(self, config)


def check_unit_interval(y, name, head):
    """Raises `ValueError` unless every label in `y` is in [0, 1] (0/1 or soft targets)."""
    low, high = y.min(), y.max()
    if low < 0 or high > 1:
        raise ValueError(
            f"The labels {name} for head '{head.name}' ({type(head).__name__}) must be in "
            f"[0, 1] (0/1 or soft targets). Received values from {low} to {high}."
        )


@keras.saving.register_keras_serializable(package="kfusion")
class SparseCategoricalCrossentropyWithSmoothing(keras.losses.Loss):
    """Cross-entropy for integer labels with label smoothing.

    `keras.losses.SparseCategoricalCrossentropy` has no `label_smoothing`; this loss one-hot
    encodes the integer labels and uses `keras.losses.categorical_crossentropy`, so the
    smoothed target is `(1 - s) * one_hot(y) + s / K` for K classes.
    """

    def __init__(
        self,
        from_logits=False,
        label_smoothing=0.0,
        reduction="sum_over_batch_size",
        name="sparse_categorical_crossentropy",
        dtype=None,
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self.from_logits = from_logits
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.convert_to_tensor(y_true)
        if len(y_true.shape) == len(y_pred.shape):
            y_true = ops.squeeze(y_true, axis=-1)
        one_hot = ops.one_hot(ops.cast(y_true, "int32"), y_pred.shape[-1], dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(
            one_hot,
            y_pred,
            from_logits=self.from_logits,
            label_smoothing=self.label_smoothing,
        )

    def get_config(self):
        config = super().get_config()
        config.update(from_logits=self.from_logits, label_smoothing=self.label_smoothing)
        return config
