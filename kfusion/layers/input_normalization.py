import keras
import numpy as np
from keras import ops

from kfusion import _checks
from kfusion.layers import _utils

MODES = ("adapt", "series")


@keras.saving.register_keras_serializable(package="kfusion")
class InputNormalization(keras.layers.Layer):
    """Standardises a model's raw input inside the graph, masked steps left out.

    Two modes:

        "adapt":  z = (x - mu) / max(sigma, epsilon)     per feature (last axis)
        "series": z_{b,t,f} = (x_{b,t,f} - mu_{b,f}) / max(sigma_{b,f}, epsilon)

    `"adapt"` is feature standardisation with statistics `mu`, `sigma` of the training
    data, learned once by `adapt(data)` (as keras' `Normalization.adapt`) and stored as
    non-trainable weights, so a saved or exported model normalises raw inputs itself.
    Before `adapt` the layer is the identity. `"series"` is the per-series
    z-normalisation used throughout the UCR/UEA time-series literature (Dau et al. 2019,
    *The UCR Time Series Archive*): each sequence and channel is centred and scaled by
    its own mean and standard deviation over time; it needs no adapting.

    With a mask (a `(batch, T)` boolean mask from `keras.layers.Masking` or token
    padding), masked steps are left out of every statistic (of `adapt`'s and of each
    series') and set to zero in the output, and the mask passes on to the next layer:
    right-padding a sequence never changes the values of its valid steps. Statistics
    and arithmetic are float32, and so is the output, under mixed precision too (unless
    a `dtype` is given): the next layer casts it to its own compute dtype.

    Args:
        mode: `"adapt"` (statistics of the training data) or `"series"` (each sequence's
            own statistics; inputs of shape `(batch, T, F)` only).
        epsilon: float > 0, the smallest standard deviation divided by (a constant
            feature or series becomes zeros). Defaults to 1e-6.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a float tensor `(batch, ..., F)`; `(batch, T, F)` for `"series"`.
        mask: optional boolean `(batch, T)` mask of the valid steps.

    Returns:
        The standardised inputs, same shape, float32.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> x = np.random.default_rng(0).normal(5.0, 3.0, size=(64, 10, 2)).astype("float32")
    >>> norm = kf.layers.InputNormalization("adapt")
    >>> norm.adapt(x)
    >>> z = np.asarray(norm(x))
    >>> bool(abs(z.mean()) < 1e-4), bool(abs(z.std() - 1.0) < 1e-3)
    (True, True)
    >>> series = kf.layers.InputNormalization("series")
    >>> z = np.asarray(series(x))
    >>> bool(np.allclose(z.mean(axis=1), 0.0, atol=1e-5))
    True
    """

    def __init__(self, mode="adapt", epsilon=1e-6, **kwargs):
        # Raw inputs are read and standardised in float32 whatever the global policy (a
        # float16 cast first would overflow above 65504); the next layer casts the
        # standardised values to its own compute dtype.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.mode = _checks.check_choice("mode", mode, MODES)
        self.epsilon = _checks.check_positive_float("epsilon", epsilon)
        self.supports_masking = True

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if self.mode == "series" and len(input_shape) != 3:
            raise ValueError(
                f"InputNormalization(mode='series') normalises sequences of shape "
                f"(batch, T, F). Received input shape {input_shape}."
            )
        if len(input_shape) < 2 or input_shape[-1] is None:
            raise ValueError(
                "InputNormalization needs inputs of shape (batch, ..., F) with a known F. "
                f"Received input shape {input_shape}."
            )
        features = int(input_shape[-1])
        if self.mode == "adapt":
            self.mean = self.add_weight(
                shape=(features,),
                initializer="zeros",
                trainable=False,
                dtype="float32",
                name="mean",
            )
            self.variance = self.add_weight(
                shape=(features,),
                initializer="ones",
                trainable=False,
                dtype="float32",
                name="variance",
            )
            self.count = self.add_weight(
                shape=(),
                initializer="zeros",
                trainable=False,
                dtype="float32",
                name="count",
            )
        self.input_spec = keras.InputSpec(ndim=len(input_shape), axes={-1: features})
        self.built = True

    @property
    def adapted(self):
        """Whether `adapt` has set the statistics (always True in `"series"` mode)."""
        if self.mode == "series":
            return True
        return self.built and float(ops.convert_to_numpy(self.count)) > 0

    def adapt(self, data, mask=None):
        """Sets `"adapt"` mode's statistics from `data` (NumPy-like), masked steps left out.

        Args:
            data: array `(n, ..., F)`, the training inputs.
            mask: optional boolean array `(n, T)` (or the shape of `data` without its last
                axis), True on the steps to count.
        """
        if self.mode != "adapt":
            raise ValueError(
                f"Only mode='adapt' learns statistics; mode={self.mode!r} needs no adapt."
            )
        data = np.asarray(data, dtype="float64")
        if data.ndim < 2:
            raise ValueError(
                f"InputNormalization.adapt needs data of shape (n, ..., F). Received shape "
                f"{data.shape}."
            )
        if not self.built:
            self.build((None,) + data.shape[1:])
        rows = data.reshape(-1, data.shape[-1])
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != data.shape[:-1]:
                raise ValueError(
                    f"InputNormalization.adapt: the mask must have shape {data.shape[:-1]} "
                    f"(the data's without its last axis). Received mask shape {mask.shape}."
                )
            rows = rows[mask.reshape(-1)]
        if not len(rows) or not np.all(np.isfinite(rows)):
            raise ValueError(
                "InputNormalization.adapt needs at least one valid step of finite values. "
                f"Received {len(rows)} valid steps"
                + ("" if not len(rows) else " with non-finite values")
                + "."
            )
        self.mean.assign(rows.mean(axis=0).astype("float32"))
        self.variance.assign(rows.var(axis=0).astype("float32"))
        self.count.assign(np.float32(len(rows)))

    def call(self, inputs, mask=None):
        x = ops.cast(inputs, "float32")
        keep = _utils.step_mask(mask, "float32")
        if self.mode == "adapt":
            std = ops.sqrt(self.variance)
            z = (x - self.mean) / ops.maximum(std, self.epsilon)
        else:
            if keep is None:
                mean = ops.mean(x, axis=1, keepdims=True)
                var = ops.mean(ops.square(x - mean), axis=1, keepdims=True)
            else:
                count = ops.maximum(ops.sum(keep, axis=1, keepdims=True), 1.0)
                mean = ops.sum(x * keep, axis=1, keepdims=True) / count
                var = ops.sum(ops.square(x - mean) * keep, axis=1, keepdims=True) / count
            z = (x - mean) / ops.maximum(ops.sqrt(var), self.epsilon)
        if keep is not None:
            z = z * keep
        return ops.cast(z, self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "epsilon": self.epsilon}
