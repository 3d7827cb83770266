"""Export a model and prove the export: write atomically, reload, compare outputs.

Formats:

| format          | writes                      | reloaded with                          |
|-----------------|-----------------------------|----------------------------------------|
| `"saved_model"` | a TensorFlow SavedModel dir | `tf.saved_model.load` (`serve`)        |
| `"keras"`       | a `.keras` file             | `keras.saving.load_model(safe_mode=True)` |
| `"onnx"`        | a `.onnx` file              | onnxruntime, where installed           |
| `"litert"`      | a `.tflite` file            | the LiteRT / TFLite interpreter        |

For LiteRT, recurrent layers over inputs of fixed length are unrolled in the converted
graph (builtin ops only). Over sequences of unknown length, and in a bidirectional layer
that returns sequences, they stay loops that need the Select-TF ops this interpreter
lacks, and the export is refused.

Every export is written to a temporary path beside the target, reloaded and compared with
the model on a probe batch, and only then renamed into place: a failed export leaves an
earlier export at that path intact, and nothing half-written where the user's file was.
Before anything is written, `export` refuses a model with NaN or infinite weights (a
diverged training run) and a destination it would not simply replace: a folder for a file
format, or a non-empty folder that is not a SavedModel for `"saved_model"`.
"""

import json
import numbers
import os
import shutil
import tempfile
import warnings
import zipfile

import keras
import numpy as np

from kfusion import _checks

FORMATS = ("saved_model", "keras", "onnx", "litert")
_ALIASES = {"tf_saved_model": "saved_model", "tflite": "litert"}
SERVING_SIGNATURE = "serving_default"

__all__ = ["ExportVerificationError", "export", "load", "probe_batch"]


class ExportVerificationError(RuntimeError):
    """The reloaded export's outputs differ from the model's (or could not be checked).

    `export` raises it after writing to a temporary path and before anything reaches the
    destination, so an earlier export there stays intact.

    Example:

    >>> from kfusion.export import ExportVerificationError
    >>> issubclass(ExportVerificationError, RuntimeError)
    True
    """


def _input_specs(model):
    specs = getattr(model, "input_specs", None)
    if specs:
        return specs
    inputs = model.inputs
    return [
        {
            "name": t.name,
            "shape": list(t.shape[1:]),
            "dtype": keras.backend.standardize_dtype(t.dtype),
        }
        for t in inputs
    ]


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise ValueError(f"`model` must be a keras.Model. Received: model={model!r}")


def _check_path(path):
    """`path` as a string; `ValueError` unless it is a non-empty str or os.PathLike."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"`path` must be a non-empty path. Received: path={path!r}")
    return os.fspath(path)


def _check_tolerance(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= float(value) < float("inf")
    ):
        raise ValueError(f"`{name}` must be a finite float >= 0. Received: {name}={value!r}")
    return float(value)


def probe_batch(model, batch_size=2, seed=0):
    """A small batch of inputs for `model`: normal floats, token ids >= 1 for int inputs.

    Args:
        model: a keras Model (FusionModel or any functional model).
        batch_size: int, rows in the batch.
        seed: int, NumPy seed.

    Returns:
        One array (single input) or a dict input name -> array.

    Example:

    >>> import keras
    >>> from kfusion.export import probe_batch
    >>> i = keras.Input((3,), name="x")
    >>> probe_batch(keras.Model(i, keras.layers.Dense(1)(i))).shape
    (2, 3)
    """
    _check_model(model)
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, numbers.Integral)
        or batch_size < 1
    ):
        raise ValueError(
            f"`batch_size` must be an integer >= 1. Received: batch_size={batch_size!r}"
        )
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0. Received: seed={seed!r}")
    rng = np.random.default_rng(seed)
    out = {}
    for spec in _input_specs(model):
        shape = (batch_size,) + tuple(d if d is not None else 8 for d in spec["shape"])
        dtype = spec["dtype"]
        if dtype.startswith(("int", "uint")):
            out[spec["name"]] = rng.integers(1, 3, size=shape).astype(dtype)
        else:
            out[spec["name"]] = rng.normal(size=shape).astype(dtype)
    if len(out) == 1 and not isinstance(model.input, dict):
        return next(iter(out.values()))
    return out


def _to_numpy(x):
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(x)]


def _compare(expected, got, atol, rtol, what):
    expected, got = _to_numpy(expected), _to_numpy(got)
    if len(expected) != len(got):
        raise ExportVerificationError(
            f"{what}: the reloaded export returns {len(got)} outputs, the model {len(expected)}"
        )
    for e, g in zip(expected, got):
        e = e.astype("float32")
        g = np.asarray(g).astype("float32").reshape(e.shape)
        if not np.allclose(e, g, atol=atol, rtol=rtol):
            raise ExportVerificationError(
                f"{what}: reloaded outputs differ from the model's "
                f"(max abs difference {np.max(np.abs(e - g)):.3g}, atol={atol})."
            )


def _sorted_outputs(outputs):
    if isinstance(outputs, dict):
        return [outputs[k] for k in sorted(outputs)]
    return outputs


def _model_outputs(model, probe):
    out = model(probe, training=False)
    return _sorted_outputs(out) if isinstance(out, dict) else out


def _require_tensorflow(fmt):
    try:
        import tensorflow as tf
    except ImportError as e:  # pragma: no cover - TensorFlow is a dependency
        raise RuntimeError(f"format={fmt!r} needs TensorFlow (`pip install tensorflow`).") from e
    return tf


def _write_saved_model(model, path, probe, atol, rtol):
    tf = _require_tensorflow("saved_model")
    if keras.config.backend() not in ("tensorflow", "jax"):
        raise RuntimeError(
            "format='saved_model' needs the TensorFlow or JAX backend. "
            f"Current backend: {keras.config.backend()}."
        )
    model.export(path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)
    got = reloaded.serve(probe)
    if isinstance(got, dict):
        got = _sorted_outputs(got)
    _compare(_model_outputs(model, probe), got, atol, rtol, "saved_model")
    if SERVING_SIGNATURE not in reloaded.signatures:
        raise ExportVerificationError(
            f"saved_model: no {SERVING_SIGNATURE!r} signature in {sorted(reloaded.signatures)}"
        )


def _write_keras(model, path, probe, atol, rtol):
    model.save(path)
    reloaded = load(path)
    _compare(_model_outputs(model, probe), _model_outputs(reloaded, probe), atol, rtol, "keras")


def _write_onnx(model, path, probe, atol, rtol):
    model(probe, training=False)  # keras' ONNX exporter needs a model that has been called
    model.export(path, format="onnx", verbose=False)
    try:
        import onnxruntime as ort
    except ImportError:
        return  # written; not verified (documented: onnxruntime is an optional extra)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = probe if isinstance(probe, dict) else {session.get_inputs()[0].name: probe}
    names = [i.name for i in session.get_inputs()]
    if isinstance(probe, dict) and set(names) != set(probe):
        feeds = dict(zip(names, [probe[k] for k in sorted(probe)]))
    got = session.run(None, {k: np.asarray(v) for k, v in feeds.items()})
    expected = model(probe, training=False)
    if isinstance(expected, dict):
        order = [o.name for o in session.get_outputs()]
        by_name = dict(zip(order, got))
        if set(by_name) == set(expected):
            got = [by_name[k] for k in sorted(expected)]
        expected = _sorted_outputs(expected)
    _compare(expected, got, atol, rtol, "onnx")


def _unrollable_layers(model):
    """The keras RNN layers (LSTM, GRU, Bidirectional halves) inside `model` to unroll.

    Left out: layers built on sequences of unknown length (nothing to unroll over), and
    the halves of a `Bidirectional` that returns sequences: unrolled under a padding mask,
    keras (3.15) misaligns its backward half's outputs, so padding would change the
    results (the `while` loop gets them right).
    """
    # `_flatten_layers` walks every tracked sub-layer, however deep (branches keep their
    # RNNs as attributes, not in a `layers` list).
    layers = list(model._flatten_layers(include_self=False, recursive=True))
    kept_as_loops = set()
    for layer in layers:
        if isinstance(layer, keras.layers.Bidirectional) and layer.return_sequences:
            kept_as_loops.update((id(layer.forward_layer), id(layer.backward_layer)))
    return [
        layer
        for layer in layers
        if isinstance(layer, keras.layers.RNN)
        and not layer.unroll
        and id(layer) not in kept_as_loops
        and _fixed_length(layer)
    ]


def _fixed_length(layer):
    """Whether an RNN layer was built on sequences of a known number of steps."""
    shapes = list((getattr(layer, "_build_shapes_dict", None) or {}).values())
    if not shapes or not isinstance(shapes[0], (tuple, list)) or len(shapes[0]) < 2:
        return True  # unknown here: tried, and the export falls back if keras refuses
    return shapes[0][1] is not None


def _export_litert(model, path):
    """`model.export(format="litert")` with its RNNs unrolled where their length is fixed.

    A keras RNN runs a `while` loop over time steps, which the converter turns into
    TensorList ops that only the Select-TF (Flex) delegate runs. Unrolled over a known
    number of steps, the same weights give a loop-free graph of builtin ops. The layers'
    `unroll` flags are set for the trace only and restored afterwards. Layers that can't
    be unrolled (see `_unrollable_layers`) stay loops, and the verification says the
    interpreter can't run them. Should keras still refuse to unroll one of the chosen
    layers, all of them are exported as loops.
    """
    layers = _unrollable_layers(model)
    try:
        for layer in layers:
            layer.unroll = True
        try:
            model.export(path, format="litert", verbose=False)
            return
        except ValueError as e:
            if not layers or "unroll" not in str(e).lower():
                raise
    finally:
        for layer in layers:
            layer.unroll = False
    # A time dimension of unknown length can't be unrolled: convert the loop as it is.
    model.export(path, format="litert", verbose=False)


def _write_litert(model, path, probe, atol, rtol):
    tf = _require_tensorflow("litert")
    _export_litert(model, path)
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        Interpreter = tf.lite.Interpreter
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tf.lite.Interpreter's deprecation notice
        interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner()
    inputs = probe if isinstance(probe, dict) else None
    expected = _model_outputs(model, probe)
    rows = len(keras.tree.flatten(probe)[0])
    got_rows = []
    sig_inputs = interpreter.get_signature_list()[SERVING_SIGNATURE]["inputs"]
    for r in range(rows):
        if inputs is None:
            feed = {sig_inputs[0]: np.asarray(probe[r : r + 1])}
        else:
            feed = {k: np.asarray(inputs[k][r : r + 1]) for k in sig_inputs}
        try:
            result = runner(**feed)
        except RuntimeError as e:
            if "Flex" not in str(e) and "Select TensorFlow op" not in str(e):
                raise
            raise ExportVerificationError(
                "litert: the converted model needs Select TensorFlow ops (a recurrent "
                "layer over sequences of unknown length, or a bidirectional one returning "
                "sequences, stays a loop of TensorList ops; others are unrolled into "
                "builtin ops), which this LiteRT interpreter cannot run, so the export "
                "could not be verified and was not written. Give the model's sequence "
                "inputs a fixed length, or use saved_model/onnx."
            ) from None
        got_rows.append([result[k] for k in sorted(result)])
    got = [np.concatenate([row[i] for row in got_rows]) for i in range(len(got_rows[0]))]
    _compare(expected, got, atol, rtol, "litert")


_WRITERS = {
    "saved_model": _write_saved_model,
    "keras": _write_keras,
    "onnx": _write_onnx,
    "litert": _write_litert,
}
_SUFFIX = {"keras": ".keras", "onnx": ".onnx", "litert": ".tflite"}


def _publish(tmp, path):
    """Moves `tmp` to `path`; an earlier file or folder at `path` is replaced only then.

    A file replaces an earlier file in one atomic rename, so `path` is never missing. A
    folder can't replace a folder that way: the earlier one is moved aside first and put
    back if the second rename fails.
    """
    if os.path.lexists(path) and os.path.isdir(tmp):
        backup = f"{tmp}.previous"
        os.replace(path, backup)
        try:
            os.replace(tmp, path)
        except OSError:
            os.replace(backup, path)
            raise
        if os.path.isdir(backup) and not os.path.islink(backup):
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.unlink(backup)
    else:
        os.replace(tmp, path)


# Packages whose classes keras itself resolves by module (it refuses any other module).
_KERAS_PACKAGES = ("keras", "keras_hub", "keras_cv", "keras_nlp", "builtins")


def _read_keras_config(path):
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path!r} is not a readable .keras file (a zip archive with a config.json): {e}"
        ) from None


def _unknown_classes(config):
    """Serialized objects in `config` whose class neither keras nor a registration knows."""
    known = keras.saving.get_custom_objects()
    found, stack = [], [config]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        stack.extend(node.values())
        if "class_name" not in node or "module" not in node:
            continue
        name = node.get("registered_name") or node["class_name"]
        module = str(node.get("module") or "")
        if name in known or module.split(".", 1)[0] in _KERAS_PACKAGES:
            continue
        found.append(f"{node['class_name']!r} (module {module!r}, registered name {name!r})")
    return sorted(set(found))


def load(path):
    """Loads a `.keras` model with `safe_mode=True`, refusing unknown classes up front.

    `keras.saving.load_model(path, safe_mode=True)` never runs code from the file (no
    Python lambdas, no pickle), and fails on a class it cannot find, but its message for
    a class nested in a kfusion model starts with an unrelated hint and a dump of the
    whole configuration. `load` first reads the file's `config.json` as plain JSON and
    lists every object whose class is neither a keras class nor a registered one (every
    kfusion class is registered once `kfusion` is imported), then loads with
    `safe_mode=True`.

    Args:
        path: path of a `.keras` file.

    Returns:
        The model (a `FusionModel`, an ensemble, any keras model).

    Raises:
        ValueError: when the file is not a `.keras` archive, or names classes that are
            not registered (nothing from the file is run), or when keras' safe mode
            refuses it (e.g. a `Lambda` layer holding Python code).

    Example:

    >>> import keras, os, tempfile
    >>> import kfusion as kf
    >>> model = kf.FusionModel(
    ...     inputs=keras.Input((3,), name="x"), branches=[kf.branches.MLP(units=(4,))]
    ... )
    >>> path = os.path.join(tempfile.mkdtemp(), "m.keras")
    >>> model.save(path)
    >>> type(kf.export.load(path)).__name__
    'FusionModel'
    """
    path = _check_path(path)
    if not path.endswith(".keras"):
        raise ValueError(f"`path` must name a .keras file. Received: path={path!r}")
    unknown = _unknown_classes(_read_keras_config(path))
    if unknown:
        raise ValueError(
            f"{path!r} names classes that are neither keras nor registered (kfusion "
            f"registers its own): {', '.join(unknown)}. Nothing was loaded. Import the "
            "package that defines them (with `@keras.saving.register_keras_serializable`) "
            "if you trust the file."
        )
    return keras.saving.load_model(path, safe_mode=True)


def _check_destination(path, fmt):
    """Raises `OSError` when `path` holds something an export to `fmt` must not replace.

    `export` checks this before writing anything; callers that export after a long job
    (`kfusion train`) check it before the job.
    """
    if not os.path.lexists(path):
        return
    if fmt == "saved_model":
        if os.path.isdir(path) and not os.path.islink(path):
            is_saved_model = os.path.exists(os.path.join(path, "saved_model.pb"))
            if is_saved_model or not os.listdir(path):
                return
            raise FileExistsError(
                f"{path!r} is a folder that is not a SavedModel; export will not replace "
                "it. Choose a new path or remove the folder."
            )
        raise FileExistsError(
            f"{path!r} exists and is not a folder; format='saved_model' writes a folder. "
            "Choose a new path or remove the file."
        )
    if os.path.isdir(path) and not os.path.islink(path):
        raise IsADirectoryError(
            f"{path!r} is a folder; format={fmt!r} writes a file. Choose a file path such as "
            f"{os.path.join(path, 'model' + _SUFFIX[fmt])!r}."
        )


def export(model, path, format="saved_model", probe=None, atol=1e-4, rtol=1e-4):
    """Exports `model` to `path`, then reloads the export and checks its outputs.

    The export is written beside `path` under a temporary name, reloaded, compared with the
    model on `probe`, and renamed into place only when the outputs agree: a failed export
    raises and leaves whatever was at `path` before intact.

    Args:
        model: a keras Model (a `FusionModel`, an ensemble, a distilled student...).
        path: where to write. A folder for `"saved_model"`, a file for the others.
        format: `"saved_model"` (TensorFlow SavedModel with a `"serving_default"`
            signature; loads with `tf.saved_model.load` without kfusion), `"keras"`,
            `"onnx"` or `"litert"`.
        probe: input batch for the check; default: `probe_batch(model)`.
        atol: absolute tolerance of the check.
        rtol: relative tolerance of the check.

    Returns:
        The path written, as a string.

    Raises:
        ValueError: for an unknown `format`, a `model` that is not a keras Model or whose
            weights hold NaN or inf, a `path` that is not a path, or an `atol`/`rtol` that
            is not a finite float >= 0.
        FileExistsError: when `path` is a file (`"saved_model"`) or a folder that is
            not a SavedModel; IsADirectoryError when it is a folder for a file format.
            Nothing is written.
        ExportVerificationError: when the reloaded export's outputs differ.

    Example:

    >>> import keras, tempfile, os
    >>> from kfusion.export import export
    >>> i = keras.Input((3,), name="x")
    >>> model = keras.Model(i, keras.layers.Dense(2)(i))
    >>> out = export(model, os.path.join(tempfile.mkdtemp(), "m.keras"), format="keras")
    >>> os.path.basename(out)
    'm.keras'
    """
    fmt = _ALIASES.get(format, format) if isinstance(format, str) else format
    if fmt not in FORMATS:
        raise ValueError(f"`format` must be one of {list(FORMATS)}. Received: format={format!r}")
    _check_model(model)
    path = _check_path(path)
    atol = _check_tolerance("atol", atol)
    rtol = _check_tolerance("rtol", rtol)
    bad = _checks.first_non_finite(model.weights)
    if bad is not None:
        raise ValueError(
            f"`model` has NaN or inf values in weight {bad!r} (did training diverge?): "
            f"export refuses it and writes nothing. Received: model={model.name!r}"
        )
    path = os.path.abspath(path)
    _check_destination(path, fmt)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if probe is None:
        probe = probe_batch(model)
    base = os.path.basename(path)
    tmp_dir = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        tmp = os.path.join(tmp_dir, base if fmt == "saved_model" else "export" + _SUFFIX[fmt])
        _WRITERS[fmt](model, tmp, probe, atol, rtol)
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path
