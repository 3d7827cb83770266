"""`kfusion train`: a FusionModel described by a spec file, trained on .npz or .csv data."""

import os
import shutil
import tempfile

from kfusion.cli._common import UserError, atomic_json, check_writable_dir, one_line, say
from kfusion.cli._data import load_data
from kfusion.cli._train_spec import check_compile_names, load_train_spec


class _Checkpoint:
    """Saves the model to `path` (a .keras file) after every epoch, beside it then renamed.

    `keras.callbacks.ModelCheckpoint` writes the file in place: a run killed while it saves
    would leave a half-written checkpoint where the last good one was.
    """

    def __new__(cls, path):
        import keras

        class Checkpoint(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                folder = os.path.dirname(path)
                tmp_dir = tempfile.mkdtemp(prefix=".checkpoint-", dir=folder)
                try:
                    tmp = os.path.join(tmp_dir, os.path.basename(path))
                    self.model.save(tmp)
                    os.replace(tmp, path)
                finally:
                    shutil.rmtree(tmp_dir, ignore_errors=True)

        return Checkpoint()


class _EpochLog:
    """Prints one flushed line per finished epoch (so callers can follow progress)."""

    def __new__(cls, quiet):
        import keras

        class EpochLog(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                if not quiet:
                    parts = " ".join(f"{k}={v:.4f}" for k, v in sorted((logs or {}).items()))
                    print(f"epoch {epoch + 1} done {parts}", flush=True)

        return EpochLog()


def _validation_split(model, features, y, train, data_path):
    """`((x, y), (x_val, y_val), info)` for the spec's `validation_split`, or None.

    keras' own `fit(validation_split=...)` validates on the last rows as they come, which
    for a file sorted by class (as the UCR/UEA training files are) is one or two classes:
    the rows are split by `kfusion.datasets.train_validation_split` instead, shuffled with
    the spec's `seed` and stratified by class under a Classification head.
    """
    fraction = float(train.get("validation_split", 0.0))
    if fraction <= 0.0:
        return None
    import numpy as np

    from kfusion import datasets
    from kfusion.heads import Classification

    stratify = isinstance(model.head, Classification)
    seed = train.get("seed", 0)
    try:
        fit_part, val_part = datasets.train_validation_split(
            features, y, validation_split=fraction, seed=seed, stratify=stratify
        )
    except ValueError as e:
        raise UserError(f"data {data_path}: cannot split off validation rows: {e}") from None
    stratified = stratify and datasets._is_class_labels(np.asarray(y))  # float labels: not
    info = {"samples": int(len(val_part[1])), "seed": seed, "stratified": bool(stratified)}
    return fit_part, val_part, info


def run(args):
    """Trains a FusionModel described by a spec file on .npz or .csv data."""
    model_spec, train = load_train_spec(args.spec)
    label = train.get("label", "y")
    if not os.path.isfile(args.data):
        raise UserError(f"data file not found: {args.data}")
    out = os.path.abspath(args.out)
    backup_dir = os.path.join(out, "backup")

    import keras

    from kfusion import export as kexport
    from kfusion.callbacks import StopOnNaN
    from kfusion.models import FusionModel

    seed = train.get("seed", 0)
    keras.utils.set_random_seed(seed)
    if keras.config.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
    # The model first: the data is read against its checked inputs.
    try:
        model = FusionModel.from_spec(model_spec)
    except (ValueError, TypeError) as e:
        raise UserError(f"invalid model spec: {one_line(e)}") from None
    x, y = load_data(args.data, model.input_specs, label)
    opt = train.get("optimizer", "adam")
    try:
        optimizer = keras.optimizers.get(opt)
    except ValueError as e:
        raise UserError(f"unknown optimizer {opt!r}: {e}") from None
    if "learning_rate" in train:
        optimizer.learning_rate = float(train["learning_rate"])
    compile_kwargs = {k: train[k] for k in ("loss", "metrics") if k in train}
    check_compile_names(compile_kwargs, args.spec)
    try:
        model.compile(optimizer=optimizer, **compile_kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"spec {args.spec}: cannot compile: {one_line(e)}") from None
    epochs = train.get("epochs", 10)
    features = x if len(x) > 1 else next(iter(x.values()))
    try:
        model.check_data(features, y)
    except ValueError as e:
        raise UserError(f"data {args.data}: {e}") from None
    validation_data = validation_info = None
    recipe = train.get("recipe")
    if recipe is not None:
        # The recipe selects on a validation split: a stratified fifth unless one is set.
        train.setdefault("validation_split", 0.2)
        if not train["validation_split"]:
            raise UserError(
                f"spec {args.spec}: recipe {recipe['name']!r} needs a validation_split > 0"
            )
    validation = _validation_split(model, features, y, train, args.data)
    if validation is not None:
        (features, y), validation_data, validation_info = validation
    # Only now, with the spec and the data accepted, is the output folder touched.
    check_writable_dir(out)
    exports = [(os.path.join(out, "model.keras"), "keras")]
    if keras.config.backend() in ("tensorflow", "jax"):
        exports.append((os.path.join(out, "saved_model"), "saved_model"))
    for path, fmt in exports:  # before training: a destination export won't replace
        try:
            kexport._check_destination(path, fmt)
        except OSError as e:
            raise UserError(str(e)) from None
    if not args.resume and os.path.isdir(backup_dir):
        shutil.rmtree(backup_dir)
    batch_size = train.get("batch_size", 32)
    recipe_callbacks = []
    if recipe is not None:
        from kfusion.recipes import small_data_settings

        rows = len(y)
        options = {k: v for k, v in recipe.items() if k != "name"}
        settings = small_data_settings(rows, **options)
        # The spec's own epochs and batch_size win; the recipe fills in the rest.
        epochs = train.get("epochs", settings["epochs"])
        batch_size = train.get("batch_size", settings["batch_size"])
        recipe_callbacks = settings["callbacks"][1:]  # StopOnNaN is already first
    callbacks = [
        # First: a NaN loss aborts fit before the checkpoint callbacks save that state.
        StopOnNaN(),
        *recipe_callbacks,
        keras.callbacks.BackupAndRestore(backup_dir, delete_checkpoint=False),
        _Checkpoint(os.path.join(out, "checkpoints", "last.keras")),
        _EpochLog(args.quiet),
    ]
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    try:
        history = model.fit(
            features,
            y,
            epochs=epochs,
            batch_size=batch_size,
            validation_data=validation_data,
            shuffle=False,
            callbacks=callbacks,
            verbose=0,
        )
    except FloatingPointError as e:
        raise UserError(
            f"training diverged: {e} Try a lower learning_rate. Nothing was exported; "
            "the checkpoints of earlier epochs are kept."
        ) from None
    probe = {k: v[:8] for k, v in x.items()}
    probe = probe if len(probe) > 1 else next(iter(probe.values()))
    for path, fmt in exports:
        try:
            kexport.export(model, path, format=fmt, probe=probe)
        except (ValueError, OSError, kexport.ExportVerificationError) as e:
            raise UserError(
                f"training finished but the {fmt} export failed: {one_line(e)} "
                f"{os.path.join(out, 'checkpoints', 'last.keras')} holds the trained model."
            ) from None
    metrics = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    report = {"epochs": epochs, "history": metrics}
    if recipe is not None:
        report["recipe"] = {**recipe, "batch_size": batch_size, "max_epochs": epochs}
    if validation_info is not None:
        report["validation"] = validation_info
    atomic_json(report, os.path.join(out, "metrics.json"))
    say(args, f"wrote {out}/: model.keras, saved_model/, checkpoints/, metrics.json")
    return 0


def add_parser(sub):
    """Registers `kfusion train` on the command's subparsers."""
    train = sub.add_parser("train", help="train a FusionModel described by a YAML/JSON spec")
    train.add_argument(
        "spec", help="a .yaml/.yml/.json file: the model spec plus training settings"
    )
    train.add_argument(
        "--data",
        required=True,
        help=".npz with one array per input and the labels (named by the spec's `label`, "
        "default y), or .csv for a single tabular input",
    )
    train.add_argument("--out", default="kfusion-run", help="output folder (default: kfusion-run)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run")
    train.add_argument("--quiet", action="store_true", help="print nothing but errors")
    train.set_defaults(func=run)
