"""The `kfusion` command: demo, train from a spec, inspect, export.

Errors a user can fix (a missing file, a malformed spec, data that does not match) print one
line on stderr and exit with code 2, with no traceback and nothing half-written at the
destination.
"""

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

EXIT_USAGE = 2
TRAIN_KEYS = (
    "optimizer",
    "learning_rate",
    "epochs",
    "batch_size",
    "validation_split",
    "seed",
    "label",
    "loss",
    "metrics",
    "recipe",
)
RECIPE_OPTIONS = ("name", "max_epochs", "patience")


class UserError(Exception):
    """An error in what the user gave: printed as one line, exit code 2."""


# ------------------------------------------------------------------------------ helpers
def _one_line(error):
    """The first line of an exception's message (keras appends dumps on later lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _say(args, *parts):
    if not getattr(args, "quiet", False):
        print(*parts, flush=True)


def _check_writable_dir(path):
    """Creates `path` (a folder) or raises UserError when it can't be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".kfusion-write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise UserError(f"cannot write to output folder {path!r}: {e.strerror or e}") from None


def _atomic_json(data, path):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------------- demo
DEMO_MODELS = ("cnn", "rnn", "transformer")
DEMO_FUSIONS = ("concat", "attention", "gated")
DEMO_VALIDATION_SPLIT = 0.1


def _demo_model(kind, seed):
    import keras

    import kfusion as kf

    keras.utils.set_random_seed(seed)
    branches = {
        "cnn": lambda: kf.branches.CNN(filters=(32, 32), kernel_size=3, name="cnn_branch"),
        "rnn": lambda: kf.branches.RNN(units=32, cell="lstm", name="rnn_branch"),
        "transformer": lambda: kf.branches.Transformer(
            dim=32, depth=1, num_heads=4, name="transformer_branch"
        ),
    }
    if kind in branches:
        chosen, fusion = [branches[kind]()], None
        name = f"{kind}_only"
    else:
        chosen, fusion = [b() for b in branches.values()], kind
        name = f"fused_{kind}"
    return kf.FusionModel(
        inputs=keras.Input((8, 8), name="digits"),
        branches=chosen,
        fusion=fusion,
        head=kf.heads.Classification(10, name="classification_head"),
        name=name,
    )


def _macro_f1(y_true, y_pred, num_classes):
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", labels=list(range(num_classes))))


def _plot_curves(histories, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("kfusion: training curves skipped: `pip install matplotlib`", file=sys.stderr)
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, hist in histories.items():
        axes[0].plot(hist["loss"], label=f"{name} train")
        axes[1].plot(hist.get("val_accuracy", []), label=name)
    axes[0].set_title("training loss")
    axes[1].set_title("validation accuracy")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=90)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _verify_in_fresh_process(saved_model_dir, x, expected):
    """Reloads the SavedModel in a new Python process (without kfusion) and compares."""
    import subprocess

    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        np.save(os.path.join(tmp, "x.npy"), x)
        np.save(os.path.join(tmp, "expected.npy"), expected)
        script = (
            "import sys; sys.modules['kfusion'] = None\n"
            "import numpy as np, tensorflow as tf\n"
            f"m = tf.saved_model.load({saved_model_dir!r})\n"
            f"x = np.load({os.path.join(tmp, 'x.npy')!r})\n"
            "out = m.signatures['serving_default'](tf.constant(x))\n"
            "got = list(out.values())[0].numpy()\n"
            f"exp = np.load({os.path.join(tmp, 'expected.npy')!r})\n"
            "print(float(np.max(np.abs(got - exp))))\n"
        )
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
        )
    if result.returncode != 0:
        raise RuntimeError(f"fresh-process reload failed: {result.stderr.strip()[-500:]}")
    return float(result.stdout.strip().splitlines()[-1])


def cmd_demo(args):
    """Trains single-branch and fused models on digits and compares them."""
    import keras
    import numpy as np

    from kfusion import export as kexport
    from kfusion import inspect as kinspect
    from kfusion.datasets import digits, train_validation_split

    if args.epochs < 1:
        raise UserError(f"--epochs must be >= 1, got {args.epochs}")
    if args.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {args.seeds}")
    fusions = DEMO_FUSIONS if args.fusion == "all" else tuple(args.fusion.split(","))
    for f in fusions:
        if f not in ("concat", "weighted", "attention", "gated", "low_rank"):
            raise UserError(
                f"--fusion {f!r} is not a vector fusion kind for the demo; use concat, "
                "weighted, attention, gated or low_rank (comma-separated), or all"
            )
    out = os.path.abspath(args.out)
    _check_writable_dir(out)

    x, y = digits(image=False)
    split = int(0.8 * len(y))
    x_train, y_train, x_test, y_test = x[:split], y[:split], x[split:], y[split:]
    # Validation (the curves, and the choice of the best fused model) on a stratified part
    # of the training images; the held-out test images are scored once, after training.
    kinds = list(DEMO_MODELS) + list(fusions)
    rows, histories, best = {}, {}, None
    total = len(kinds) * args.seeds
    step = 0
    for seed in range(args.seeds):
        for kind in kinds:
            step += 1
            (x_fit, y_fit), (x_val, y_val) = train_validation_split(
                x_train, y_train, validation_split=DEMO_VALIDATION_SPLIT, seed=seed
            )
            model = _demo_model(kind, seed)
            _say(
                args,
                f"[{step}/{total}] {model.name} (seed {seed}, {model.count_params():,} params)",
            )
            model.compile(optimizer=keras.optimizers.Adam(3e-3))
            start = time.perf_counter()
            history = model.fit(
                x_fit,
                y_fit,
                validation_data=(x_val, y_val),
                epochs=args.epochs,
                batch_size=64,
                verbose=0 if args.quiet else (1 if sys.stdout.isatty() else 2),
            )
            seconds = time.perf_counter() - start
            val_acc = float(np.mean(model.predict(x_val, verbose=0).argmax(-1) == y_val))
            pred = model.predict(x_test, verbose=0).argmax(-1)
            acc = float(np.mean(pred == y_test))
            row = rows.setdefault(
                model.name,
                {
                    "accuracy": [],
                    "val_accuracy": [],
                    "macro_f1": [],
                    "seconds": [],
                    "fused": kind in fusions,
                },
            )
            row["params"] = int(model.count_params())
            row["accuracy"].append(acc)
            row["val_accuracy"].append(val_acc)
            row["macro_f1"].append(_macro_f1(y_test, pred, 10))
            row["seconds"].append(seconds)
            if seed == 0:
                histories[model.name] = history.history
            if kind in fusions and (best is None or val_acc > best[2]):
                best = (model, acc, val_acc)  # chosen on validation, never on the test

    summary = {
        name: {
            "accuracy": float(np.mean(r["accuracy"])),
            "accuracy_std": float(np.std(r["accuracy"])),
            "val_accuracy": float(np.mean(r["val_accuracy"])),
            "macro_f1": float(np.mean(r["macro_f1"])),
            "params": r["params"],
            "train_seconds": float(np.mean(r["seconds"])),
            "fused": r["fused"],
        }
        for name, r in rows.items()
    }
    print()
    print(
        f"digits (held-out {len(y_test)} images), {args.epochs} epochs, "
        f"mean over {args.seeds} seed(s)"
    )
    header = f"{'model':<22}{'accuracy':>10}{'macro F1':>10}{'params':>10}{'train s':>9}"
    print(header)
    print("-" * len(header))
    for name, r in summary.items():
        print(
            f"{name:<22}{r['accuracy']:>10.4f}{r['macro_f1']:>10.4f}"
            f"{r['params']:>10,}{r['train_seconds']:>9.1f}"
        )

    model = best[0]
    print(
        f"\nbest fused model: {model.name} (accuracy {best[1]:.4f}; chosen on validation "
        f"accuracy {best[2]:.4f}, {len(y_val)} of the training images)"
    )
    report = {
        "best": model.name,
        "epochs": args.epochs,
        "seeds": args.seeds,
        "validation_samples": int(len(y_val)),
        "models": summary,
    }
    if model.fusion_kind in ("attention", "gated", "weighted"):
        weights = kinspect.branch_weights(model, x_test)
        print("branch weights (mean over held-out samples):")
        for label, value in weights["mean"].items():
            print(f"  {label:<24}{value:.3f}")
        report["branch_weights"] = weights["mean"]
    ablation = kinspect.ablation(model, x_test, y_test)
    print(
        f"ablation (accuracy drop when a branch's features are replaced by their mean; "
        f"baseline {ablation['baseline']:.4f}):"
    )
    for label, value in ablation["branches"].items():
        print(f"  {label:<24}{value['drop']:+.4f}")
    report["ablation"] = ablation

    saved = kexport.export(model, os.path.join(out, "best_saved_model"), probe=x_test[:8])
    keras_path = kexport.export(
        model, os.path.join(out, "best.keras"), format="keras", probe=x_test[:8]
    )
    arch = kinspect.plot(model, os.path.join(out, "architecture.png"))
    curves = _plot_curves(histories, os.path.join(out, "training_curves.png"))
    expected = model.predict(x_test[:64], verbose=0)
    diff = _verify_in_fresh_process(saved, x_test[:64], expected)
    if diff > 1e-4:
        raise RuntimeError(f"SavedModel reloaded in a fresh process differs by {diff:.3g}")
    print(f"\nSavedModel reloaded in a fresh process: outputs equal (max difference {diff:.1e})")
    report["files"] = {
        "saved_model": saved,
        "keras": keras_path,
        "architecture": arch,
        "training_curves": curves,
    }
    report["fresh_process_max_difference"] = diff
    _atomic_json(report, os.path.join(out, "results.json"))
    written = ["best_saved_model/", "best.keras"]
    written += ["architecture.png"] if arch else []
    written += ["training_curves.png"] if curves else []
    print(f"wrote {out}/: {', '.join(written + ['results.json'])}")
    return 0


# -------------------------------------------------------------------------------- train
def _load_train_spec(path):
    from kfusion.models import _spec

    if not os.path.isfile(path):
        raise UserError(f"spec file not found: {path}")
    try:
        spec = _spec.load_spec(path)
    except ValueError as e:
        raise UserError(str(e).splitlines()[0]) from None
    try:
        _spec.check_keys(spec, _spec.MODEL_KEYS + TRAIN_KEYS, f"spec {path}")
    except ValueError as e:
        raise UserError(str(e)) from None
    model_spec = {k: v for k, v in spec.items() if k in _spec.MODEL_KEYS}
    train = {k: v for k, v in spec.items() if k in TRAIN_KEYS}
    _check_train_settings(train, path)
    return model_spec, train


def _as_number(value, kind):
    """`value` as an int or a finite float, or None when it is not one.

    Numeric strings count: YAML reads `1e-3` (no dot) as a string.
    """
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(number):
        return None
    if kind is int:
        return int(number) if number.is_integer() else None
    return number


# Each numeric training setting: (int or float, the range it must be in, what it must be).
_TRAIN_NUMBERS = {
    "epochs": (int, lambda v: v >= 1, "an integer >= 1"),
    "batch_size": (int, lambda v: v >= 1, "an integer >= 1"),
    "seed": (int, lambda v: v >= 0, "an integer >= 0"),
    "learning_rate": (float, lambda v: v > 0, "a number > 0"),
    "validation_split": (float, lambda v: 0 <= v < 1, "a number in [0, 1)"),
}
_TRAIN_TYPES = {
    "label": (str, "the name of the label array or column"),
    "optimizer": ((str, dict), "an optimizer name or config"),
    "loss": ((str, dict, list), "a loss name (or a dict or list of them)"),
    "metrics": ((list, dict), "a list of metric names"),
    "recipe": ((str, dict), "a recipe name (small_data) or {name: small_data, ...}"),
}


def _check_train_settings(train, path):
    """Checks the training settings in place (numbers converted); UserError naming the key."""
    for key, value in train.items():
        if key in _TRAIN_NUMBERS:
            kind, in_range, expected = _TRAIN_NUMBERS[key]
            number = _as_number(value, kind)
            if number is not None and in_range(number):
                train[key] = number
                continue
        else:
            types, expected = _TRAIN_TYPES[key]
            if isinstance(value, types) and value != "":
                continue
        raise UserError(f"spec {path}: {key!r} must be {expected}; got {key}={value!r}")
    if "recipe" in train:
        train["recipe"] = _check_recipe(train["recipe"], path)


def _check_recipe(recipe, path):
    """The spec's `recipe` as `{name, options...}`; UserError naming what is wrong."""
    from kfusion.recipes import RECIPES

    entry = {"name": recipe} if isinstance(recipe, str) else dict(recipe)
    unknown = [k for k in entry if k not in RECIPE_OPTIONS]
    if unknown:
        raise UserError(
            f"spec {path}: unknown recipe option {unknown[0]!r}; options: {list(RECIPE_OPTIONS)}"
        )
    if entry.get("name") not in RECIPES:
        raise UserError(
            f"spec {path}: 'recipe' must name one of {list(RECIPES)}; got "
            f"name={entry.get('name')!r}"
        )
    for key, minimum in (("max_epochs", 1), ("patience", 4)):
        if key in entry:
            number = _as_number(entry[key], int)
            if number is None or number < minimum:
                raise UserError(
                    f"spec {path}: recipe {key!r} must be an integer >= {minimum}; "
                    f"got {key}={entry[key]!r}"
                )
            entry[key] = number
    return entry


def _names(value):
    """The strings in a loss/metrics setting (a name, or lists and dicts of them)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [name for item in value for name in _names(item)]
    return []


def _check_compile_names(compile_kwargs, path):
    """UserError for a loss or metric name keras doesn't know (it would say so mid-`fit`)."""
    import keras

    # Names `compile` resolves itself from the labels and outputs.
    own = {"loss": ("crossentropy", "ce"), "metrics": ("accuracy", "acc")}
    get = {"loss": keras.losses.get, "metrics": keras.metrics.get}
    for key, value in compile_kwargs.items():
        for name in _names(value):
            if name.lower() in own[key]:
                continue
            try:
                get[key](name)
            except (ValueError, TypeError):
                raise UserError(
                    f"spec {path}: {key!r} names {name!r}, which keras does not know"
                ) from None


def _load_data(path, input_specs, label):
    """`(x, y)` from a .npz or .csv file; `input_specs` are the model's (name, shape)."""
    import numpy as np

    if not os.path.isfile(path):
        raise UserError(f"data file not found: {path}")
    inputs = {s["name"]: s for s in input_specs}
    if path.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
        if label not in arrays:
            raise UserError(f"{path} has no label array {label!r} (arrays: {sorted(arrays)})")
        y = arrays.pop(label)
        missing = [n for n in inputs if n not in arrays]
        if missing:
            raise UserError(f"{path} has no array for input(s) {missing}; arrays: {sorted(arrays)}")
        x = {n: arrays[n] for n in inputs}
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
    return x, y


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


def cmd_train(args):
    """Trains a FusionModel described by a spec file on .npz or .csv data."""
    model_spec, train = _load_train_spec(args.spec)
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
        raise UserError(f"invalid model spec: {_one_line(e)}") from None
    x, y = _load_data(args.data, model.input_specs, label)
    opt = train.get("optimizer", "adam")
    try:
        optimizer = keras.optimizers.get(opt)
    except ValueError as e:
        raise UserError(f"unknown optimizer {opt!r}: {e}") from None
    if "learning_rate" in train:
        optimizer.learning_rate = float(train["learning_rate"])
    compile_kwargs = {k: train[k] for k in ("loss", "metrics") if k in train}
    _check_compile_names(compile_kwargs, args.spec)
    try:
        model.compile(optimizer=optimizer, **compile_kwargs)
    except (ValueError, TypeError) as e:
        raise UserError(f"spec {args.spec}: cannot compile: {_one_line(e)}") from None
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
    _check_writable_dir(out)
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
                f"training finished but the {fmt} export failed: {_one_line(e)} "
                f"{os.path.join(out, 'checkpoints', 'last.keras')} holds the trained model."
            ) from None
    metrics = {k: [float(v) for v in vals] for k, vals in history.history.items()}
    report = {"epochs": epochs, "history": metrics}
    if recipe is not None:
        report["recipe"] = {**recipe, "batch_size": batch_size, "max_epochs": epochs}
    if validation_info is not None:
        report["validation"] = validation_info
    _atomic_json(report, os.path.join(out, "metrics.json"))
    _say(args, f"wrote {out}/: model.keras, saved_model/, checkpoints/, metrics.json")
    return 0


# ------------------------------------------------------------------------ inspect/export
def _load_any(path):
    if not os.path.exists(path):
        raise UserError(f"model not found: {path}")
    if path.endswith(".keras"):
        from kfusion import export as kexport

        try:
            return kexport.load(path), "keras"
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say so in one line
            raise UserError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb")):
        import tensorflow as tf

        try:
            return tf.saved_model.load(path), "saved_model"
        except Exception as e:  # noqa: BLE001 - a damaged SavedModel: say so in one line
            raise UserError(f"cannot load {path}: {_one_line(e)}") from None
    raise UserError(f"{path} is neither a .keras file nor a SavedModel folder")


def cmd_inspect(args):
    """Prints a saved model's inputs, outputs, branches, fusion and parameter counts."""
    model, kind = _load_any(args.path)
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


def cmd_export(args):
    """Exports a .keras model to saved_model, onnx, litert or keras."""
    from kfusion import export as kexport

    model, kind = _load_any(args.model)
    if kind != "keras":
        raise UserError("export reads a .keras model file")
    parent = os.path.dirname(os.path.abspath(args.out)) or "."
    _check_writable_dir(parent)
    try:
        path = kexport.export(model, args.out, format=args.format)
    except (ValueError, OSError, kexport.ExportVerificationError) as e:
        # A destination it won't replace, NaN weights, an export that did not verify:
        # nothing was written at --out.
        raise UserError(_one_line(e)) from None
    print(f"wrote {path} ({args.format}, verified by reloading)")
    return 0


# --------------------------------------------------------------------------------- main
def build_parser():
    """The argument parser of the `kfusion` command."""
    parser = argparse.ArgumentParser(
        prog="kfusion", description="Multi-branch deep learning models for Keras 3."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train CNN/RNN/Transformer and fused models on digits")
    demo.add_argument("--epochs", type=int, default=8, help="epochs per model (default: 8)")
    demo.add_argument("--seeds", type=int, default=1, help="runs per model, averaged (default: 1)")
    demo.add_argument(
        "--fusion",
        default="all",
        help="fusion kinds to compare, comma-separated, from concat, weighted, attention, "
        "gated, low_rank; all (the default) means concat,attention,gated",
    )
    demo.add_argument("--out", default="kfusion-demo", help="output folder (default: kfusion-demo)")
    demo.add_argument("--quiet", action="store_true", help="print only the results")
    demo.set_defaults(func=cmd_demo)

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
    train.set_defaults(func=cmd_train)

    insp = sub.add_parser("inspect", help="describe a saved .keras model or SavedModel")
    insp.add_argument("path", help="a .keras file or a SavedModel folder")
    insp.set_defaults(func=cmd_inspect)

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
    exp.set_defaults(func=cmd_export)
    return parser


def main(argv=None):
    """Entry point of the `kfusion` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"kfusion {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"kfusion {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
