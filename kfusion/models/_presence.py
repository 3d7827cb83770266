"""Presence inputs of FusionModel: missing modalities and modality dropout."""

import numbers

import numpy as np

from kfusion import _checks

SUFFIX = "_present"


def presence_name(input_name):
    """The name of an input's presence flag input (`"image"` -> `"image_present"`)."""
    return f"{input_name}{SUFFIX}"


def resolve(missing_modalities, modality_dropout, names):
    """`(enabled, rates)`: whether the model takes presence inputs, and each input's rate.

    `modality_dropout` is a rate or a dict input name -> rate (missing names: 0).
    `missing_modalities=None` means "when modality dropout is on".
    """
    if isinstance(modality_dropout, dict):
        unknown = [k for k in modality_dropout if k not in names]
        if unknown:
            raise ValueError(
                f"`modality_dropout` names an input that does not exist. Received: "
                f"modality_dropout key {unknown[0]!r}; inputs are {list(names)}."
            )
        rates = {
            n: _checks.check_rate(f"modality_dropout[{n!r}]", modality_dropout.get(n, 0.0) or 0.0)
            for n in names
        }
    elif modality_dropout is None:
        rates = {n: 0.0 for n in names}
    else:
        rate = _checks.check_rate("modality_dropout", modality_dropout)
        rates = {n: rate for n in names}
    dropout = any(r > 0.0 for r in rates.values())
    if missing_modalities is None:
        enabled = dropout
    else:
        enabled = _checks.check_bool("missing_modalities", missing_modalities)
    if dropout and not enabled:
        raise ValueError(
            "`modality_dropout` drops modalities through the presence inputs, so it needs "
            "`missing_modalities=True` (or None). Received: missing_modalities=False, "
            f"modality_dropout={modality_dropout!r}"
        )
    if enabled and len(names) < 2:
        raise ValueError(
            "`missing_modalities` and `modality_dropout` need a model with several inputs "
            f"(one per modality); this one has {len(names)}: {list(names)}. Received: "
            f"missing_modalities={missing_modalities!r}, modality_dropout={modality_dropout!r}"
        )
    taken = [presence_name(n) for n in names if presence_name(n) in names]
    if enabled and taken:
        raise ValueError(
            f"Input name(s) {taken} are reserved for the presence flags of a model with "
            "`missing_modalities`; rename them."
        )
    return enabled, rates


def _rows(array):
    shape = getattr(array, "shape", None)
    if shape is None:
        shape = np.shape(array)
    return int(shape[0]) if len(shape) else None


def check_flags(key, value, rows):
    """`value` as a bool array `(rows,)`; `ValueError` naming `key` unless it is one."""
    array = np.asarray(value)
    if array.ndim == 2 and array.shape[-1] == 1:
        array = array[:, 0]
    expected = f"expected a bool array of shape ({rows},) (one flag per sample)"
    if array.ndim != 1 or (rows is not None and array.shape[0] != rows):
        raise ValueError(
            f"Presence input {key!r} has shape {array.shape}: {expected}. True marks a "
            "sample that has the modality."
        )
    if array.dtype == bool:
        return array
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if numeric and np.isin(array, (0, 1)).all():
        return array.astype(bool)
    raise ValueError(
        f"Presence input {key!r} has dtype {array.dtype}"
        + (" with values other than 0 and 1" if numeric else "")
        + f": {expected}."
    )


def complete(x, specs, names):
    """`x` (a dict of arrays) with the absent inputs and missing flags filled in.

    An input left out of the dict is absent for every sample: it gets zeros of its shape
    and a False flag. A flag left out is True for every sample. Anything that is not a
    dict of arrays is returned unchanged (keras checks datasets itself).
    """
    if not isinstance(x, dict) or not all(_is_array(v) for v in x.values()):
        return x
    given = [n for n in names if n in x]
    if not given:
        return x  # check_data names the missing inputs
    rows = _rows(x[given[0]])
    out = dict(x)
    for name in names:
        key = presence_name(name)
        if name not in x:
            if key in x and check_flags(key, x[key], rows).any():
                raise ValueError(
                    f"Input {name!r} is left out (absent for every sample) but {key!r} marks "
                    "it present for some samples. Pass the input, or leave both out."
                )
            spec = specs[name]
            shape = (rows,) + tuple(1 if d is None else d for d in spec["shape"])
            out[name] = np.zeros(shape, dtype=spec["dtype"])
            out[key] = np.zeros((rows,), dtype=bool)
        elif key in x:
            out[key] = check_flags(key, x[key], rows)
        else:
            out[key] = np.ones((rows,), dtype=bool)
    return out


def _is_array(value):
    return hasattr(value, "shape") or isinstance(value, (list, tuple, numbers.Number))
