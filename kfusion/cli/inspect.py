"""`kfusion inspect`: a saved model's inputs, outputs, branches, fusion and parameter counts."""

from kfusion.cli._common import load_any


def run(args):
    """Prints a saved model's inputs, outputs, branches, fusion and parameter counts."""
    model, kind = load_any(args.path)
    print(f"{args.path} ({kind})")
    if kind == "saved_model":
        sig = model.signatures["serving_default"]
        print("signature: serving_default")
        for name, spec in sig.structured_input_signature[1].items():
            print(f"  input  {name}: shape {tuple(spec.shape)} {spec.dtype.name}")
        for name, spec in sig.structured_outputs.items():
            print(f"  output {name}: shape {tuple(spec.shape)} {spec.dtype.name}")
        params = sum(int(v.shape.num_elements()) for v in model.variables)
        print(f"parameters: {params:,}")
        return 0
    import keras

    for t in keras.tree.flatten(model.inputs):
        print(f"  input  {t.name}: shape {tuple(t.shape)} {t.dtype}")
    for t in keras.tree.flatten(model.outputs):
        print(f"  output: shape {tuple(t.shape)} {t.dtype}")
    if hasattr(model, "branch_layers"):
        print(f"fusion: {model.fusion_kind or 'none (single branch)'}")
        print("branches:")
        for input_name, names in model.branch_map.items():
            for name in names:
                layer = next(b for b in model.branch_layers if b.name == name)
                print(
                    f"  {input_name} -> {name} ({type(layer).__name__}, "
                    f"{layer.count_params():,} params)"
                )
        if model.fusion_layer is not None:
            print(
                f"fusion layer: {model.fusion_layer.name} "
                f"({model.fusion_layer.count_params():,} params)"
            )
        if model.head is not None:
            print(f"head: {type(model.head).__name__} ({model.head.count_params():,} params)")
    print(f"parameters: {model.count_params():,} (trainable {_trainable(model):,})")
    return 0


def _trainable(model):
    import numpy as np

    return int(sum(np.prod(v.shape) for v in model.trainable_weights))


def add_parser(sub):
    """Registers `kfusion inspect` on the command's subparsers."""
    insp = sub.add_parser("inspect", help="describe a saved .keras model or SavedModel")
    insp.add_argument("path", help="a .keras file or a SavedModel folder")
    insp.set_defaults(func=run)
