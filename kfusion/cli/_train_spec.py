"""The training section of a `kfusion train` spec: read and checked before anything is built."""

import math
import os

from kfusion.cli._common import UserError

TRAIN_KEYS = (
    "optimizer",
    "learning_rate",
    "epochs",
    "batch_size",
    "validation_split",
    "seed",
    "label",
    "loss",
    "metrics",
    "recipe",
)
RECIPE_OPTIONS = ("name", "max_epochs", "patience")


def load_train_spec(path):
    from kfusion.models import _spec

    if not os.path.isfile(path):
        raise UserError(f"spec file not found: {path}")
    try:
        spec = _spec.load_spec(path)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    try:
        _spec.check_keys(spec, _spec.MODEL_KEYS + TRAIN_KEYS, f"spec {path}")
    except ValueError as e:
        raise UserError(str(e)) from None
    model_spec = {k: v for k, v in spec.items() if k in _spec.MODEL_KEYS}
    train = {k: v for k, v in spec.items() if k in TRAIN_KEYS}
    _check_train_settings(train, path)
    return model_spec, train


def _as_number(value, kind):
    """`value` as an int or a finite float, or None when it is not one.

    Numeric strings count: YAML reads `1e-3` (no dot) as a string.
    """
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    if kind is int:
        return int(number) if number.is_integer() else None
    return number


# Each numeric training setting: (int or float, the range it must be in, what it must be).
_TRAIN_NUMBERS = {
    "epochs": (int, lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "seed": (int, lambda v: v >= 0, "an integer >= 0"),
    "learning_rate": (float, lambda v: v > 0, "a number > 0"),
    "validation_split": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
}
_TRAIN_TYPES = {
    "label": (str, "the name of the label array or column"),
    "optimizer": ((str, dict), "an optimizer name or config"),
    "loss": ((str, dict, list), "a loss name (or a dict or list of them)"),
    "metrics": ((list, dict), "a list of metric names"),
    "recipe": ((str, dict), "a recipe name (small_data) or {name: small_data, ...}"),
}


def _check_train_settings(train, path):
    """Checks the training settings in place (numbers converted); UserError naming the key."""
    for key, value in train.items():
        if key in _TRAIN_NUMBERS:
            kind, in_range, expected = _TRAIN_NUMBERS[key]
            number = _as_number(value, kind)
            if number is not None and in_range(number):
                train[key] = number
                continue
        else:
            types, expected = _TRAIN_TYPES[key]
            if isinstance(value, types) and value != "":
                continue
        raise UserError(f"spec {path}: {key!r} must be {expected}; got {key}={value!r}")
    if "recipe" in train:
        train["recipe"] = _check_recipe(train["recipe"], path)


def _check_recipe(recipe, path):
    """The spec's `recipe` as `{name, options...}`; UserError naming what is wrong."""
    from kfusion.recipes import RECIPES

    entry = {"name": recipe} if isinstance(recipe, str) else dict(recipe)
    unknown = [k for k in entry if k not in RECIPE_OPTIONS]
    if unknown:
        raise UserError(
            f"spec {path}: unknown recipe option {unknown[0]!r}; options: {list(RECIPE_OPTIONS)}"
        )
    if entry.get("name") not in RECIPES:
        raise UserError(
            f"spec {path}: 'recipe' must name one of {list(RECIPES)}; got "
            f"name={entry.get('name')!r}"
        )
    for key, minimum in (("max_epochs", 1), ("patience", 4)):
        if key in entry:
            number = _as_number(entry[key], int)
            if number is None or number < minimum:
                raise UserError(
                    f"spec {path}: recipe {key!r} must be an integer >= {minimum}; "
                    f"got {key}={entry[key]!r}"
                )
            entry[key] = number
    return entry


def _names(value):
    """The strings in a loss/metrics setting (a name, or lists and dicts of them)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [name for item in value for name in _names(item)]
    return []


def check_compile_names(compile_kwargs, path):
    """UserError for a loss or metric name keras doesn't know (it would say so mid-`fit`)."""
    import keras

    # Names `compile` resolves itself from the labels and outputs.
    own = {"loss": ("crossentropy", "ce"), "metrics": ("accuracy", "acc")}
    get = {"loss": keras.losses.get, "metrics": keras.metrics.get}
    for key, value in compile_kwargs.items():
        for name in _names(value):
            if name.lower() in own[key]:
                continue
            try:
                get[key](name)
            except (ValueError, TypeError):
                raise UserError(
                    f"spec {path}: {key!r} names {name!r}, which keras does not know"
                ) from None
