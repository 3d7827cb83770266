"""Small registered layers the ensemble tools build their graphs from (private).

No `Lambda` layers: every ensemble is a functional model made of these and of the member
models, so it saves, loads with `safe_mode=True` and exports like any kfusion model.
"""

import copy
import math
import numbers

import keras
from keras import ops

from kfusion.ensemble import _common
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class EnsembleAverage(keras.layers.Layer):
    """Weighted average of M member outputs, fixed or learned, in one output space.

    Each input `y_m` is first brought into the averaging space (`mode`), then

        out = sum_m w_m * y_m,   w = coefficients              (learned=False)
        out = sum_m w_m * y_m,   w = softmax(v), v trainable   (learned=True)

    Averaging probabilities is soft voting; averaging logits (or `log p`) gives the
    normalised weighted geometric mean of the members' probabilities (a product of
    experts, Hinton 2002). The learned mix starts from `v = log(coefficients)`, i.e. from
    the fixed average.

    Args:
        coefficients: list of M non-negative floats summing to 1 (the fixed weights,
            or the start of the learned ones).
        learned: bool. True makes the weights trainable (softmax of M logits).
        mode: "probabilities" or "logits", the space the average is taken in and the
            output is in.
        input_spaces: list of M spaces ("probabilities", "logits", "values"), what each
            input holds. Values (regression) are averaged as they are.
        activation: "softmax" or "sigmoid", how logits map to probabilities.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a list of M tensors of the same shape `(batch, K)`.

    Returns:
        A tensor `(batch, K)` in the `mode` space (or values), in the layer's compute
        dtype (`average` makes it with `dtype="float32"`, like the heads). Conversions,
        the softmax of the learned weights and the sum compute in float32.

    Example:

    >>> import numpy as np
    >>> from kfusion.ensemble._layers import EnsembleAverage
    >>> layer = EnsembleAverage([0.25, 0.75], input_spaces=["probabilities"] * 2)
    >>> a, b = np.zeros((2, 3), "float32"), np.ones((2, 3), "float32")
    >>> np.asarray(layer([a, b]))[0].tolist()
    [0.75, 0.75, 0.75]
    """

    def __init__(
        self,
        coefficients,
        learned=False,
        mode="probabilities",
        input_spaces=None,
        activation="softmax",
        **kwargs,
    ):
        coefficients = _check_coefficients(coefficients)
        learned = _utils.check_bool("learned", learned)
        mode = _utils.check_choice("mode", mode, ("probabilities", "logits"))
        if input_spaces is None:
            input_spaces = [mode] * len(coefficients)
        if not isinstance(input_spaces, (list, tuple)) or len(input_spaces) != len(coefficients):
            raise ValueError(
                f"`input_spaces` must be a list of {len(coefficients)} spaces. "
                f"Received: input_spaces={input_spaces!r}"
            )
        for space in input_spaces:
            _utils.check_choice("input_spaces", space, _common.SPACES)
        activation = _utils.check_choice("activation", activation, _common.ACTIVATIONS)
        super().__init__(**kwargs)
        self.coefficients = coefficients
        self.learned = learned
        self.mode = mode
        self.input_spaces = list(input_spaces)
        self.activation = activation
        self.mix_logits = None

    def build(self, input_shape):
        shapes = _utils.flatten_shapes(input_shape, type(self).__name__, min_inputs=1)
        if len(shapes) != len(self.coefficients):
            raise ValueError(
                f"{type(self).__name__} '{self.name}' averages {len(self.coefficients)} "
                f"inputs. Received: {len(shapes)} inputs."
            )
        for shape in shapes[1:]:
            if tuple(shape[1:]) != tuple(shapes[0][1:]):
                raise ValueError(
                    f"{type(self).__name__} '{self.name}' needs inputs of one shape. "
                    f"Received shapes {shapes}."
                )
        if self.learned:
            start = [math.log(max(c, _common.EPSILON)) for c in self.coefficients]
            self.mix_logits = self.add_weight(
                shape=(len(self.coefficients),),
                initializer=keras.initializers.Constant(0.0),
                trainable=True,
                dtype="float32",
                name="mix_logits",
            )
            self.mix_logits.assign(ops.convert_to_tensor(start, "float32"))
        self.built = True

    def mixing_weights(self):
        """The weights `w` (float32, summing to 1) the layer averages with."""
        if self.learned:
            return _utils.softmax_float32(self.mix_logits)
        return ops.convert_to_tensor(self.coefficients, "float32")

    def call(self, inputs, training=None, mask=None):
        items, _ = _utils.flatten_inputs(inputs, type(self).__name__, min_inputs=1)
        weights = self.mixing_weights()
        total = None
        for m, (item, space) in enumerate(zip(items, self.input_spaces)):
            term = weights[m] * _common.to_space(item, space, self.mode, self.activation)
            total = term if total is None else total + term
        return ops.cast(total, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        shapes = _utils.flatten_shapes(input_shape, type(self).__name__, min_inputs=1)
        return tuple(shapes[0])

    def compute_output_spec(self, inputs, training=None, mask=None):
        items, _ = _utils.flatten_inputs(inputs, type(self).__name__, min_inputs=1)
        return keras.KerasTensor(tuple(items[0].shape), dtype=self.compute_dtype)

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "coefficients": list(self.coefficients),
            "learned": self.learned,
            "mode": self.mode,
            "input_spaces": list(self.input_spaces),
            "activation": self.activation,
        }


@keras.saving.register_keras_serializable(package="kfusion")
class FrozenMember(keras.layers.Layer):
    """Runs a frozen member model, always in inference mode.

    Keras passes an outer `fit`'s `training=True` to every nested model, whatever the
    nested call said. Wrapping a member in this layer keeps its dropout off and its
    BatchNormalization on the moving statistics while a mixing layer or a meta learner
    trains on top (`y = model(x, training=False)`), and freezes its weights.

    Args:
        model: a built `keras.Model`. It is set to `trainable=False`.
        **kwargs: base layer arguments (`name`, ...).

    Call arguments:
        inputs: what `model` takes.

    Returns:
        `model(inputs, training=False)`.

    Example:

    >>> import keras, numpy as np
    >>> from kfusion.ensemble._layers import FrozenMember
    >>> i = keras.Input((3,))
    >>> member = FrozenMember(keras.Model(i, keras.layers.Dropout(0.5)(i)))
    >>> x = np.ones((2, 3), "float32")
    >>> np.asarray(member(x, training=True)).tolist()
    [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    """

    def __init__(self, model, **kwargs):
        model = _common.check_model("model", model)
        super().__init__(**kwargs)
        self.model = model
        model.trainable = False
        # The setter is called directly: `self.trainable = False` is a no-op on TensorFlow
        # when the value does not change, and sub-layers need the flag too.
        keras.layers.Layer.trainable.fset(self, False)
        # The member is built, so every weight of this layer exists already.
        self.built = True

    def build(self, input_shape):
        self.built = True

    @property
    def metrics(self):
        # A compiled member's own metrics (its "loss" tracker, its compile metrics) are not
        # the ensemble's: listed here they would replace the ensemble's loss in `fit` logs
        # with the member's, never updated (Keras skips only nested models, not layers).
        return []

    def call(self, inputs, training=None):
        return self.model(inputs, training=False)

    def compute_output_shape(self, input_shape):
        return self.model.compute_output_shape(input_shape)

    def compute_output_spec(self, inputs, training=None):
        return self.model.compute_output_spec(inputs)

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        model = keras.saving.serialize_keras_object(self.model)
        # A frozen member never trains on its own: its compile state (optimizer, loss)
        # is not part of the ensemble.
        model.pop("compile_config", None)
        return {**super().get_config(), "model": model}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # `deserialize_keras_object` consumes the dict it reads: give it a copy.
        config["model"] = keras.saving.deserialize_keras_object(copy.deepcopy(config["model"]))
        return cls(**config)


def _check_coefficients(value):
    ok = isinstance(value, (list, tuple)) and len(value) > 0
    if ok:
        ok = all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
            for v in value
        )
    if ok:
        ok = abs(sum(float(v) for v in value) - 1.0) < 1e-5
    if not ok:
        raise ValueError(
            "`coefficients` must be a non-empty list of non-negative floats summing to 1. "
            f"Received: coefficients={value!r}"
        )
    return [float(v) for v in value]
