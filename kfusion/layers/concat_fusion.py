import keras
from keras import ops

from kfusion import _checks, _quantization
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class ConcatFusion(keras.layers.Layer):
    """Fuses branch features by concatenation, optionally projected.

    The simplest fusion and a strong baseline ("early/late fusion by
    concatenation", e.g. Baltrusaitis et al. 2018, *Multimodal Machine
    Learning: A Survey and Taxonomy*):

        out = [h_1; h_2; ...; h_M]                      (units=None)
        out = dropout(activation(W [h_1; ...; h_M] + b))  (units given)

    Args:
        units: int or None. Width of the optional projection after the
            concatenation. `None` returns the plain concatenation.
        activation: activation of the projection (name or callable).
            Ignored when `units` is None. Defaults to `"relu"`.
        dropout: float in [0, 1). Dropout on the fused output.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a list or dict of at least two tensors of shape
            `(batch, d_m)`; widths may differ. Dicts are read in sorted key
            order.
        training: bool, whether dropout is active.

    Returns:
        A tensor of shape `(batch, units)` or `(batch, sum_m d_m)`.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> a, b = np.ones((2, 3), "float32"), np.ones((2, 5), "float32")
    >>> tuple(kf.layers.ConcatFusion()([a, b]).shape)
    (2, 8)
    >>> tuple(kf.layers.ConcatFusion(units=4)([a, b]).shape)
    (2, 4)
    """

    def __init__(self, units=None, activation="relu", dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        self.units = _checks.check_int("units", units, allow_none=True)
        self.activation = _checks.check_activation("activation", activation)
        self.dropout = _checks.check_rate("dropout", dropout)
        self.supports_masking = True
        self.projection = None
        if self.units is not None:
            self.projection = keras.layers.Dense(
                self.units,
                activation=self.activation,
                dtype=self.dtype_policy,
                name="projection",
            )
        self.dropout_layer = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="dropout"
        )

    def build(self, input_shape):
        shapes = _utils.flatten_shapes(input_shape, self.__class__.__name__)
        _utils.check_ranks(shapes, self.__class__.__name__, {2})
        total = sum(s[-1] for s in shapes)
        if self.projection is not None:
            self.projection.build((None, total))
        self.built = True

    def call(self, inputs, training=None, mask=None):
        items, _ = _utils.flatten_inputs(inputs, self.__class__.__name__)
        fused = ops.concatenate(items, axis=-1)
        if self.projection is not None:
            fused = self.projection(fused)
        return self.dropout_layer(fused, training=training)

    def compute_output_shape(self, input_shape):
        shapes = _utils.flatten_shapes(input_shape, self.__class__.__name__)
        width = self.units if self.units is not None else sum(s[-1] for s in shapes)
        return (shapes[0][0], width)

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        config = {
            **super().get_config(),
            "units": self.units,
            "activation": _checks.serialize_activation(self.activation),
            "dropout": self.dropout,
        }
        return _quantization.with_quantized_sublayers(self, config)
