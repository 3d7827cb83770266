"""`kfusion export`: a .keras model exported to saved_model, onnx, litert or keras."""

import os

from kfusion.cli._common import UserError, check_writable_dir, load_any, one_line


def run(args):
    """Exports a .keras model to saved_model, onnx, litert or keras."""
    from kfusion import export as kexport

    model, kind = load_any(args.model)
    if kind != "keras":
        raise UserError("export reads a .keras model file")
    parent = os.path.dirname(os.path.abspath(args.out)) or "."
    check_writable_dir(parent)
    try:
        path = kexport.export(model, args.out, format=args.format)
    except (ValueError, OSError, kexport.ExportVerificationError) as e:
        # A destination it won't replace, NaN weights, an export that did not verify:
        # nothing was written at --out.
        raise UserError(one_line(e)) from None
    print(f"wrote {path} ({args.format}, verified by reloading)")
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
    exp.set_defaults(func=run)
