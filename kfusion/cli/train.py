"""`kfusion train`: a FusionModel described by a spec file, trained on .npz or .csv data."""

import os
import shutil
import tempfile
from types import SimpleNamespace

from kfusion._startup import import_keras
from kfusion.cli._backup import Backup
from kfusion.cli._backup import callback as backup_callback
from kfusion.cli._common import UserError, atomic_json, check_writable_dir, one_line, say
from kfusion.cli._data import load_data
from kfusion.cli._train_spec import check_with_keras, read_spec


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
                os.makedirs(folder, exist_ok=True)  # at the first save: no empty folder
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
    kept = len(np.asarray(fit_part[1]))
    if kept < 2:
        raise UserError(
            f"data {data_path}: validation_split={fraction} of {len(np.asarray(y))} rows "
            f"leaves {kept} row(s) to train on; use a smaller validation_split"
        )
    stratified = stratify and datasets._is_class_labels(np.asarray(y))  # float labels: not
    info = {"samples": int(len(val_part[1])), "seed": seed, "stratified": bool(stratified)}
    return fit_part, val_part, info


def _check_output_folder(out):
    """UserError when `out` can't be made a writable folder (checked, nothing created)."""
    path = out
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not os.path.isdir(path) or not os.access(path, os.W_OK | os.X_OK):
        reason = "not a folder" if not os.path.isdir(path) else "not writable"
        raise UserError(f"cannot write to output folder {out!r}: {path!r} is {reason}")


def _check_fits(model, features, y, spec_path):
    """UserError when the loss or a metric can't be computed on these labels.

    Computed on two rows before training: keras would otherwise fail in the middle of
    `fit` (a shape error deep in the backend) after the first steps.
    """
    import keras

    rows = keras.tree.map_structure(lambda a: a[:2], features)
    labels = model.encode_labels(keras.tree.map_structure(lambda a: a[:2], y))
    try:
        y_pred = model(rows, training=False)
        model.compute_loss(x=rows, y=labels, y_pred=y_pred, training=False)
        model.compute_metrics(rows, labels, y_pred, sample_weight=None)
    except Exception as e:  # noqa: BLE001 - any backend error: say which setting in one line
        label_shapes = keras.tree.map_structure(lambda a: tuple(a.shape), labels)
        raise UserError(
            f"spec {spec_path}: the loss or metrics can't be computed on labels of shape "
            f"{label_shapes} and the model's output of shape {model.output_shape} "
            f"(two rows): {one_line(e)}"
        ) from None
    finally:
        model.reset_metrics()


def _prepare(args):
    """The checked model, data and settings of a run; UserError for anything wrong.

    Everything that needs neither Keras nor TensorFlow is checked before they load.
    Nothing is written.
    """
    model_spec, train = read_spec(args.spec)
    label = train.get("label", "y")
    if not os.path.isfile(args.data):
        raise UserError(f"data file not found: {args.data}")
    if not args.data.endswith((".npz", ".csv")):
        raise UserError(f"data must be a .npz or .csv file, got {args.data}")
    out = os.path.abspath(args.out)
    _check_output_folder(out)

    keras = import_keras()

    from kfusion.models import FusionModel

    optimizer, compile_kwargs = check_with_keras(train, args.spec)
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
    x, y = load_data(
        args.data, model.input_specs, label, presence=getattr(model, "missing_modalities", False)
    )
    try:
        model.compile(optimizer=optimizer, **compile_kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"spec {args.spec}: cannot compile: {one_line(e)}") from None
    # A model made with `branches:` as a mapping takes a dict, even for one input.
    features = next(iter(x.values())) if model.single_input else model.complete_inputs(x)
    try:
        model.check_data(features, y)
    except ValueError as e:
        raise UserError(f"data {args.data}: {e}") from None
    recipe = train.get("recipe")
    if recipe is not None:
        # The recipe selects on a validation split: a stratified fifth unless one is set.
        train.setdefault("validation_split", 0.2)
        if not train["validation_split"]:
            raise UserError(
                f"spec {args.spec}: recipe {recipe['name']!r} needs a validation_split > 0"
            )
    validation_data = validation_info = None
    validation = _validation_split(model, features, y, train, args.data)
    if validation is not None:
        (features, y), validation_data, validation_info = validation
    _check_fits(model, features, y, args.spec)
    probe = {k: v[:8] for k, v in (x if model.single_input else features).items()}
    return SimpleNamespace(
        model=model,
        features=features,
        y=y,
        validation_data=validation_data,
        validation_info=validation_info,
        probe=next(iter(probe.values())) if model.single_input else probe,
        train=train,
        recipe=recipe,
        out=out,
    )


def run(args):
    """Trains a FusionModel described by a spec file on .npz or .csv data."""
    job = _prepare(args)
    # Only now, with the spec and the data accepted, is the output folder touched.
    created = not os.path.exists(job.out)
    check_writable_dir(job.out)
    try:
        return _fit_and_export(args, job)
    except BaseException:
        # A run that fails before its first epoch leaves no empty folder behind.
        checkpoints = os.path.join(job.out, "checkpoints")
        if os.path.isdir(checkpoints) and not os.listdir(checkpoints):
            os.rmdir(checkpoints)
        if created and os.path.isdir(job.out) and not os.listdir(job.out):
            os.rmdir(job.out)
        raise


def _fit_and_export(args, job):
    import keras

    from kfusion import export as kexport
    from kfusion.callbacks import StopOnNaN

    model, out, train, recipe = job.model, job.out, job.train, job.recipe
    exports = [(os.path.join(out, "model.keras"), "keras")]
    if keras.config.backend() in ("tensorflow", "jax"):
        exports.append((os.path.join(out, "saved_model"), "saved_model"))
    for path, fmt in exports:  # before training: a destination export won't replace
        try:
            kexport._check_destination(path, fmt)
        except OSError as e:
            raise UserError(str(e)) from None
    backup = Backup(os.path.join(out, "backup"))
    if not args.resume:
        backup.clear()
    epochs = train.get("epochs", 10)
    batch_size = train.get("batch_size", 32)
    recipe_callbacks = []
    if recipe is not None:
        from kfusion.recipes import small_data_settings

        options = {k: v for k, v in recipe.items() if k != "name"}
        settings = small_data_settings(len(job.y), **options)
        # The spec's own epochs and batch_size win; the recipe fills in the rest.
        epochs = train.get("epochs", settings["epochs"])
        batch_size = train.get("batch_size", settings["batch_size"])
        recipe_callbacks = settings["callbacks"][1:]  # StopOnNaN is already first
    state = backup.restore(model) if args.resume else None
    initial_epoch = 0
    if state is not None:
        initial_epoch = min(state["epochs_done"], epochs)
        if state["stop_training"]:  # it had stopped early: no epoch more
            initial_epoch = epochs = state["epochs_done"]
    saver = backup_callback(backup, state, recipe_callbacks)
    callbacks = [
        # First: a NaN loss aborts fit before the checkpoint callbacks save that state.
        StopOnNaN(),
        *recipe_callbacks,
        saver,
        _Checkpoint(os.path.join(out, "checkpoints", "last.keras")),
        _EpochLog(args.quiet),
    ]
    try:
        model.fit(
            job.features,
            job.y,
            epochs=epochs,
            initial_epoch=initial_epoch,
            batch_size=batch_size,
            validation_data=job.validation_data,
            shuffle=False,
            callbacks=callbacks,
            verbose=0,
        )
    except FloatingPointError as e:
        raise UserError(
            f"training diverged: {e} Try a lower learning_rate. Nothing was exported; "
            "the checkpoints of earlier epochs are kept."
        ) from None
    for path, fmt in exports:
        try:
            kexport.export(model, path, format=fmt, probe=job.probe)
        except (ValueError, OSError, kexport.ExportVerificationError) as e:
            raise UserError(
                f"training finished but the {fmt} export failed: {one_line(e)} "
                f"{os.path.join(out, 'checkpoints', 'last.keras')} holds the trained model."
            ) from None
    # The whole history: the epochs before a resume come from the backup.
    report = {"epochs": epochs, "history": saver.history}
    if recipe is not None:
        report["recipe"] = {**recipe, "batch_size": batch_size, "max_epochs": epochs}
    if job.validation_info is not None:
        report["validation"] = job.validation_info
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
