"""Small registered layers the ensemble tools build their graphs from (private).

No `Lambda` layers: every ensemble is a functional model made of these and of the member
models, so it saves, loads with `safe_mode=True` and exports like any kfusion model.
"""

import copy
import math
import numbers

import keras
import numpy as np
from keras import ops

from kfusion import _checks
from kfusion.ensemble import _common
from kfusion.layers import _utils

START_POINTS = ("average", "geometric")


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
        learned = _checks.check_bool("learned", learned)
        mode = _checks.check_choice("mode", mode, ("probabilities", "logits"))
        if input_spaces is None:
            input_spaces = [mode] * len(coefficients)
        if not isinstance(input_spaces, (list, tuple)) or len(input_spaces) != len(coefficients):
            raise ValueError(
                f"`input_spaces` must be a list of {len(coefficients)} spaces. "
                f"Received: input_spaces={input_spaces!r}"
            )
        for space in input_spaces:
            _checks.check_choice("input_spaces", space, _common.SPACES)
        activation = _checks.check_choice("activation", activation, _common.ACTIVATIONS)
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


@keras.saving.register_keras_serializable(package="kfusion")
class MetaLearner(keras.layers.Layer):
    """The default meta learner of `kf.ensemble.stack`: a Dense layer that starts at an average.

    The input is the concatenation `[y_1; ...; y_M]` of M member outputs `(batch, K)`
    each (the members' probabilities, logits or values, per `input_spaces`). With
    `l_m` each member's log-probabilities (softmax: `log p_m`, from probabilities as
    `log(clip(p_m, 1e-7, 1))`, from logits as `log_softmax(z_m)`; sigmoid: the logit
    `log p_m - log(1 - p_m)` of each unit) and the trainable `W` `(M K, K)` and `b`
    `(K,)`:

        start="average":    out = act(log(mean_m p_m) + [l_1; ...; l_M] W + b),  W = 0
        start="geometric":  out = act([l_1; ...; l_M] W + b),          W = [I; ...; I] / M
        regression:         out = [y_1; ...; y_M] W + b,               W = [I; ...; I] / M

    (`act` is softmax, or a sigmoid per unit with `log(mean p)` read as the logit of the
    mean; `b = 0` at the start). Before any training the first equals
    `kf.ensemble.average(models)` (soft voting), the second
    `kf.ensemble.average(models, mode="logits")` (the normalised geometric mean of the
    probabilities), the third the mean of the values. Either way this is multinomial
    logistic regression on the members' log-probabilities (Wolpert 1992; Breiman 1996)
    whose fit starts from the ensemble average instead of from random weights, so a few
    epochs of `fit` with Adam's default step improve on the average instead of having to
    rediscover it.

    Args:
        num_members: int >= 1, M.
        input_spaces: list of M spaces ("probabilities", "logits", "values"), what each
            member outputs. All "values" means regression.
        activation: "softmax" or "sigmoid" for classification (ignored for values).
        start: "average" or "geometric", the classifier's starting point (see above).
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a tensor `(batch, M K)`, the members' outputs concatenated.

    Returns:
        A tensor `(batch, K)`: probabilities (classification) or values (regression), in
        the layer's compute dtype; the conversions and the Dense compute in float32.

    Example:

    >>> import numpy as np
    >>> from kfusion.ensemble._layers import MetaLearner
    >>> layer = MetaLearner(2, input_spaces=["probabilities"] * 2)
    >>> p1 = np.array([[0.2, 0.8]], "float32")
    >>> p2 = np.array([[0.6, 0.4]], "float32")
    >>> out = np.asarray(layer(np.concatenate([p1, p2], -1)), "float64")
    >>> out.round(4).tolist()
    [[0.4, 0.6]]
    """

    def __init__(
        self, num_members, input_spaces=None, activation="softmax", start="average", **kwargs
    ):
        num_members = _checks.check_int("num_members", num_members)
        if input_spaces is None:
            input_spaces = ["probabilities"] * num_members
        if not isinstance(input_spaces, (list, tuple)) or len(input_spaces) != num_members:
            raise ValueError(
                f"`input_spaces` must be a list of {num_members} spaces. "
                f"Received: input_spaces={input_spaces!r}"
            )
        for space in input_spaces:
            _checks.check_choice("input_spaces", space, _common.SPACES)
        values = [space == "values" for space in input_spaces]
        if any(values) and not all(values):
            raise ValueError(
                "`input_spaces` mixes regression values with classifier outputs. "
                f"Received: input_spaces={list(input_spaces)!r}"
            )
        activation = _checks.check_choice("activation", activation, _common.ACTIVATIONS)
        start = _checks.check_choice("start", start, START_POINTS)
        super().__init__(**kwargs)
        self.num_members = num_members
        self.input_spaces = list(input_spaces)
        self.activation = activation
        self.start = start
        self.regression = all(values)
        self.units = None
        self.kernel = None
        self.bias = None

    def build(self, input_shape):
        width = input_shape[-1]
        if len(input_shape) != 2 or width is None or width % self.num_members:
            raise ValueError(
                f"{type(self).__name__} '{self.name}' takes the {self.num_members} members' "
                f"outputs concatenated, (batch, {self.num_members} * K). "
                f"Received: input_shape={tuple(input_shape)}"
            )
        units = width // self.num_members
        self.units = units
        if self.regression or self.start == "geometric":
            start = np.tile(np.eye(units, dtype="float32"), (self.num_members, 1))
            start /= self.num_members
        else:
            start = np.zeros((width, units), "float32")
        self.kernel = self.add_weight(
            shape=(width, units),
            initializer=keras.initializers.Constant(0.0),
            dtype="float32",
            name="kernel",
        )
        self.kernel.assign(start)
        self.bias = self.add_weight(
            shape=(units,), initializer="zeros", dtype="float32", name="bias"
        )
        self.built = True

    def call(self, inputs, training=None):
        x = ops.cast(inputs, "float32")
        # Variables read in float32 (a mixed policy would autocast them to float16).
        kernel, bias = ops.cast(self.kernel, "float32"), ops.cast(self.bias, "float32")
        if self.regression:
            return ops.cast(ops.matmul(x, kernel) + bias, self.compute_dtype)
        members = [x[:, m * self.units : (m + 1) * self.units] for m in range(self.num_members)]
        features = [self._log_probabilities(y, s) for y, s in zip(members, self.input_spaces)]
        z = ops.matmul(ops.concatenate(features, axis=-1), kernel) + bias
        if self.start == "average":
            probabilities = [
                _common.to_space(y, s, "probabilities", self.activation)
                for y, s in zip(members, self.input_spaces)
            ]
            mean = sum(probabilities[1:], probabilities[0]) / self.num_members
            z = z + _common.to_space(mean, "probabilities", "logits", self.activation)
        if self.activation == "softmax":
            out = ops.softmax(z, axis=-1)
        else:
            out = ops.sigmoid(z)
        return ops.cast(out, self.compute_dtype)

    def _log_probabilities(self, y, space):
        if space == "logits" and self.activation == "softmax":
            return ops.log_softmax(y, axis=-1)  # the logits up to a per-sample constant
        return _common.to_space(y, space, "logits", self.activation)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1] // self.num_members)

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "num_members": self.num_members,
            "input_spaces": list(self.input_spaces),
            "activation": self.activation,
            "start": self.start,
        }


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
