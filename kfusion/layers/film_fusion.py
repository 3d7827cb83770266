import numbers

import keras
from keras import ops

from kfusion import _checks, _quantization
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class FiLMFusion(keras.layers.Layer):
    """Feature-wise linear modulation: one branch conditions another.

    FiLM (Perez et al. 2018, *FiLM: Visual Reasoning with a General
    Conditioning Layer*) scales and shifts every feature of `h` by amounts
    predicted from a conditioning vector `c`:

        gamma = 1 + (W_g c + b_g)                           (d,)
        beta  = W_b c + b_b                                 (d,)
        out   = activation(gamma * h + beta)

    For a sequence `h` of shape `(T, d)` the same gamma and beta apply at every
    step. The `1 +` centres gamma on 1, so with the default (small, random)
    initialisation an untrained layer starts close to the identity.

    Args:
        condition: which of the two inputs is the conditioning vector `c`: an
            int index into the list (or into the sorted keys of a dict), one of
            -2, -1, 0, 1, or a dict key (str). Defaults to -1 (the last input).
        activation: activation applied to the modulated features (name or
            callable), or None for none. Defaults to None.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a list or dict of exactly two tensors: the features `h`,
            `(batch, d)` or `(batch, T, d)`, and the conditioning vector `c`,
            `(batch, d_c)`. Dicts are read in sorted key order.
        mask: None, or masks in the structure of `inputs`; the mask of `h` is
            passed on unchanged (each step is modulated independently).

    Returns:
        A tensor of the same shape as `h`, with `h`'s mask.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> h = np.ones((2, 7, 4), "float32")
    >>> c = np.ones((2, 3), "float32")
    >>> tuple(kf.layers.FiLMFusion()([h, c]).shape)
    (2, 7, 4)
    >>> tuple(kf.layers.FiLMFusion(condition="question")({"image": h, "question": c}).shape)
    (2, 7, 4)
    """

    def __init__(self, condition=-1, activation=None, **kwargs):
        super().__init__(**kwargs)
        if isinstance(condition, str):
            ok = len(condition) > 0
        else:
            ok = (
                isinstance(condition, numbers.Integral)
                and not isinstance(condition, bool)
                and -2 <= condition <= 1
            )
        if not ok:
            raise ValueError(
                "`condition` must be the index of the conditioning input among the two "
                "inputs (-2, -1, 0 or 1) or a dict key (a non-empty str). "
                f"Received: condition={condition!r}"
            )
        self.condition = condition if isinstance(condition, str) else int(condition)
        self.activation = _checks.check_activation("activation", activation)
        self.supports_masking = True
        # The widths of gamma and beta (d) are only known in build().
        self.gamma_dense = None
        self.beta_dense = None

    def _split(self, structure):
        """Returns `(h, c, h_index)` from two inputs, shapes or masks."""
        name = self.__class__.__name__
        items, keys = _utils.flatten_inputs(structure, name, min_inputs=2, max_inputs=2)
        if isinstance(self.condition, str):
            if keys is None:
                raise ValueError(
                    f"{name}: `condition` is a dict key, so the inputs must be a dict; "
                    f"got a list. Pass an int index instead. "
                    f"Received: condition={self.condition!r}"
                )
            if self.condition not in keys:
                raise ValueError(
                    f"{name}: `condition` must be one of the input keys {keys}. "
                    f"Received: condition={self.condition!r}"
                )
            c_index = keys.index(self.condition)
        else:
            c_index = self.condition % 2
        return items[1 - c_index], items[c_index], 1 - c_index

    def _shapes(self, input_shape):
        name = self.__class__.__name__
        _utils.flatten_shapes(input_shape, name, min_inputs=2, max_inputs=2)
        h_shape, c_shape, _ = self._split(input_shape)
        h_shape, c_shape = tuple(h_shape), tuple(c_shape)
        _utils.check_ranks([h_shape], name, {2, 3})
        if len(c_shape) != 2 or c_shape[-1] is None:
            raise ValueError(
                f"{name} expects the conditioning input to be a vector of shape "
                f"(batch, d_c) with known d_c. Received shape {c_shape}."
            )
        return h_shape, c_shape

    def build(self, input_shape):
        h_shape, c_shape = self._shapes(input_shape)
        _, _, h_index = self._split(input_shape)
        specs = [None, None]
        specs[h_index] = keras.InputSpec(min_ndim=2, max_ndim=3, axes={-1: h_shape[-1]})
        specs[1 - h_index] = keras.InputSpec(ndim=2, axes={-1: c_shape[-1]})
        self.input_spec = specs
        self.gamma_dense = keras.layers.Dense(h_shape[-1], dtype=self.dtype_policy, name="gamma")
        self.beta_dense = keras.layers.Dense(h_shape[-1], dtype=self.dtype_policy, name="beta")
        self.gamma_dense.build(c_shape)
        self.beta_dense.build(c_shape)
        self.built = True

    def call(self, inputs, training=None, mask=None):
        h, c, _ = self._split(inputs)
        gamma = 1.0 + self.gamma_dense(c)
        beta = self.beta_dense(c)
        if len(h.shape) == 3:
            gamma, beta = ops.expand_dims(gamma, 1), ops.expand_dims(beta, 1)
        out = gamma * h + beta
        if self.activation is not None:
            out = keras.activations.get(self.activation)(out)
        return out

    def compute_output_shape(self, input_shape):
        h_shape, _ = self._shapes(input_shape)
        return h_shape

    def compute_mask(self, inputs, mask=None):
        if mask is None:
            return None
        _, _, h_index = self._split(inputs)
        return _utils.flatten_masks(mask, 2)[h_index]

    def get_config(self):
        config = {
            **super().get_config(),
            "condition": self.condition,
            "activation": _checks.serialize_activation(self.activation),
        }
        return _quantization.with_quantized_sublayers(self, config)
