import copy

import keras
import numpy as np

from kfusion import _checks
from kfusion.ensemble import _common

METHODS = ("uniform", "greedy")
METRICS = ("accuracy", "mae", "mse")


def soup(models, x_val=None, y_val=None, method="uniform", metric="accuracy", from_logits=None):
    """Averages the weights of models with one architecture into one model (a model soup).

    Model soups (Wortsman et al. 2022, *Model soups: averaging weights of multiple
    fine-tuned models improves accuracy without increasing inference time*): models
    fine-tuned from the same starting weights often lie in one low-loss basin, so the
    average of their weights is itself a good model, with the cost of one model:

        uniform:  theta = (1 / M) sum_m theta_m
        greedy:   sort the models by validation score, best first; start the soup with
                  the best; add each next model only if the soup of the models so far
                  plus it scores at least as well on the validation data.

    The greedy soup never scores below the best single model on the validation data (it
    starts from it and never accepts a drop). Weight averaging only makes sense for
    models fine-tuned from one pretrained/shared initialisation; independently
    initialised models usually average into a poor model (use `kf.ensemble.average`).
    Every variable of the model is averaged (BatchNormalization statistics included);
    non-float state (e.g. seed counters) is taken from the first model.

    Args:
        models: list of built `keras.Model`s with the same architecture (same number of
            weights and the same shapes, in the same order).
        x_val: validation inputs; required for `method="greedy"`.
        y_val: validation targets; required for `method="greedy"`.
        method: `"uniform"` or `"greedy"`.
        metric: the validation score to maximise: `"accuracy"` (argmax, or a threshold
            for one output unit: 0.5 on probabilities, 0 on logits), `"mae"` or `"mse"`
            (lower is better; the negated error is maximised), or a callable
            `metric(y_true, y_pred) -> float`, higher is better, on NumPy arrays.
        from_logits: None or bool, what the models output (see `kf.ensemble.average`);
            used by `"accuracy"` on a single output unit.

    Returns:
        A new model: a copy of the first model (same class and config, compiled the same
        way if the first was compiled) holding the averaged weights.

    Raises:
        ValueError: for an empty list, architectures that differ, an unknown `method`
            or `metric`, or `method="greedy"` without validation data or with `x_val`
            and `y_val` of different lengths.

    Example:

    >>> import keras, numpy as np
    >>> import kfusion as kf
    >>> def model():
    ...     i = keras.Input((4,))
    ...     return keras.Model(i, keras.layers.Dense(2, "softmax")(i))
    >>> a, b = model(), model()
    >>> souped = kf.ensemble.soup([a, b])
    >>> kernel = souped.get_weights()[0]
    >>> bool(np.allclose(kernel, (a.get_weights()[0] + b.get_weights()[0]) / 2))
    True
    >>> x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    >>> y = np.random.default_rng(1).integers(0, 2, size=16)
    >>> greedy = kf.ensemble.soup([a, b], x, y, method="greedy")
    >>> greedy.predict(x, verbose=0).shape
    (16, 2)
    """
    models = _common.check_models(models, minimum=1)
    method = _checks.check_choice("method", method, METHODS)
    score_fn = _check_metric(metric)
    from_logits = _common.check_from_logits(from_logits)
    if method == "greedy":
        if x_val is None:
            raise ValueError("`method='greedy'` needs validation data. Received: x_val=None")
        if y_val is None:
            raise ValueError("`method='greedy'` needs validation data. Received: y_val=None")
        _check_same_rows(x_val, y_val)
    weights = [m.get_weights() for m in models]
    _check_same_architecture(models, weights)

    result = _copy_model(models[0])
    if method == "uniform":
        result.set_weights(_mean_weights(weights))
        return result

    kind = _output_kind(models[0], from_logits)
    y_val = np.asarray(y_val)

    def score(candidate):
        result.set_weights(candidate)
        pred = result.predict(x_val, verbose=0)
        return float(score_fn(y_val, pred, kind))

    scores = [score(w) for w in weights]
    order = sorted(range(len(models)), key=lambda i: -scores[i])
    ingredients = [weights[order[0]]]
    best = scores[order[0]]
    for index in order[1:]:
        trial = score(_mean_weights(ingredients + [weights[index]]))
        if trial >= best:
            ingredients.append(weights[index])
            best = trial
    result.set_weights(_mean_weights(ingredients))
    return result


def _check_same_rows(x_val, y_val):
    """Raises `ValueError` unless every array of `x_val` has as many rows as `y_val`."""
    rows = {len(item) for item in keras.tree.flatten(x_val) if np.ndim(item) >= 1}
    y_rows = len(y_val) if np.ndim(y_val) >= 1 else None
    if y_rows is not None and rows and rows != {y_rows}:
        raise ValueError(
            "`x_val` and `y_val` must have one row per validation sample. Received: "
            f"{sorted(rows)} row(s) in x_val and {y_rows} in y_val"
        )


def _check_metric(metric):
    if callable(metric):
        return lambda y, p, kind: metric(y, p)
    if metric == "accuracy":
        return lambda y, p, kind: _common.accuracy(y, _single(p), *kind)
    if metric == "mae":
        return lambda y, p, kind: -float(np.mean(np.abs(_single(p) - _like(y, p))))
    if metric == "mse":
        return lambda y, p, kind: -float(np.mean((_single(p) - _like(y, p)) ** 2))
    raise ValueError(
        f"`metric` must be one of {list(METRICS)} or a callable metric(y_true, y_pred) "
        f"(higher is better). Received: metric={metric!r}"
    )


def _single(pred):
    flat = keras.tree.flatten(pred)
    if len(flat) != 1:
        raise ValueError(
            "The built-in metrics score models with one output; pass a callable `metric` "
            f"for models with several. Received predictions with {len(flat)} outputs."
        )
    return np.asarray(flat[0], dtype="float64")


def _like(y, pred):
    y = np.asarray(y, dtype="float64")
    return y.reshape(_single(pred).shape)


def _output_kind(model, from_logits):
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) == 1 and len(outputs[0].shape) == 2:
        return _common.output_kind(model, from_logits)
    return ("probabilities", "softmax")


def _check_same_architecture(models, weights):
    first = [w.shape for w in weights[0]]
    for model, model_weights in zip(models[1:], weights[1:]):
        shapes = [w.shape for w in model_weights]
        if shapes != first:
            detail = (
                f"{len(first)} weights vs {len(shapes)}"
                if len(shapes) != len(first)
                else "weight shapes "
                + ", ".join(f"{a} vs {b}" for a, b in zip(first, shapes) if tuple(a) != tuple(b))
            )
            raise ValueError(
                "Every model in `models` must have the same architecture to be averaged. "
                f"Model {models[0].name!r} and model {model.name!r} differ ({detail}). "
                f"Received: models={[m.name for m in models]}"
            )


def _mean_weights(weight_lists):
    out = []
    for values in zip(*weight_lists):
        first = np.asarray(values[0])
        if np.issubdtype(first.dtype, np.floating):
            stacked = np.stack([np.asarray(v, dtype="float64") for v in values])
            out.append(stacked.mean(axis=0).astype(first.dtype))
        else:
            out.append(first.copy())
    return out


def _copy_model(model):
    """A new model of the same class and config (fresh weights), compiled like `model`."""
    config = keras.saving.serialize_keras_object(model)
    clone = keras.saving.deserialize_keras_object(copy.deepcopy(config))
    if not clone.built:
        clone.build(model.input_shape)
    if getattr(model, "compiled", False) and not getattr(clone, "compiled", False):
        compile_config = model.get_compile_config()
        if compile_config:
            clone.compile_from_config(compile_config)
    return clone
