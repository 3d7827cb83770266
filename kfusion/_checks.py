"""Argument and value checks shared by the whole package.

Every public constructor and function in kfusion validates its arguments through these
helpers, so that a bad argument is always refused the same way: a `ValueError` naming the
argument and the value received. Only `keras` and NumPy are used here.
"""

import math
import numbers

import keras
import numpy as np


def _describe(value):
    return repr(value)


def check_int(name, value, minimum=1, allow_none=False):
    """Raises `ValueError` unless `value` is an int >= `minimum` (or None if allowed)."""
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        expected = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {expected}. Received: {name}={_describe(value)}")
    return int(value)


def check_int_tuple(name, value, minimum=1, allow_empty=False):
    """Accepts an int or a non-empty sequence of ints >= `minimum`; returns a tuple."""
    items = value
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        items = (value,)
    ok = isinstance(items, (list, tuple)) and (allow_empty or len(items) > 0)
    if ok:
        ok = all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= minimum
            for v in items
        )
    if not ok:
        raise ValueError(
            f"`{name}` must be an integer >= {minimum} or a non-empty list of them. "
            f"Received: {name}={_describe(value)}"
        )
    return tuple(int(v) for v in items)


def check_rate(name, value):
    """Raises `ValueError` unless 0 <= value < 1 (a dropout rate)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= float(value) < 1.0
    ):
        raise ValueError(f"`{name}` must be a float in [0, 1). Received: {name}={_describe(value)}")
    return float(value)


def check_positive_float(name, value):
    """Raises `ValueError` unless `value` is a real number > 0 (e.g. an epsilon)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not float(value) > 0.0
        or float(value) == float("inf")
    ):
        raise ValueError(f"`{name}` must be a positive float. Received: {name}={_describe(value)}")
    return float(value)


def check_non_negative_float(name, value):
    """Raises `ValueError` unless `value` is a finite real number >= 0 (a weight)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(float(value))
        or float(value) < 0.0
    ):
        raise ValueError(
            f"`{name}` must be a finite number >= 0. Received: {name}={_describe(value)}"
        )
    return float(value)


def check_choice(name, value, choices):
    """Raises `ValueError` unless `value` is one of `choices`."""
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {sorted(c for c in choices if c is not None)}"
            f"{' or None' if None in choices else ''}. Received: {name}={_describe(value)}"
        )
    return value


def check_bool(name, value):
    """Raises `ValueError` unless `value` is a bool."""
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False. Received: {name}={_describe(value)}")
    return value


def check_activation(name, value):
    """Raises `ValueError` when keras cannot resolve `value` as an activation."""
    if value is None:
        return None
    try:
        keras.activations.get(value)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{name}` must be an activation name known to keras. Received: {name}={value!r}"
        ) from e
    return value


def check_initializer(name, value):
    """Raises `ValueError` when keras cannot resolve `value` as an initializer."""
    try:
        resolved = keras.initializers.get(value)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`{name}` must be an initializer known to keras. Received: {name}={value!r}"
        ) from e
    if resolved is None:
        raise ValueError(f"`{name}` must be an initializer, not None. Received: {name}=None")
    return value


def serialize_activation(value):
    """The config form of an activation argument (None stays None)."""
    if value is None:
        return None
    return keras.activations.serialize(keras.activations.get(value))


def first_non_finite(variables):
    """The path of the first floating-point variable holding NaN or inf, or None."""
    for variable in variables:
        dtype = keras.backend.standardize_dtype(variable.dtype)
        if not dtype.startswith(("float", "bfloat")):
            continue
        value = keras.ops.convert_to_numpy(keras.ops.cast(variable, "float32"))
        if not np.all(np.isfinite(value)):
            return getattr(variable, "path", None) or variable.name
    return None
