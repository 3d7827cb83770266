import keras

from kfusion import _checks
from kfusion.heads._base import BaseHead


@keras.saving.register_keras_serializable(package="kfusion")
class Regression(BaseHead):
    """A regression head: optional ReLU hidden layers and a linear output.

    Least-squares regression on the fused features (e.g. Hastie, Tibshirani & Friedman
    2009, *The Elements of Statistical Learning*, ch. 3):

        h_0 = x;  h_i = dropout(relu(W_i h_{i-1} + b_i))
        y_hat = W h + b                       (units outputs, no activation)

    The output layer computes in float32 under mixed precision; hidden layers follow the
    dtype policy. `default_loss()` returns `MeanSquaredError`; `default_metrics()` returns
    mean absolute error (`"mae"`) and root mean squared error (`"rmse"`).

    Args:
        units: int >= 1, the number of regression targets. Defaults to 1.
        hidden_units: int or list of ints, widths of optional ReLU hidden layers.
            Defaults to `()` (none).
        dropout: float in [0, 1). Dropout after each hidden layer, or on the input
            features when there is no hidden layer.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: float tensor of shape `(batch, D)`.
        training: bool, whether dropout is active.

    Returns:
        A float32 tensor of shape `(batch, units)`.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> head = kf.heads.Regression(2, hidden_units=(16,), dropout=0.1)
    >>> tuple(head(np.ones((4, 8), "float32")).shape)
    (4, 2)
    >>> [m.name for m in head.default_metrics()]
    ['mae', 'rmse']
    """

    def __init__(self, units=1, hidden_units=(), dropout=0.0, **kwargs):
        units = _checks.check_int("units", units)
        super().__init__(output_units=units, hidden_units=hidden_units, dropout=dropout, **kwargs)
        self.units = units

    def default_loss(self):
        """A fresh `MeanSquaredError` loss."""
        return keras.losses.MeanSquaredError()

    def default_metrics(self):
        """Fresh metric objects: mean absolute error and root mean squared error."""
        return [
            keras.metrics.MeanAbsoluteError(name="mae"),
            keras.metrics.RootMeanSquaredError(name="rmse"),
        ]

    def get_config(self):
        return {**super().get_config(), "units": self.units}
