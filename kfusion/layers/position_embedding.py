import keras
from keras import ops

from kfusion import _checks
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class PositionEmbedding(keras.layers.Layer):
    """Adds a learned position embedding to a sequence.

    Learned absolute positions, as in BERT (Devlin et al. 2019) and ViT
    (Dosovitskiy et al. 2021), instead of the fixed sinusoids of Vaswani et
    al. 2017. With a table `P` of shape `(max_length, d)`:

        out[b, t] = x[b, t] + P[t]        for t < T

    Sequences of any length `T <= max_length` share the first `T` rows of
    the table.

    Args:
        max_length: int >= 1. Longest sequence the layer accepts (rows of the
            table).
        initializer: initializer of the table (name, instance or config).
            Defaults to `"glorot_uniform"`.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a tensor of shape `(batch, T, d)`; `T` may be unknown until
            call time and must then be at most `max_length`. A statically
            known `T > max_length` raises `ValueError` when the layer is
            built or called.
        mask: the keras mask of `inputs` (passed by keras).

    Returns:
        A tensor of shape `(batch, T, d)`. The input mask is passed on.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> x = np.zeros((2, 5, 8), "float32")
    >>> layer = kf.layers.PositionEmbedding(max_length=16)
    >>> tuple(layer(x).shape)
    (2, 5, 8)
    >>> tuple(layer.embeddings.shape)
    (16, 8)
    """

    def __init__(self, max_length, initializer="glorot_uniform", **kwargs):
        max_length = _checks.check_int("max_length", max_length)
        initializer = _checks.check_initializer("initializer", initializer)
        super().__init__(**kwargs)
        self.max_length = max_length
        self.initializer = initializer
        self.supports_masking = True
        self.embeddings = None

    def _check_length(self, length):
        if length is not None and length > self.max_length:
            raise ValueError(
                f"{self.__class__.__name__} got a sequence longer than its table. "
                f"Received: length={length}, max_length={self.max_length}"
            )

    def build(self, input_shape):
        name = self.__class__.__name__
        input_shape = tuple(input_shape)
        _utils.check_ranks([input_shape], name, {3})
        self._check_length(input_shape[1])
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: input_shape[-1]})
        self.embeddings = self.add_weight(
            shape=(self.max_length, input_shape[-1]),
            initializer=keras.initializers.get(self.initializer),
            name="embeddings",
        )
        self.built = True

    def call(self, inputs, mask=None):
        # A built layer may get longer sequences later: check the static length again.
        self._check_length(inputs.shape[1])
        shape = ops.shape(inputs)
        table = ops.convert_to_tensor(self.embeddings)
        table = ops.slice(table, (0, 0), (shape[1], shape[2]))
        return inputs + ops.cast(ops.expand_dims(table, 0), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        return {
            **super().get_config(),
            "max_length": self.max_length,
            "initializer": keras.initializers.serialize(keras.initializers.get(self.initializer)),
        }
