import math
import numbers

import keras

from kfusion import _checks
from kfusion.ensemble import _common
from kfusion.ensemble._layers import EnsembleAverage, FrozenMember

MODES = ("probabilities", "logits")


def average(models, weights=None, mode="probabilities", from_logits=None, name=None):
    """Averages the outputs of several models that take the same inputs (one graph).

    Model averaging (Breiman 1996, *Bagging predictors*; Dietterich 2000, *Ensemble
    methods in machine learning*): for members `f_1..f_M` and weights `w_m >= 0` with
    `sum_m w_m = 1`,

        mode="probabilities":  p(x) = sum_m w_m p_m(x)                    (soft voting)
        mode="logits":         z(x) = sum_m w_m z_m(x)                    (returns logits)

    Averaging logits is the normalised weighted geometric mean of the probabilities,
    `softmax(z) ~ prod_m p_m^{w_m}`. Members that output the other space are converted
    first (`p = softmax(z)` / `sigmoid(z)`, `z = log p` / `log p - log(1 - p)`), so
    `mode` only decides where the average is taken and what the ensemble returns.
    Regression members (a `Regression` head) are averaged as they are.

    What a member outputs follows the ensemble convention: a `FusionModel`'s head says
    (`from_logits=True` heads output logits); any other model is taken to output
    probabilities unless `from_logits=True` is passed.

    The result is one functional `keras.Model`: fresh `keras.Input`s like the first
    model's (same structure, names, shapes and dtypes), every member called on them, and
    an `EnsembleAverage` layer. It saves as `.keras` (loads with `safe_mode=True`) and
    exports like any model.

    `weights="learned"` learns the weights: `w = softmax(v)` with `v` trainable (starting
    at the uniform average); the members are frozen (`trainable=False`, and run in
    inference mode), so `fit` trains only the M mixing weights. Fit them on data the
    members did not train on. The members' own `trainable` flags are changed in place.

    Args:
        models: list of at least two built `keras.Model`s with the same inputs and one
            output of the same shape `(batch, K)`.
        weights: None (uniform), a list of M non-negative numbers (normalised to sum to
            1), or `"learned"`.
        mode: `"probabilities"` (default) or `"logits"`: the space averaged in, and
            what the ensemble returns.
        from_logits: None (each FusionModel's head decides; other models output
            probabilities), or a bool for every member.
        name: the ensemble model's name. Defaults to `"average_ensemble"`.

    Returns:
        A `keras.Model`. `model.get_layer("average").mixing_weights()` gives the weights.

    Raises:
        ValueError: for fewer than two models, models with different inputs or output
            shapes, weights of the wrong length, negative or all zero, an unknown
            `mode`.

    Example:

    >>> import keras, numpy as np
    >>> import kfusion as kf
    >>> def member(seed):
    ...     i = keras.Input((4,), name="x")
    ...     init = keras.initializers.GlorotUniform(seed)
    ...     return keras.Model(i, keras.layers.Dense(3, "softmax", kernel_initializer=init)(i))
    >>> models = [member(0), member(1)]
    >>> ensemble = kf.ensemble.average(models, weights=[1, 3])
    >>> x = np.random.default_rng(0).normal(size=(5, 4)).astype("float32")
    >>> p = ensemble.predict(x, verbose=0)
    >>> p.shape, bool(np.allclose(p.sum(-1), 1.0, atol=1e-5))
    ((5, 3), True)
    >>> learned = kf.ensemble.average(models, weights="learned")
    >>> learned.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    >>> [w.name for w in learned.trainable_weights]
    ['mix_logits']
    """
    models = _common.check_models(models)
    mode = _checks.check_choice("mode", mode, MODES)
    from_logits = _common.check_from_logits(from_logits)
    coefficients, learned = _check_weights(weights, len(models))
    _common.check_unique_names(models)
    _common.check_same_inputs(models)
    _common.check_same_outputs(models)
    kinds = [_common.output_kind(m, from_logits) for m in models]
    _check_kinds(kinds, models)
    activation = next((a for _, a in kinds if a is not None), "softmax")

    inputs = fresh_inputs(models[0])
    if learned:
        outputs = [FrozenMember(m, name=f"frozen_{m.name}")(inputs) for m in models]
    else:
        outputs = [m(inputs) for m in models]
    averaged = EnsembleAverage(
        coefficients,
        learned=learned,
        mode=mode,
        input_spaces=[space for space, _ in kinds],
        activation=activation,
        dtype="float32",
        name="average",
    )(outputs)
    return keras.Model(inputs, averaged, name=name or "average_ensemble")


def fresh_inputs(model):
    """New `keras.Input`s with the structure, names, shapes and dtypes of `model.input`."""

    def make(tensor):
        name = getattr(tensor, "name", None) or ""
        if name.startswith("keras_tensor"):
            name = ""
        return keras.Input(
            shape=tuple(tensor.shape[1:]),
            dtype=keras.backend.standardize_dtype(tensor.dtype),
            name=name or None,
        )

    structure = model.input
    if isinstance(structure, dict):
        return {
            key: keras.Input(
                shape=tuple(t.shape[1:]),
                dtype=keras.backend.standardize_dtype(t.dtype),
                name=key,
            )
            for key, t in structure.items()
        }
    return keras.tree.map_structure(make, structure)


def _check_weights(weights, count):
    """Returns `(coefficients summing to 1, learned)` or raises naming `weights`."""
    if weights is None:
        return [1.0 / count] * count, False
    if isinstance(weights, str):
        if weights == "learned":
            return [1.0 / count] * count, True
        raise ValueError(
            "`weights` must be None, a list of non-negative numbers or 'learned'. "
            f"Received: weights={weights!r}"
        )
    try:
        values = list(weights)
    except TypeError:
        values = None
    if values is None or not all(
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values
    ):
        raise ValueError(
            "`weights` must be None, a list of non-negative numbers or 'learned'. "
            f"Received: weights={weights!r}"
        )
    if len(values) != count:
        raise ValueError(
            f"`weights` must have one number per model ({count}). "
            f"Received: weights={weights!r} ({len(values)} numbers)"
        )
    if any(v < 0 for v in values):
        raise ValueError(f"`weights` must not be negative. Received: weights={weights!r}")
    total = float(sum(values))
    if total <= 0:
        raise ValueError(f"`weights` must not all be zero. Received: weights={weights!r}")
    return [float(v) / total for v in values], False


def _check_kinds(kinds, models):
    values = [k[0] == "values" for k in kinds]
    if any(values) and not all(values):
        raise ValueError(
            "`models` mixes regression models with classifiers: "
            + ", ".join(f"{m.name!r} outputs {k[0]}" for m, k in zip(models, kinds))
            + f". Received: models={[m.name for m in models]}"
        )
    activations = {k[1] for k in kinds if k[1] is not None}
    if len(activations) > 1:
        raise ValueError(
            "`models` mixes softmax and sigmoid classifiers. "
            f"Received: models={[m.name for m in models]}"
        )
