"""Private helpers that only kfusion layers use: input, shape and mask handling.

Argument checks shared by the whole package live in `kfusion._checks`.

Only `keras` and `keras.ops` are used here, never a backend directly.
"""

import math
import numbers

import keras
from keras import ops

ACTIVATIONS_NONE = (None, "linear")


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


def renormalize(weights, presence):
    """Branch weights `(batch, M, ...)` renormalised over the present branches.

    `presence` is `(batch, M)` (1 present, 0 absent). Absent branches get weight exactly
    0 and the present ones keep their ratios; a sample with no branch present keeps its
    weights unchanged (it is fused from the missing embeddings alone).
    """
    weights = ops.cast(weights, "float32")
    p = ops.cast(presence, "float32")
    for _ in range(len(weights.shape) - 2):
        p = ops.expand_dims(p, -1)
    masked = weights * p
    total = ops.sum(masked, axis=1, keepdims=True)
    some = total > 0.0
    return ops.where(some, masked / ops.where(some, total, 1.0), weights)


def sigmoid_float32(logits):
    """Sigmoid computed in float32 whatever the compute dtype."""
    return ops.sigmoid(ops.cast(logits, "float32"))


def step_mask(mask, dtype):
    """A (batch, T) padding mask as (batch, T, 1) of `dtype` (None stays None)."""
    return None if mask is None else ops.expand_dims(ops.cast(mask, dtype), -1)


def zero_padded(x, mask):
    """`x` (batch, T, D) with the padded steps (mask False) set to 0."""
    return x if mask is None else x * step_mask(mask, x.dtype)


def masked_mean(x, mask, axis=1):
    """Mean of `x` (batch, T, D) over `axis`, counting only steps where mask is True."""
    if mask is None:
        return ops.mean(x, axis=axis)
    m = step_mask(mask, x.dtype)
    total = ops.sum(x * m, axis=axis)
    count = ops.maximum(ops.sum(m, axis=axis), ops.cast(1.0, x.dtype))
    return total / count


def _position_angles(length, dim):
    """`t * w_i` for steps t < length and i < dim // 2, `w_i = 10000 ** (-2 i / dim)`."""
    half = dim // 2
    rates = ops.exp(ops.arange(half, dtype="float32") * (-math.log(10000.0) / half))
    steps = ops.cast(ops.arange(length), "float32")
    return ops.expand_dims(steps, -1) * ops.expand_dims(rates, 0)  # (length, dim // 2)


def sinusoidal_positions(length, dim, dtype):
    """The fixed sine/cosine positions of Vaswani et al. 2017, shape `(1, length, dim)`.

    `P[t, i] = sin(t w_i)` for the first `dim // 2` columns and `cos(t w_i)` for the
    rest, with `w_i = 10000 ** (-2 i / dim)` (the paper's interleaved columns, grouped).
    `length` may be a tensor (a length only known at call time); `dim` is even.
    """
    angles = _position_angles(length, dim)
    table = ops.concatenate([ops.sin(angles), ops.cos(angles)], axis=-1)
    return ops.cast(ops.expand_dims(table, 0), dtype)


def rotary(x):
    """Rotary position embedding (RoFormer, Su et al. 2021) of `(batch, T, heads, H)`.

    Each pair of features `(i, i + H/2)` of step `t` is rotated by the angle `t w_i`,
    `w_i = 10000 ** (-2 i / H)`, so the dot product of a rotated query at `t` and a
    rotated key at `s` depends on `t - s` only. Computed in float32, returned in the
    input's dtype; `H` is even.
    """
    dtype = x.dtype
    x = ops.cast(x, "float32")
    half = x.shape[-1] // 2
    angles = _position_angles(ops.shape(x)[1], x.shape[-1])  # (T, H/2)
    cos = ops.expand_dims(ops.expand_dims(ops.cos(angles), 0), 2)  # (1, T, 1, H/2)
    sin = ops.expand_dims(ops.expand_dims(ops.sin(angles), 0), 2)
    first, second = x[..., :half], x[..., half:]
    out = ops.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)
    return ops.cast(out, dtype)
