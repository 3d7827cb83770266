"""Private helpers shared by kfusion layers: argument checks and input handling.

Only `keras` and `keras.ops` are used here, never a backend directly.
"""

import numbers

import keras
from keras import ops

ACTIVATIONS_NONE = (None, "linear")


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


def flatten_inputs(inputs, layer_name, min_inputs=2, max_inputs=None):
    """Returns `(list_of_items, keys)` from a list/tuple/dict of branch features.

    Dicts are read in sorted key order (the order `keras.tree` uses), so the
    layer's weights line up with the same branch after saving and loading.
    """
    if isinstance(inputs, dict):
        keys = sorted(inputs)
        items = [inputs[k] for k in keys]
    elif isinstance(inputs, (list, tuple)):
        keys = None
        items = list(inputs)
    else:
        raise ValueError(
            f"{layer_name} expects a list or dict of at least {min_inputs} branch features. "
            f"Received a single input: {inputs}"
        )
    if len(items) < min_inputs or (max_inputs is not None and len(items) > max_inputs):
        expected = (
            f"exactly {min_inputs}"
            if max_inputs == min_inputs
            else f"at least {min_inputs}" + (f" and at most {max_inputs}" if max_inputs else "")
        )
        raise ValueError(f"{layer_name} expects {expected} inputs. Received: {len(items)} inputs.")
    return items, keys


def flatten_masks(mask, count):
    """Returns a list of `count` masks (entries may be None) from what keras passed."""
    if mask is None:
        return [None] * count
    if isinstance(mask, dict):
        return [mask[k] for k in sorted(mask)]
    if isinstance(mask, (list, tuple)):
        return list(mask)
    return [mask] + [None] * (count - 1)


def is_shape(obj):
    """True when `obj` looks like one shape (a tuple/list of ints or None)."""
    return isinstance(obj, (tuple, list)) and all(
        d is None or isinstance(d, numbers.Integral) for d in obj
    )


def flatten_shapes(input_shape, layer_name, min_inputs=2, max_inputs=None):
    """Like `flatten_inputs` for the shapes keras passes to `build`."""
    if is_shape(input_shape):
        raise ValueError(
            f"{layer_name} expects a list or dict of at least {min_inputs} branch features. "
            f"Received a single input of shape {tuple(input_shape)}"
        )
    shapes, _ = flatten_inputs(input_shape, layer_name, min_inputs, max_inputs)
    return [tuple(s) for s in shapes]


def check_ranks(shapes, layer_name, ranks):
    """Raises `ValueError` when any input's rank is not in `ranks`."""
    for i, shape in enumerate(shapes):
        if len(shape) not in ranks:
            allowed = " or ".join(str(r) for r in sorted(ranks))
            raise ValueError(
                f"{layer_name} expects inputs of rank {allowed} "
                f"(batch first). Input {i} has shape {shape}."
            )
        if shape[-1] is None:
            raise ValueError(
                f"{layer_name} needs a known feature size (last axis). Input {i} has shape {shape}."
            )


def vector_input_specs(shapes):
    """One `keras.InputSpec` per branch vector: rank 2 and the width `build` saw.

    Set as `layer.input_spec` in `build`, so a later call with another number of inputs
    or another width fails with keras' clear message instead of silently dropping or
    mixing up branches.
    """
    return [keras.InputSpec(ndim=2, axes={-1: shape[-1]}) for shape in shapes]


def softmax_float32(logits, axis=-1):
    """Softmax computed in float32 whatever the compute dtype (mixed precision safe)."""
    return ops.softmax(ops.cast(logits, "float32"), axis=axis)


def sigmoid_float32(logits):
    """Sigmoid computed in float32 whatever the compute dtype."""
    return ops.sigmoid(ops.cast(logits, "float32"))


def masked_mean(x, mask, axis=1):
    """Mean of `x` (batch, T, D) over `axis`, counting only steps where mask is True."""
    if mask is None:
        return ops.mean(x, axis=axis)
    m = ops.expand_dims(ops.cast(mask, x.dtype), -1)
    total = ops.sum(x * m, axis=axis)
    count = ops.maximum(ops.sum(m, axis=axis), ops.cast(1.0, x.dtype))
    return total / count
