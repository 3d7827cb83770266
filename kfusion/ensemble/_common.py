"""Helpers shared by the ensemble tools (private): model checks and output conventions.

Output convention (used by `average`, `stack`, `soup` and `Distiller`): a classifier's
output is either probabilities or logits.

- A `FusionModel` (any model with a kfusion `head`) says it itself: a `Classification` or
  `MultiLabel` head returns logits when `from_logits=True`, probabilities otherwise; a
  `Regression` head returns plain values.
- Any other model is taken to return probabilities (softmax over the last axis, or one
  sigmoid per unit when the output has width 1), unless the caller passes
  `from_logits=True`.
- An explicit `from_logits=True/False` applies to every model and overrides the heads.
"""

import keras
import numpy as np
from keras import ops

from kfusion.heads import Classification, MultiLabel, Regression

SPACES = ("probabilities", "logits", "values")
ACTIVATIONS = ("softmax", "sigmoid")
EPSILON = 1e-7


def check_model(name, value):
    """A built keras Model, or `ValueError` naming the argument."""
    if not isinstance(value, keras.Model):
        raise ValueError(f"`{name}` must be a keras.Model. Received: {name}={value!r}")
    if not value.built:
        raise ValueError(
            f"`{name}` must be a built keras.Model (call or fit it first). "
            f"Received: {name}={value.name!r} (not built)"
        )
    return value


def check_models(models, minimum=2, name="models"):
    """A list of at least `minimum` keras Models, or `ValueError` naming `models`."""
    if isinstance(models, keras.Model) or not isinstance(models, (list, tuple)):
        raise ValueError(
            f"`{name}` must be a list of at least {minimum} keras.Model. "
            f"Received: {name}={models!r}"
        )
    if len(models) < minimum:
        raise ValueError(
            f"`{name}` must hold at least {minimum} keras.Model. "
            f"Received: {name}={_names(models)} ({len(models)} model(s))"
        )
    for i, model in enumerate(models):
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"`{name}` must hold keras.Model instances; item {i} is not one. "
                f"Received: {name}[{i}]={model!r}"
            )
        if not model.built:
            raise ValueError(
                f"`{name}` must hold built models (call or fit them first); "
                f"model {model.name!r} is not built. Received: {name}={_names(models)}"
            )
    return list(models)


def check_unique_names(models, name="models"):
    """Raises `ValueError` when two models share a name (one graph needs unique names)."""
    names = _names(models)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(
            f"Every model in `{name}` needs its own name (and a model may appear once); "
            f"{repeated} appear(s) more than once. Received: {name}={names}"
        )


def _names(models):
    return [getattr(m, "name", repr(m)) for m in models]


def input_signature(model):
    """The model's input structure with `(shape, dtype)` leaves (batch axis dropped)."""
    return keras.tree.map_structure(
        lambda t: (tuple(t.shape[1:]), keras.backend.standardize_dtype(t.dtype)),
        model.input,
    )


def check_same_inputs(models, name="models"):
    """Raises `ValueError` unless every model takes the first model's input structure."""
    first = _signature_text(models[0])
    for model in models[1:]:
        if _signature_text(model) != first:
            raise ValueError(
                f"Every model in `{name}` must take the same inputs. Model "
                f"{models[0].name!r} takes {first}, model {model.name!r} takes "
                f"{_signature_text(model)}. Received: {name}={_names(models)}"
            )


def _signature_text(model):
    signature = input_signature(model)
    if isinstance(signature, dict):
        return "{" + ", ".join(f"{k!r}: {signature[k]}" for k in sorted(signature)) + "}"
    return str(signature)


def single_output(model, name="models"):
    """The model's one output tensor of shape `(batch, K)`, or `ValueError`."""
    outputs = model.outputs
    if len(outputs) != 1 or len(outputs[0].shape) != 2 or outputs[0].shape[-1] is None:
        shapes = [tuple(t.shape) for t in outputs]
        raise ValueError(
            f"Every model in `{name}` must return one tensor of shape (batch, K). Model "
            f"{model.name!r} returns {shapes}. Received: {name}=[..., {model.name!r}, ...]"
        )
    return outputs[0]


def check_same_outputs(models, name="models"):
    """Raises `ValueError` unless every model returns one `(batch, K)` tensor, same K."""
    first = tuple(single_output(models[0], name).shape[1:])
    for model in models[1:]:
        shape = tuple(single_output(model, name).shape[1:])
        if shape != first:
            raise ValueError(
                f"Every model in `{name}` must return the same output shape. Model "
                f"{models[0].name!r} returns (None, {first[0]}), model {model.name!r} "
                f"returns (None, {shape[0]}). Received: {name}={_names(models)}"
            )


def check_from_logits(value):
    if value is not None and not isinstance(value, bool):
        raise ValueError(
            f"`from_logits` must be None, True or False. Received: from_logits={value!r}"
        )
    return value


def output_kind(model, from_logits=None):
    """`(space, activation)` of a model's single output (see the module docstring).

    `space` is "probabilities", "logits" or "values" (regression); `activation` is
    "softmax" or "sigmoid" (the function that maps the logits to the probabilities),
    None for values.
    """
    width = model.outputs[0].shape[-1]
    head = getattr(model, "head", None)
    if isinstance(head, Regression):
        return "values", None
    if isinstance(head, Classification):
        activation = "sigmoid" if head.binary else "softmax"
        head_logits = head.from_logits
    elif isinstance(head, MultiLabel):
        activation = "sigmoid"
        head_logits = head.from_logits
    else:
        activation = "sigmoid" if width == 1 else "softmax"
        head_logits = False
    logits = head_logits if from_logits is None else from_logits
    return ("logits" if logits else "probabilities"), activation


def to_space(x, space, target, activation):
    """Converts `x` from `space` to `target` ("probabilities"/"logits"), in float32.

    Probabilities become logits as `log p` (softmax; equal to the logits up to a constant
    per sample, which softmax ignores) or `log p - log(1 - p)` (sigmoid), clipped to
    `[EPSILON, 1]` so saturated probabilities stay finite.
    """
    x = ops.cast(x, "float32")
    if space == target or space == "values" or target == "values":
        return x
    if target == "probabilities":
        return ops.softmax(x, axis=-1) if activation == "softmax" else ops.sigmoid(x)
    p = ops.clip(x, EPSILON, 1.0)
    if activation == "softmax":
        return ops.log(p)
    return ops.log(p) - ops.log(ops.clip(1.0 - x, EPSILON, 1.0))


def log_probabilities(x, space, activation, temperature=1.0):
    """Per-class log-probabilities at `temperature`, for the KL of distillation.

    softmax: `log_softmax(z / T)` over the last axis, with `z` the logits (or `log p`).
    sigmoid: each unit is a 2-class distribution with logits `[0, z]`, so the result has a
    trailing axis of size 2 (`log_softmax([0, z] / T)`).
    """
    z = to_space(x, space, "logits", activation) / temperature
    if activation == "sigmoid":
        z = ops.stack([ops.zeros_like(z), z], axis=-1)
    return ops.log_softmax(z, axis=-1)


def accuracy(y_true, y_pred, space, activation):
    """Accuracy of NumPy predictions: argmax (softmax) or a threshold per unit (sigmoid)."""
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred, dtype="float64")
    if activation == "softmax" and y_pred.shape[-1] > 1:
        labels = np.argmax(y_pred, axis=-1)
        if y_true.ndim == y_pred.ndim and y_true.shape[-1] == y_pred.shape[-1]:
            y_true = np.argmax(y_true, axis=-1)  # one-hot targets
        return float(np.mean(labels == y_true.reshape(labels.shape)))
    threshold = 0.0 if space == "logits" else 0.5
    labels = (y_pred > threshold).astype("int64")
    return float(np.mean(labels == y_true.reshape(labels.shape)))


def predicted_labels(y_pred, space):
    """Class labels from NumPy predictions `(n, K)`: argmax, or a threshold when K = 1."""
    y_pred = np.asarray(y_pred, dtype="float64")
    if y_pred.shape[-1] > 1:
        return np.argmax(y_pred, axis=-1)
    threshold = 0.0 if space == "logits" else 0.5
    return (y_pred[:, 0] > threshold).astype("int64")
