"""Reading `kfusion train --data`: a .npz (one array per input) or a .csv (one tabular input)."""

import os

from kfusion.cli._common import UserError


def read_npz(path):
    """The arrays of a .npz file, name -> array (no pickles); a UserError if unreadable."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def load_data(path, input_specs, label, presence=False):
    """`(x, y)` from a .npz or .csv file; `input_specs` are the model's (name, shape).

    With `presence` (a model with missing modalities), a .npz may leave inputs out (absent
    for every sample) and may hold `"<name>_present"` flag arrays, which are passed on.
    """
    import numpy as np

    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    inputs = {s["name"]: s for s in input_specs}
    if path.endswith(".npz"):
        arrays = read_npz(path)
        if label not in arrays:
            raise UserError(f"{path} has no label array {label!r} (arrays: {sorted(arrays)})")
        y = arrays.pop(label)
        missing = [n for n in inputs if n not in arrays]
        if missing and (not presence or len(missing) == len(inputs)):
            raise UserError(f"{path} has no array for input(s) {missing}; arrays: {sorted(arrays)}")
        x = {n: arrays[n] for n in inputs if n in arrays}
        flags = {f"{n}_present": arrays[f"{n}_present"] for n in inputs if f"{n}_present" in arrays}
    elif path.endswith(".csv"):
        if len(inputs) != 1:
            raise UserError(
                "CSV data feeds exactly one (tabular) input; the spec has "
                f"{len(inputs)}: {sorted(inputs)}"
            )
        try:
            import csv

            with open(path, newline="", encoding="utf-8") as f:
                rows = list(csv.reader(f))
        except OSError as e:
            raise UserError(f"cannot read {path}: {e}") from None
        if len(rows) < 2:
            raise UserError(f"{path} has no data rows")
        header, body = rows[0], rows[1:]
        if label not in header:
            raise UserError(f"{path} has no label column {label!r} (columns: {header})")
        li = header.index(label)
        try:
            table = np.array([[float(v) for v in r] for r in body], dtype="float32")
        except ValueError as e:
            raise UserError(f"{path}: non-numeric value ({e})") from None
        y = table[:, li]
        name = next(iter(inputs))
        x = {name: np.delete(table, li, axis=1)}
        if float(np.abs(y - np.round(y)).max()) == 0.0:
            y = y.astype("int32")
    else:
        raise UserError(f"data must be a .npz or .csv file, got {path}")
    n = len(y)
    for name, arr in x.items():
        want = [None] + list(inputs[name].get("shape", []))
        got = list(arr.shape)
        if len(got) != len(want) or any(
            w is not None and w != g for w, g in zip(want[1:], got[1:])
        ):
            raise UserError(
                f"data for input {name!r} has shape {tuple(got)}; the spec expects {tuple(want)}"
            )
        if len(arr) != n:
            raise UserError(f"data for input {name!r} has {len(arr)} rows; {label!r} has {n}")
    if path.endswith(".npz") and presence:
        x.update(flags)
    return x, y
