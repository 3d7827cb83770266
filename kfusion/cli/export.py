"""`kfusion export`: a .keras model exported to saved_model, onnx, litert or keras."""

import os

from kfusion.cli._common import UserError, check_writable_dir, load_any, one_line
from kfusion.cli._data import read_npz

QUANTIZE_CHOICES = ("dynamic", "float16", "int8", "int4", "float8")


def load_inputs(path, input_specs, label="y"):
    """The model's inputs from a .npz (one array per input) or a .csv (one tabular input).

    A label array or column named `label` is left out; nothing else is needed of the data.
    """
    import numpy as np

    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    names = [s["name"] for s in input_specs]
    if path.endswith(".npz"):
        arrays = read_npz(path)
        missing = [n for n in names if n not in arrays]
        if missing:
            raise UserError(f"{path} has no array for input(s) {missing}; arrays: {sorted(arrays)}")
        x = {n: arrays[n] for n in names}
    elif path.endswith(".csv"):
        if len(names) != 1:
            raise UserError(f"CSV data feeds exactly one (tabular) input; the model has {names}")
        try:
            table = np.genfromtxt(path, delimiter=",", names=True, dtype="float32")
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        columns = [c for c in (table.dtype.names or ()) if c != label]
        if not columns or table.size == 0:
            raise UserError(f"{path} has no data rows")
        x = {names[0]: np.stack([np.atleast_1d(table[c]) for c in columns], axis=1)}
    else:
        raise UserError(f"data must be a .npz or .csv file, got {path}")
    rows = {len(v) for v in x.values()}
    if len(rows) != 1 or 0 in rows:
        raise UserError(f"{path}: every input needs the same, non-zero number of rows")
    return x if len(x) > 1 else next(iter(x.values()))


def run(args):
    """Exports a .keras model to saved_model, onnx, litert or keras."""
    model, kind = load_any(args.model)  # checks the path before Keras loads
    from kfusion import export as kexport

    if kind != "keras":
        raise UserError("export reads a .keras model file")
    if args.quantize == "int8" and args.format == "litert" and args.data is None:
        raise UserError(
            "--quantize int8 for litert calibrates the activations on real inputs: pass "
            "--data DATA.npz (a few hundred training rows, one array per input)"
        )
    data = None
    if args.data is not None:
        from kfusion.export import _input_specs

        data = load_inputs(args.data, _input_specs(model), label=args.label)
        try:
            check = getattr(model, "check_data", None)
            if check is not None:
                check(data)
        except ValueError as e:
            raise UserError(f"--data {args.data}: {one_line(e)}") from None
    parent = os.path.dirname(os.path.abspath(args.out)) or "."
    check_writable_dir(parent)
    try:
        path = kexport.export(
            model, args.out, format=args.format, quantize=args.quantize, data=data
        )
    except (ValueError, OSError, kexport.ExportError) as e:
        # A destination it won't replace, NaN weights, a converter that failed, an export
        # that did not verify: nothing was written at --out.
        raise UserError(one_line(e)) from None
    print(f"wrote {path} (verified by reloading: {path.summary()})")
    return 0


def add_parser(sub):
    """Registers `kfusion export` on the command's subparsers."""
    exp = sub.add_parser("export", help="export a .keras model")
    exp.add_argument("model", help="the .keras file to export")
    exp.add_argument(
        "--format",
        required=True,
        choices=["saved_model", "onnx", "litert", "keras"],
        help="the export format; the export is reloaded and checked before it is kept "
        "(onnx: where onnxruntime is installed)",
    )
    exp.add_argument(
        "--out", required=True, help="where to write (a folder for saved_model, else a file)"
    )
    exp.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        default=None,
        help="quantize the export: litert dynamic|float16|int8 (int8 needs --data), onnx "
        "dynamic, keras/saved_model int8|int4|float8; checked against the float model",
    )
    exp.add_argument(
        "--data",
        default=None,
        help="real inputs (.npz with one array per input, or .csv for one tabular input): "
        "int8's calibration set and the check's probe rows",
    )
    exp.add_argument(
        "--label", default="y", help="the label array/column in --data, left out (default: y)"
    )
    exp.set_defaults(func=run)
