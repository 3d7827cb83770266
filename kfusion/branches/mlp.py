import keras

from kfusion import _checks
from kfusion.branches._base import BaseBranch

_NORMS = ("batch", "layer", None)


@keras.saving.register_keras_serializable(package="kfusion")
class MLP(BaseBranch):
    """A multi-layer perceptron branch for tabular vectors.

    Each hidden layer computes `h = dropout(act(norm(W h + b)))`; the classic feed-forward
    network (Rumelhart et al. 1986) with batch normalisation (Ioffe & Szegedy 2015) or
    layer normalisation (Ba et al. 2016) where asked.

    Args:
        units: int or list of ints, the width of each hidden layer. Defaults to `(64,)`.
        activation: activation of the hidden layers. Defaults to `"relu"`.
        dropout: float in [0, 1), dropout after each hidden layer.
        normalization: `"batch"`, `"layer"` or None, applied before the activation.
        output_dim: int or None, width of a final linear projection.
        pooling: accepted for a uniform branch API; vectors have no steps to pool, so it
            has no effect.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor of shape `(batch, F)`.
        training: bool, whether dropout and batch normalisation run in training mode.

    Returns:
        A tensor of shape `(batch, units[-1])` or `(batch, output_dim)`.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> mlp = kf.branches.MLP(units=(32, 16), dropout=0.1)
    >>> tuple(mlp(np.ones((4, 10), "float32")).shape)
    (4, 16)
    """

    name_prefix = "mlp_branch"
    kinds = ("vectors",)

    def __init__(
        self,
        units=(64,),
        activation="relu",
        dropout=0.0,
        normalization=None,
        output_dim=None,
        pooling="mean",
        **kwargs,
    ):
        super().__init__(pooling=pooling, output_dim=output_dim, **kwargs)
        self.units = _checks.check_int_tuple("units", units)
        self.activation = _checks.check_activation("activation", activation)
        self.dropout = _checks.check_rate("dropout", dropout)
        self.normalization = _checks.check_choice("normalization", normalization, _NORMS)
        self.dense_layers = []
        self.norm_layers = []
        self.dropout_layers = []
        for i, width in enumerate(self.units):
            self.dense_layers.append(
                keras.layers.Dense(width, dtype=self.dtype_policy, name=f"dense_{i}")
            )
            if self.normalization == "batch":
                norm = keras.layers.BatchNormalization(dtype=self.dtype_policy, name=f"norm_{i}")
            elif self.normalization == "layer":
                norm = keras.layers.LayerNormalization(dtype=self.dtype_policy, name=f"norm_{i}")
            else:
                norm = None
            self.norm_layers.append(norm)
            self.dropout_layers.append(
                keras.layers.Dropout(self.dropout, dtype=self.dtype_policy, name=f"dropout_{i}")
            )
        self.activation_layer = keras.layers.Activation(
            self.activation or "linear", dtype=self.dtype_policy, name="activation"
        )

    def _build_body(self, kind, shape):
        shape = tuple(shape)
        for dense, norm in zip(self.dense_layers, self.norm_layers):
            dense.build(shape)
            shape = shape[:-1] + (dense.units,)
            if norm is not None:
                norm.build(shape)

    def _call_body(self, x, mask, kind, training):
        for dense, norm, drop in zip(self.dense_layers, self.norm_layers, self.dropout_layers):
            x = dense(x)
            if norm is not None:
                x = norm(x, training=training)
            x = self.activation_layer(x)
            x = drop(x, training=training)
        return x, None

    def _body_output_shape(self, kind, shape):
        return tuple(shape[:-1]) + (self.units[-1],)

    def get_config(self):
        return {
            **super().get_config(),
            "units": list(self.units),
            "activation": _checks.serialize_activation(self.activation),
            "dropout": self.dropout,
            "normalization": self.normalization,
        }
