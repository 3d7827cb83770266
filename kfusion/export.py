"""Export a model and prove the export: write atomically, reload, compare outputs.

Formats:

| format          | writes                      | reloaded with                          |
|-----------------|-----------------------------|----------------------------------------|
| `"saved_model"` | a TensorFlow SavedModel dir | `tf.saved_model.load` (`serve`)        |
| `"keras"`       | a `.keras` file             | `keras.saving.load_model(safe_mode=True)` |
| `"onnx"`        | a `.onnx` file              | onnxruntime, where installed           |
| `"litert"`      | a `.tflite` file            | the LiteRT interpreter (`ai-edge-litert`) |

Quantized exports (`quantize=`), each checked against the float model:

| format                     | modes                                          |
|----------------------------|------------------------------------------------|
| `"keras"`, `"saved_model"` | `"int8"`, `"int4"`, `"float8"` (keras' `quantize`, copy) |
| `"litert"`                 | `"dynamic"`, `"float16"`, `"int8"` (calibrated on `data`)   |
| `"onnx"`                   | `"dynamic"` (onnxruntime's `quantize_dynamic`)   |

keras quantizes the weights of Dense, EinsumDense and Embedding layers (the others stay
float); LiteRT `"dynamic"` stores weights as int8, `"float16"` as float16, and `"int8"`
runs weights and activations in int8 with inputs and outputs kept float32.

For LiteRT, recurrent layers over inputs of fixed length are unrolled in the converted
graph (builtin ops only). Over sequences of unknown length, and in a bidirectional layer
that returns sequences, they stay loops that need the Select-TF ops this interpreter
lacks, and the export is refused.

On the TensorFlow backend, ONNX is written by tf2onnx with kfusion's handler for the
`Erfc` op of the exact GELU (see `kfusion._onnx`), with the model's input names, the
SavedModel signature's output names (`output_0`, ...) and a batch dimension named
`batch`.

Every export is written to a temporary path beside the target, reloaded and compared with
the model on a probe batch, and only then renamed into place: a failed export leaves an
earlier export at that path intact, and nothing half-written where the user's file was.
Before anything is written, `export` refuses a model with NaN or infinite weights (a
diverged training run), a model or input name that a SavedModel or LiteRT signature
cannot carry, and a destination it would not simply replace: a folder for a file format,
or a non-empty folder that is not a SavedModel for `"saved_model"`. A converter that
fails is reported as one `ExportError` line naming the format, the layer where that can
be told, and what to do.
"""

import contextlib
import json
import logging
import numbers
import os
import re
import shutil
import sys
import tempfile
import warnings
import zipfile

import keras
import numpy as np

from kfusion import _checks

FORMATS = ("saved_model", "keras", "onnx", "litert")
_ALIASES = {"tf_saved_model": "saved_model", "tflite": "litert"}
SERVING_SIGNATURE = "serving_default"

QUANTIZE_MODES = {
    "keras": ("int8", "int4", "float8"),
    "saved_model": ("int8", "int4", "float8"),
    "litert": ("dynamic", "float16", "int8"),
    "onnx": ("dynamic",),
}
# Names a SavedModel / LiteRT signature carries (TensorFlow's op-name pattern, without the
# scope separators "/" and ">", which keras names never hold).
_SIGNATURE_NAME = re.compile(r"^[A-Za-z0-9.][A-Za-z0-9_.-]*$")

__all__ = [
    "ExportError",
    "ExportResult",
    "ExportVerificationError",
    "check_signature_name",
    "export",
    "load",
    "probe_batch",
    "safe_signature_name",
]


class ExportError(RuntimeError):
    """An export failed: one line naming the format, the layer where known, what to do.

    `export` raises it (or its subclass `ExportVerificationError`) before anything
    reaches the destination, so an earlier export there stays intact. The converter's
    own exception is kept as `__cause__`.

    Example:

    >>> from kfusion.export import ExportError
    >>> issubclass(ExportError, RuntimeError)
    True
    """


class ExportVerificationError(ExportError):
    """The reloaded export's outputs differ from the model's (or could not be checked).

    `export` raises it after writing to a temporary path and before anything reaches the
    destination, so an earlier export there stays intact.

    Example:

    >>> from kfusion.export import ExportVerificationError
    >>> issubclass(ExportVerificationError, RuntimeError)
    True
    """


class ExportResult(str):
    """The path `export` wrote (a `str`), with what its verification measured.

    Attributes:
        format: the format written (`"saved_model"`, `"keras"`, `"onnx"`, `"litert"`).
        quantize: the quantization mode, or None.
        max_abs_diff: the largest absolute difference between the reloaded export's
            outputs and the float model's on the probe batch.
        class_agreement: the share of probe rows whose predicted class (argmax of an
            output with two or more units) is the float model's, or None.
        probe_rows: the number of probe rows compared.
        size_bytes: the size of the export on disk.

    Example:

    >>> from kfusion.export import ExportResult
    >>> result = ExportResult("/tmp/m.tflite", format="litert", quantize="int8")
    >>> result, result.quantize
    ('/tmp/m.tflite', 'int8')
    """

    def __new__(cls, path, **measures):
        self = super().__new__(cls, path)
        self.format = measures.get("format")
        self.quantize = measures.get("quantize")
        self.max_abs_diff = measures.get("max_abs_diff")
        self.class_agreement = measures.get("class_agreement")
        self.probe_rows = measures.get("probe_rows")
        self.size_bytes = measures.get("size_bytes")
        return self

    def summary(self):
        """One line: format, mode, size, largest difference and class agreement."""
        parts = [self.format or "export"]
        if self.quantize:
            parts.append(f"quantize={self.quantize}")
        if self.size_bytes is not None:
            parts.append(f"{self.size_bytes / 1024:.1f} KiB")
        if self.max_abs_diff is not None:
            parts.append(f"max abs diff vs the float model {self.max_abs_diff:.3g}")
        if self.class_agreement is not None:
            parts.append(
                f"predicted classes agree on {100 * self.class_agreement:.1f}% of "
                f"{self.probe_rows} rows"
            )
        return ", ".join(parts)


def _input_specs(model):
    specs = getattr(model, "input_specs", None)
    if specs:
        if getattr(model, "missing_modalities", False):
            # The presence flags (`"<name>_present"`, bool (batch,)) are inputs too.
            flags = [{"name": f"{s['name']}_present", "shape": [], "dtype": "bool"} for s in specs]
            return list(specs) + flags
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


def safe_signature_name(name):
    """`name` made into one a SavedModel, ONNX and LiteRT signature carries.

    Accents are dropped (`"température"` -> `"temperature"`), any other character that is
    not a letter, digit, `_`, `.` or `-` becomes `_`, and a leading `_` or `-` gets an
    `x` before it.

    Example:

    >>> from kfusion.export import safe_signature_name
    >>> safe_signature_name("heart rate (bpm)"), safe_signature_name("température")
    ('heart_rate__bpm_', 'temperature')
    """
    import unicodedata

    text = unicodedata.normalize("NFKD", str(name))
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "x"
    return text if _SIGNATURE_NAME.match(text) else "x" + text


def check_signature_name(what, name):
    """Raises `ValueError` unless `name` can name a SavedModel / LiteRT signature part.

    Such names start with a letter, a digit or `.`, and hold only ASCII letters, digits,
    `_`, `.` and `-` (TensorFlow's op-name rule; ONNX takes any name). `FusionModel`
    checks its model and input names with it when it is built.

    Args:
        what: what is named, for the message (`"Input name"`, `"Model name"`).
        name: the name.

    Example:

    >>> from kfusion.export import check_signature_name
    >>> check_signature_name("Input name", "heart_rate")
    >>> try:
    ...     check_signature_name("Input name", "heart rate")
    ... except ValueError as e:
    ...     print(str(e)[:40])
    Input name 'heart rate' can't be used in
    """
    if isinstance(name, str) and _SIGNATURE_NAME.match(name):
        return
    raise ValueError(
        f"{what} {name!r} can't be used in a SavedModel or LiteRT export (names there "
        "take ASCII letters, digits, '_', '.' and '-', and start with a letter, a digit or "
        f"'.'). Use {safe_signature_name(name)!r}. Received: {name!r}"
    )


def _check_names(model, fmt):
    """Model and input names every TensorFlow signature format needs (not `.keras`)."""
    if fmt not in ("saved_model", "litert"):
        return
    try:
        check_signature_name("Model name", model.name)
        for spec in _input_specs(model):
            check_signature_name("Input name", spec["name"])
    except ValueError as e:
        raise ExportError(f"format={fmt!r}: {e} Rename it and export again.") from None


def _check_path(path):
    """`path` as a string; `ValueError` unless it is a non-empty str or os.PathLike."""
    if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
        raise ValueError(f"`path` must be a non-empty path. Received: path={path!r}")
    return os.fspath(path)


def _check_tolerance(name, value):
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not 0.0 <= float(value) < float("inf")
    ):
        raise ValueError(
            f"`{name}` must be a finite float >= 0 or None. Received: {name}={value!r}"
        )
    return float(value)


def _check_quantize(fmt, quantize, data):
    if quantize is None:
        return None
    modes = QUANTIZE_MODES[fmt]
    if quantize not in modes:
        raise ValueError(
            f"`quantize` for format={fmt!r} must be one of {list(modes)} or None "
            f"({_QUANTIZE_HINT}). Received: quantize={quantize!r}"
        )
    if fmt == "litert" and quantize == "int8" and data is None:
        raise ValueError(
            "`quantize='int8'` for LiteRT calibrates the activations on real inputs: pass "
            "`data=` (a few hundred training rows, as for `predict`). Received: data=None"
        )
    return quantize


_QUANTIZE_HINT = ", ".join(f"{f}: {'/'.join(m)}" for f, m in QUANTIZE_MODES.items())


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
        if dtype == "bool":
            out[spec["name"]] = rng.random(size=shape) < 0.7
        elif dtype.startswith(("int", "uint")):
            out[spec["name"]] = rng.integers(1, 3, size=shape).astype(dtype)
        else:
            out[spec["name"]] = rng.normal(size=shape).astype(dtype)
    if len(out) == 1 and not isinstance(model.input, dict):
        return next(iter(out.values()))
    return out


def _to_numpy(x):
    return [np.asarray(keras.ops.convert_to_numpy(t)) for t in keras.tree.flatten(x)]


def _measure(expected, got, what):
    """`(expected, got)` as float32 arrays of one shape each; checks the output count."""
    expected, got = _to_numpy(expected), _to_numpy(got)
    if len(expected) != len(got):
        raise ExportVerificationError(
            f"{what}: the reloaded export returns {len(got)} outputs, the model {len(expected)}"
        )
    pairs = []
    for e, g in zip(expected, got):
        e = e.astype("float32")
        pairs.append((e, np.asarray(g).astype("float32").reshape(e.shape)))
    return pairs


def _compare(expected, got, atol, rtol, what):
    for e, g in _measure(expected, got, what):
        if not np.allclose(e, g, atol=atol, rtol=rtol):
            raise ExportVerificationError(
                f"{what}: reloaded outputs differ from the model's "
                f"(max abs difference {np.max(np.abs(e - g)):.3g}, atol={atol})."
            )


def _agreement(expected, got):
    """`(max abs difference, share of rows with the same argmax or None, rows)`."""
    pairs = _measure(expected, got, "agreement")
    diff = max((float(np.max(np.abs(e - g))) if e.size else 0.0) for e, g in pairs)
    same = [
        np.argmax(e, axis=-1) == np.argmax(g, axis=-1)
        for e, g in pairs
        if e.ndim >= 2 and e.shape[-1] >= 2
    ]
    rows = len(pairs[0][0]) if pairs and pairs[0][0].ndim else 0
    agreement = float(np.mean(np.concatenate([s.ravel() for s in same]))) if same else None
    return diff, agreement, rows


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


@contextlib.contextmanager
def _native_output_captured():
    """Sends what native code prints (converter and interpreter logs) to a scratch file.

    The TFLite converter and interpreter, and TensorFlow's graph passes, write to the
    process's stdout / stderr from C++ ("Created TensorFlow Lite XNNPACK delegate",
    "fully_quantize: 0, ..."), where Python's warning filters and loggers don't reach.
    File descriptors 1 and 2 point at a temporary file meanwhile; the text is dropped
    (a failure is reported as one `ExportError` line instead).
    """
    streams = [s for s in (sys.stdout, sys.stderr) if s is not None]
    for stream in streams:
        with contextlib.suppress(Exception):
            stream.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no file descriptors to redirect (an embedded interpreter)
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            for stream in streams:
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


@contextlib.contextmanager
def _quiet():
    """Keeps keras' and the converters' notices off the console during an export."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _copy(model):
    """A new model with `model`'s architecture and weights (quantizing leaves `model`).

    Not compiled: the optimizer's state belongs to the float weights (and a quantized
    model does not train); `compile` the copy to evaluate it.
    """
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    clone = keras.saving.deserialize_keras_object(config)
    clone.set_weights(model.get_weights())
    return clone


def _keras_quantized(model, mode):
    """A copy of `model` quantized by keras (`"int8"`, `"int4"`, `"float8"`)."""
    from kfusion import _quantization

    clone = _copy(model)
    # Quiet: "Layer Conv1D does not have a `quantize` method implemented" (kept float).
    with _quiet(), _quantization.one_garbage_collection():
        clone.quantize(mode)
    return clone


def _write_saved_model(model, path, probe, atol, rtol, quantize=None, **_):
    tf = _require_tensorflow("saved_model")
    if keras.config.backend() not in ("tensorflow", "jax"):
        raise RuntimeError(
            "format='saved_model' needs the TensorFlow or JAX backend. "
            f"Current backend: {keras.config.backend()}."
        )
    served = _keras_quantized(model, quantize) if quantize else model
    with _quiet():
        keras.Model.export(served, path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)
    got = reloaded.serve(probe)
    if isinstance(got, dict):
        got = _sorted_outputs(got)
    _compare(_model_outputs(served, probe), got, atol, rtol, "saved_model")
    if SERVING_SIGNATURE not in reloaded.signatures:
        raise ExportVerificationError(
            f"saved_model: no {SERVING_SIGNATURE!r} signature in {sorted(reloaded.signatures)}"
        )
    return got


def _write_keras(model, path, probe, atol, rtol, quantize=None, **_):
    saved = _keras_quantized(model, quantize) if quantize else model
    saved.save(path)
    reloaded = load(path)
    got = _model_outputs(reloaded, probe)
    _compare(_model_outputs(saved, probe), got, atol, rtol, "keras")
    return got


def _onnx_session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: no graph-optimisation notices
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def _write_onnx(model, path, probe, atol, rtol, quantize=None, opset=None, **_):
    model(probe, training=False)  # keras' ONNX exporter needs a model that has been called
    if keras.config.backend() == "tensorflow":
        from kfusion import _onnx

        float_path = path + ".float.onnx" if quantize else path
        try:
            _onnx.convert(model, float_path, opset=opset)
        except _onnx.ConversionError as e:
            raise ExportError(_onnx_failure(model, e)) from e
    else:
        float_path = path + ".float.onnx" if quantize else path
        kwargs = {"opset_version": opset} if opset is not None else {}
        with _quiet():
            keras.Model.export(model, float_path, format="onnx", verbose=False, **kwargs)
    if quantize:
        _onnx_quantize_dynamic(float_path, path)
        os.remove(float_path)
    try:
        session = _onnx_session(path)
    except ImportError:
        return None  # written; not verified (documented: onnxruntime is an optional extra)
    got = _onnx_run(session, probe, model)
    _compare(_model_outputs(model, probe), got, atol, rtol, "onnx")
    return got


def _onnx_quantize_dynamic(source, target):
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
        raise ExportError(
            "format='onnx' with quantize='dynamic' needs onnxruntime (`pip install "
            "onnxruntime`, or kfusion[all])."
        ) from e
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)  # "Please consider to run pre-processing..." (root logger)
    try:
        with _quiet():
            quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    finally:
        logging.disable(previous)


def _onnx_run(session, probe, model):
    """Runs an onnxruntime session on `probe`; outputs in the model's output order."""
    names = [i.name for i in session.get_inputs()]
    if isinstance(probe, dict):
        if set(names) == set(probe):
            feeds = {k: probe[k] for k in names}
        else:
            feeds = dict(zip(names, [probe[k] for k in sorted(probe)]))
    else:
        feeds = {names[0]: probe}
    got = session.run(None, {k: np.asarray(v) for k, v in feeds.items()})
    order = [o.name for o in session.get_outputs()]
    by_name = dict(zip(order, got))
    outputs = model.output
    if isinstance(outputs, dict) and set(by_name) == set(outputs):
        return [by_name[k] for k in sorted(outputs)]
    if all(f"output_{i}" in by_name for i in range(len(order))):
        return [by_name[f"output_{i}"] for i in range(len(order))]
    return got


def _onnx_failure(model, error):
    """The one-line message for a tf2onnx failure: the layers and ops it could not take."""
    layers = sorted({_layer_from_op(model, name) for name, _ in error.ops} - {None})
    kinds = sorted({kind for _, kind in error.ops})
    where = f" in layer(s) {', '.join(repr(n) for n in layers)}" if layers else ""
    what = (
        f"tf2onnx cannot convert the TensorFlow op(s) {', '.join(kinds)}" if kinds else str(error)
    )
    return (
        f"format='onnx': {what}{where}. Replace that layer (or its activation) with one "
        "made of ops ONNX has, or export with format='saved_model' or 'litert'."
    )


def _layer_from_op(model, op_name):
    """The path of the deepest layer of `model` named in a TensorFlow op name, or None.

    TensorFlow op names hold the name scopes of the layers that made them, with `_1`,
    `_2`... appended where a scope name was taken already.
    """
    by_name = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        by_name.setdefault(layer.name, layer)
    found = None
    for part in op_name.split("/"):
        for candidate in (part, re.sub(r"_\d+$", "", part)):
            if candidate in by_name:
                found = by_name[candidate]
                break
    if found is None:
        return None
    return found.path or found.name


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


def _rows(data):
    """The number of rows of `data` (an array, or a dict / list of arrays)."""
    return len(keras.tree.flatten(data)[0])


def _litert_options(model, quantize, data):
    """The TFLite converter settings of a LiteRT quantization mode."""
    if quantize is None:
        return {}
    import tensorflow as tf

    options = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantize == "float16":
        options["target_spec"] = {"supported_types": [tf.float16]}
    elif quantize == "int8":
        names = [spec["name"] for spec in _input_specs(model)]
        arrays = data if isinstance(data, dict) else None
        if arrays is None:
            flat = keras.tree.flatten(data)
            arrays = dict(zip(names, flat)) if len(flat) == len(names) else {names[0]: data}
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        rows = min(_rows(arrays), _CALIBRATION_ROWS)

        def representative_dataset():
            for r in range(rows):
                yield {k: v[r : r + 1] for k, v in arrays.items()}

        options["representative_dataset"] = representative_dataset
        # Float ops where an op has no int8 kernel; inputs and outputs stay float32, so
        # the model is fed and read as before.
        options["target_spec"] = {
            "supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        }
    return options


_CALIBRATION_ROWS = 256


def _export_litert(model, path, **options):
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
            with _quiet():
                keras.Model.export(model, path, format="litert", verbose=False, **options)
            return
        except ValueError as e:
            if not layers or "unroll" not in str(e).lower():
                raise
    finally:
        for layer in layers:
            layer.unroll = False
    # A time dimension of unknown length can't be unrolled: convert the loop as it is.
    with _quiet():
        keras.Model.export(model, path, format="litert", verbose=False, **options)


def _litert_interpreter(path):
    """The LiteRT interpreter of `ai-edge-litert`, else TensorFlow's deprecated one."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        tf = _require_tensorflow("litert")
        Interpreter = tf.lite.Interpreter
    with _quiet():  # tf.lite.Interpreter's deprecation notice
        return Interpreter(model_path=path)


def _write_litert(model, path, probe, atol, rtol, quantize=None, data=None, **_):
    _require_tensorflow("litert")
    _export_litert(model, path, **_litert_options(model, quantize, data))
    interpreter = _litert_interpreter(path)
    runner = interpreter.get_signature_runner()
    inputs = probe if isinstance(probe, dict) else None
    expected = _model_outputs(model, probe)
    rows = _rows(probe)
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
    _compare(expected, got, atol, rtol, "litert" + (f" quantize={quantize!r}" if quantize else ""))
    return got


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
_KERAS_PACKAGES = ("keras", "keras_hub", "keras_cv", "keras_nlp")
# keras resolves a function saved with module "builtins" in these keras modules only.
_BUILTIN_FUNCTION_MODULES = (
    "activations",
    "constraints",
    "initializers",
    "losses",
    "metrics",
    "optimizers",
    "regularizers",
)
# keras functions that read, write or change state instead of modelling (keras refuses them
# too, with a vaguer message); and all of `keras.config`.
_NOT_MODELLING = (
    "clear_session",
    "deserialize_keras_object",
    "enable_unsafe_deserialization",
    "get_file",
    "load_img",
    "load_model",
    "load_weights",
    "model_from_json",
    "register_keras_serializable",
    "save_img",
    "save_model",
    "save_weights",
    "serialize_keras_object",
)


def _read_keras_config(path):
    try:
        with zipfile.ZipFile(path) as archive:
            return json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path!r} is not a readable .keras file (a zip archive with a config.json): {e}"
        ) from None


def _is_builtin_function(node):
    """A keras function saved by name (module "builtins"), as keras resolves it."""
    name = node.get("config")
    return (
        node.get("class_name") == "function"
        and isinstance(name, str)
        and any(hasattr(getattr(keras, m), name) for m in _BUILTIN_FUNCTION_MODULES)
    )


def _refused_object(node):
    """Why loading must not resolve this serialized object, or None."""
    module = str(node.get("module") or "")
    name = node["class_name"]
    if name == "function" and isinstance(node.get("config"), str):
        name = node["config"]
    if module == "builtins" and not _is_builtin_function(node):
        return f"{name!r} (module 'builtins': not a keras function)"
    if module.split(".", 1)[0] in _KERAS_PACKAGES and (
        module == "keras.config" or module.startswith("keras.config.") or name in _NOT_MODELLING
    ):
        return f"{module}.{name} (not a modelling object)"
    config = node.get("config")
    if (
        node.get("registered_name") == "kfusion>Backbone"
        and isinstance(config, dict)
        and config.get("weights") is not None
    ):
        # kfusion saves a Backbone's weights in the archive and records weights=None.
        return (
            f"Backbone {config.get('name')!r} with weights={config['weights']!r} (a download "
            "or a file the config names; a loaded Backbone's weights come from the archive)"
        )
    return None


def _unknown_classes(config):
    """Serialized objects in `config` that loading must not resolve.

    Classes neither keras nor a registration knows, `builtins` names that are not keras
    functions, keras' non-modelling functions (`keras.config`, `get_file`, ...), and a
    Backbone whose config names weights to download or read.
    """
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
        refused = _refused_object(node)
        if refused is not None:
            found.append(refused)
            continue
        name = node.get("registered_name") or node["class_name"]
        module = str(node.get("module") or "")
        if name in known or module.split(".", 1)[0] in _KERAS_PACKAGES + ("builtins",):
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
        ValueError: when the file is not a `.keras` archive or is damaged, or names
            classes that are not registered, functions that are not modelling ones
            (`keras.config`, `get_file`, Python builtins) or a Backbone whose config names
            weights to download or read (nothing from the file is run or fetched), or
            when keras' safe mode refuses it (e.g. a `Lambda` layer holding Python code).

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
            f"{path!r} names what loading refuses: {', '.join(unknown)}. Nothing was "
            "loaded. Classes must be keras or registered ones (import the package that "
            "defines yours, with `@keras.saving.register_keras_serializable`, if you trust "
            "the file); functions, modelling ones; weights, those in the archive."
        )
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except (zipfile.BadZipFile, EOFError) as e:  # e.g. a bit flipped in the weights
        raise ValueError(f"{path!r} is damaged and could not be loaded: {e}") from None


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


def _process_is_running(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process
    return True


def _remove_stale_temporaries(parent, base):
    """Removes the `.BASE.tmp-PID-XXXX/` folders that exports killed midway left in `parent`.

    A folder is stale when the process named in it no longer runs (an export running now,
    in another process, keeps its folder); a folder without a process id predates them.
    """
    prefix = f".{base}.tmp-"
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        folder = os.path.join(parent, name)
        if not name.startswith(prefix) or not os.path.isdir(folder) or os.path.islink(folder):
            continue
        pid = name[len(prefix) :].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _process_is_running(int(pid))):
            continue
        shutil.rmtree(folder, ignore_errors=True)


# Default tolerance of the check, by quantization mode: the reloaded export against the
# float model (LiteRT, ONNX) or against the quantized copy it was written from (keras,
# SavedModel: the same arithmetic, so float32's tolerance).
_TOLERANCE = {None: 1e-4, "float16": 1e-2, "dynamic": 5e-2, "int8": 1e-1}
# Models that compute in float16 / bfloat16 somewhere: a converter's half-precision
# kernels round differently from the backend's.
_HALF_TOLERANCE = 1e-2


def _default_tolerance(model, fmt, quantize):
    if quantize is not None and fmt in ("keras", "saved_model"):
        return _TOLERANCE[None]
    tol = _TOLERANCE[quantize]
    half = any(
        keras.backend.standardize_dtype(layer.compute_dtype) in ("float16", "bfloat16")
        for layer in model._flatten_layers(include_self=True, recursive=True)
    )
    return max(tol, _HALF_TOLERANCE) if half else tol


_HINTS = {
    "saved_model": "export with format='keras' (any model), or 'onnx'",
    "keras": "make sure every layer is registered and serializable (get_config)",
    "onnx": "export with format='saved_model', or give the failing layer ops ONNX has",
    "litert": "give sequence inputs a fixed length, or export with format='saved_model' or 'onnx'",
}


def _one_line(error):
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def _converter_failure(model, fmt, quantize, error):
    """An `ExportError` (one line) for an exception a converter or keras raised."""
    text = str(error)
    layer = None
    for match in re.finditer(r"[\w.-]+(?:/[\w.-]+)+", text):
        layer = _layer_from_op(model, match.group(0))
        if layer:
            break
    if layer is None:
        names = {
            sub.name: sub.path or sub.name
            for sub in model._flatten_layers(include_self=False, recursive=True)
        }
        quoted = [n for n in names if f"'{n}'" in text or f'"{n}"' in text]
        if quoted:
            layer = names[max(quoted, key=len)]
    mode = f" quantize={quantize!r}" if quantize else ""
    where = f" at layer {layer!r}" if layer else ""
    return ExportError(
        f"format={fmt!r}{mode}: the export failed{where}: {type(error).__name__}: "
        f"{_one_line(error)} To do: {_HINTS[fmt]}."
    )


def export(
    model,
    path,
    format="saved_model",
    probe=None,
    atol=None,
    rtol=None,
    quantize=None,
    data=None,
    opset=None,
):
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
        probe: input batch for the check; default: the first 64 rows of `data` when
            given, else `probe_batch(model)` (random inputs).
        atol: absolute tolerance of the check; None: 1e-4, or what fits `quantize`
            (float16 1e-2, dynamic 5e-2, int8 0.1; at least 1e-2 for a model that
            computes in half precision). Quantized `"keras"` and `"saved_model"` exports
            are checked against the quantized copy they were written from at 1e-4.
        rtol: relative tolerance of the check; None: as `atol`.
        quantize: None, or a mode of `QUANTIZE_MODES[format]`. `"keras"` and
            `"saved_model"`: `"int8"`, `"int4"` or `"float8"`, keras' `model.quantize`
            applied to a copy (`model` itself is left as it is). `"litert"`:
            `"dynamic"` (int8 weights), `"float16"` (float16 weights) or `"int8"`
            (int8 weights and activations, calibrated on `data`; inputs and outputs
            stay float32). `"onnx"`: `"dynamic"` (int8 weights).
        data: the model's inputs on real data (arrays or a dict of them, as for
            `predict`): the calibration set of `quantize="int8"` (its first 256 rows)
            and the default probe.
        opset: the ONNX opset, or None for the converter's default.

    Returns:
        The path written, as an `ExportResult` (a `str` with `format`, `quantize`,
        `max_abs_diff` and `class_agreement` against the float model, `probe_rows`,
        `size_bytes`, and `summary()`).

    Raises:
        ValueError: for an unknown `format` or `quantize` mode, a `model` that is not a
            keras Model or whose weights hold NaN or inf, a `path` that is not a path,
            an `atol`/`rtol` that is not a finite float >= 0, or `quantize="int8"`
            for LiteRT without `data`.
        FileExistsError: when `path` is a file (`"saved_model"`) or a folder that is
            not a SavedModel; IsADirectoryError when it is a folder for a file format.
            Nothing is written.
        ExportError: when a converter fails (one line: the format, the layer where it
            can be told, what to do) or a model or input name can't name a signature;
            `ExportVerificationError` (a subclass) when the reloaded export's outputs
            differ. Nothing reaches `path`.

    Example:

    >>> import keras, tempfile, os
    >>> from kfusion.export import export
    >>> i = keras.Input((3,), name="x")
    >>> model = keras.Model(i, keras.layers.Dense(2)(i))
    >>> out = export(model, os.path.join(tempfile.mkdtemp(), "m.keras"), format="keras")
    >>> os.path.basename(out), out.max_abs_diff < 1e-6
    ('m.keras', True)
    """
    fmt = _ALIASES.get(format, format) if isinstance(format, str) else format
    if fmt not in FORMATS:
        raise ValueError(f"`format` must be one of {list(FORMATS)}. Received: format={format!r}")
    _check_model(model)
    path = _check_path(path)
    atol = _check_tolerance("atol", atol)
    rtol = _check_tolerance("rtol", rtol)
    quantize = _check_quantize(fmt, quantize, data)
    if opset is not None:
        opset = _checks.check_int("opset", opset)
    bad = _checks.first_non_finite(model.weights)
    if bad is not None:
        raise ValueError(
            f"`model` has NaN or inf values in weight {bad!r} (did training diverge?): "
            f"export refuses it and writes nothing. Received: model={model.name!r}"
        )
    _check_names(model, fmt)
    path = os.path.abspath(path)
    _check_destination(path, fmt)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    if probe is None:
        probe = _first_rows(data, _PROBE_ROWS) if data is not None else probe_batch(model)
    default = _default_tolerance(model, fmt, quantize)
    atol = default if atol is None else atol
    rtol = atol if rtol is None else rtol
    options = {
        k: v
        for k, v in {"quantize": quantize, "data": data, "opset": opset}.items()
        if v is not None
    }
    base = os.path.basename(path)
    _remove_stale_temporaries(parent, base)
    tmp_dir = tempfile.mkdtemp(prefix=f".{base}.tmp-{os.getpid()}-", dir=parent)
    try:
        tmp = os.path.join(tmp_dir, base if fmt == "saved_model" else "export" + _SUFFIX[fmt])
        try:
            with _native_output_captured():
                got = _WRITERS[fmt](model, tmp, probe, atol, rtol, **options)
        except (ExportError, OSError):
            raise
        except Exception as e:  # noqa: BLE001 - converters raise anything; one line for it
            raise _converter_failure(model, fmt, quantize, e) from e
        measures = {"format": fmt, "quantize": quantize, "size_bytes": _size(tmp)}
        if got is not None:
            diff, agreement, rows = _agreement(_model_outputs(model, probe), got)
            measures.update(max_abs_diff=diff, class_agreement=agreement, probe_rows=rows)
        _publish(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExportResult(path, **measures)


_PROBE_ROWS = 64


def _first_rows(data, rows):
    return keras.tree.map_structure(lambda a: np.asarray(a)[:rows], data)


def _size(path):
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(path)
            for f in files
        )
    return os.path.getsize(path)
