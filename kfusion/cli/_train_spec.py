"""The spec `kfusion train` reads: read and checked before anything is built.

`read_spec` needs neither Keras nor TensorFlow (a malformed spec is answered at once);
`check_with_keras` checks the names only Keras can resolve (optimizer, loss, metrics) and
the recipe, still before the model is built.
"""

import difflib
import json
import math
import os
import re

from kfusion.cli._common import UserError

# The model's spec keys: `kfusion.models._spec.MODEL_KEYS` (a test checks they agree),
# repeated here so that the spec is checked before Keras loads.
MODEL_KEYS = (
    "inputs",
    "branches",
    "fusion",
    "head",
    "name",
    "fusion_units",
    "branch_dropout",
    "feature_norm",
    "missing_modalities",
    "modality_dropout",
    "aux_loss_weight",
    "balance",
)
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
RECIPE_OPTIONS = ("name", "max_epochs", "patience", "lr_patience")
# The largest seed `keras.utils.set_random_seed` takes.
MAX_SEED = 2**32 - 1
# Names TensorFlow accepts for the scopes it makes of model and layer names.
_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.\-/]*$")


def _read(path):
    """The spec file as a dict (JSON or YAML, read as data only)."""
    if not os.path.isfile(path):
        raise UserError(f"spec file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read spec {path}: {e}") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"Malformed YAML in {path}: {str(e).splitlines()[0]}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"Malformed JSON in {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"A spec must be a mapping at the top level. Received: {data!r}")
    return data


def _check_keys(spec, path):
    allowed = MODEL_KEYS + TRAIN_KEYS
    for key in spec:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise UserError(
                f"Unknown key {key!r} in spec {path}.{hint} Valid keys: {sorted(allowed)}"
            )


def _check_names(value, path, where="spec"):
    """Every `name` in the spec (model, layers) must be one TensorFlow accepts."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "name" and isinstance(item, str) and not _NAME.match(item):
                raise UserError(
                    f"spec {path}: {where} name {item!r} must start with a letter, digit or "
                    "'.' and hold only ASCII letters, digits and '_.-/'"
                )
            _check_names(item, path, f"{where}.{key}" if key != "name" else where)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_names(item, path, f"{where}[{i}]")


def read_spec(path):
    """`(model_spec, train)` from the spec file; UserError for what is wrong in it.

    Reads and checks without Keras: the file, its keys, the training settings, the names.
    """
    spec = _read(path)
    _check_keys(spec, path)
    model_spec = {k: v for k, v in spec.items() if k in MODEL_KEYS}
    train = {k: v for k, v in spec.items() if k in TRAIN_KEYS}
    _check_names(model_spec, path)
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
    "seed": (int, lambda v: 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]"),
    "learning_rate": (float, lambda v: v > 0, "a number > 0"),
    "validation_split": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


def _is_name(value):
    return isinstance(value, str) and value != ""


def _is_names(value, nested=True):
    """A name, or (when `nested`) a list of names or a dict output -> name(s)."""
    if _is_name(value):
        return True
    if not nested:
        return False
    if isinstance(value, list):
        return bool(value) and all(_is_names(v, nested=False) for v in value)
    if isinstance(value, dict):
        return bool(value) and all(
            isinstance(k, str) and (_is_name(v) or (isinstance(v, list) and _is_names(v)))
            for k, v in value.items()
        )
    return False


def _is_optimizer(value):
    if _is_name(value):
        return True
    return (
        isinstance(value, dict)
        and set(value) <= {"class_name", "config", "module", "registered_name"}
        and _is_name(value.get("class_name"))
        and isinstance(value.get("config", {}), dict)
    )


_TRAIN_TYPES = {
    "label": (_is_name, "the name of the label array or column"),
    "optimizer": (
        _is_optimizer,
        "an optimizer name or {class_name: NAME, config: {...}}",
    ),
    "loss": (_is_names, "a loss name (or a list of them, or a dict output -> name)"),
    "metrics": (
        lambda v: isinstance(v, (list, dict)) and (v == [] or _is_names(v)),
        "a list of metric names (or a dict output -> names)",
    ),
    "recipe": (
        lambda v: _is_name(v) or isinstance(v, dict),
        "a recipe name (small_data) or {name: small_data, ...}",
    ),
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
            is_valid, expected = _TRAIN_TYPES[key]
            if is_valid(value):
                continue
        raise UserError(f"spec {path}: {key!r} must be {expected}; got {key}={value!r}")
    if "recipe" in train:
        train["recipe"] = _check_recipe_options(train["recipe"], path)


def _check_recipe_options(recipe, path):
    """The spec's `recipe` as `{name, options...}`; UserError naming what is wrong."""
    entry = {"name": recipe} if isinstance(recipe, str) else dict(recipe)
    unknown = [k for k in entry if k not in RECIPE_OPTIONS]
    if unknown:
        raise UserError(
            f"spec {path}: unknown recipe option {unknown[0]!r}; options: {list(RECIPE_OPTIONS)}"
        )
    for key, minimum in (("max_epochs", 1), ("patience", 4), ("lr_patience", 1)):
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


def check_with_keras(train, path):
    """Checks what only Keras resolves; returns `(optimizer, compile_kwargs)`.

    The recipe's name, the optimizer (built), and the loss and metric names: keras would
    otherwise say so in the middle of `fit`, or with a traceback.
    """
    import keras

    from kfusion.recipes import RECIPES

    recipe = train.get("recipe")
    if recipe is not None and recipe.get("name") not in RECIPES:
        raise UserError(
            f"spec {path}: 'recipe' must name one of {list(RECIPES)}; got "
            f"name={recipe.get('name')!r}"
        )
    opt = train.get("optimizer", "adam")
    try:
        optimizer = keras.optimizers.get(opt)
    except (ValueError, TypeError, KeyError) as e:
        raise UserError(f"spec {path}: unknown optimizer {opt!r}: {_first_line(e)}") from None
    if "learning_rate" in train:
        optimizer.learning_rate = float(train["learning_rate"])
    compile_kwargs = {k: train[k] for k in ("loss", "metrics") if k in train}
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
    return optimizer, compile_kwargs


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
