"""ONNX conversion of TensorFlow-backend models through tf2onnx, with kfusion's fixes.

keras' own `model.export(format="onnx")` hands the model to tf2onnx as it is. Two things
go wrong there that this module fixes:

- TensorFlow's exact GELU (`keras.activations.gelu(approximate=False)`, the Transformer
  branch's feed-forward activation) lowers to an `Erfc` op that tf2onnx 1.17 has no
  handler for (onnx/tensorflow-onnx issue 2347), so the written graph is invalid. ONNX
  has `Erf` since opset 9 and a `Gelu` op only since opset 20, which tf2onnx 1.17 cannot
  emit (its newest opset is 18), so `Erfc(x)` is written as `1 - Erf(x)`: exact in float
  arithmetic up to the rounding of one subtraction, and valid at every opset tf2onnx
  writes. (For large x, `1 - Erf(x)` loses the tiny tail of `Erfc(x)` that GELU scales
  by x; GELU's output there is 0 to float precision either way.)
- tf2onnx logs its recoverable detours ("TF freezing failed. Attempting to fix freezing
  errors.") and numpy-2 notices on every conversion. They are kept out of the user's
  console; on a failed conversion the ops it could not convert are named in the error.

Inputs keep the model's input names and outputs the SavedModel signature's names
(`output_0`, or the task names of a dict output); the batch dimension is named `batch`.
"""

import contextlib
import logging
import re
import warnings

import keras
import numpy as np

_UNSUPPORTED = re.compile(r"Tensorflow op \[(?P<name>[^:\]]+): (?P<type>[^\]]+)\] is not supported")


class ConversionError(RuntimeError):
    """tf2onnx could not convert the graph; `ops` lists `(op name, op type)` pairs."""

    def __init__(self, message, ops=()):
        super().__init__(message)
        self.ops = list(ops)


def _erfc_handler(ctx, node, name, args):
    """tf2onnx handler: `Erfc(x)` -> `Sub(1, Erf(x))`, keeping the node's output name."""
    from tf2onnx import utils

    x = node.input[0]
    np_dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(x))
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=np_dtype))
    erf = ctx.make_node("Erf", [x], op_name_scope=name)
    shapes, dtypes, output = node.output_shapes, node.output_dtypes, node.output[0]
    ctx.remove_node(name)
    ctx.make_node(
        "Sub",
        [one.output[0], erf.output[0]],
        outputs=[output],
        name=name,
        shapes=shapes,
        dtypes=dtypes,
    )


CUSTOM_OP_HANDLERS = {"Erfc": (_erfc_handler, [])}


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.messages = []

    def emit(self, record):
        try:
            self.messages.append(record.getMessage())
        except Exception:  # noqa: BLE001 - a malformed log record must not fail the export
            pass


@contextlib.contextmanager
def quiet_tf2onnx():
    """Keeps tf2onnx's log lines and numpy notices off the console; yields their text."""
    logger = logging.getLogger("tf2onnx")
    records = _Records()
    level, propagate = logger.level, logger.propagate
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield records.messages
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
        logger.propagate = propagate


def _patch_tf2onnx():
    """keras' numpy-2 compatibility patch for tf2onnx, where this keras has it."""
    try:
        from keras.src.export.tf2onnx_lib import patch_tf2onnx
    except ImportError:  # pragma: no cover - older or newer keras layouts
        return
    patch_tf2onnx()


def _spec(tensor):
    import tensorflow as tf

    return tf.TensorSpec(
        tuple(tensor.shape), keras.backend.standardize_dtype(tensor.dtype), name=tensor.name
    )


def signature(model):
    """The `tf.TensorSpec` structure of `model.input`, named after the model's inputs."""
    return keras.tree.map_structure(_spec, model.input)


def output_dict(outputs):
    """The model's outputs as the SavedModel signature names them."""
    if isinstance(outputs, dict):
        return dict(outputs)
    flat = keras.tree.flatten(outputs)
    return {f"output_{i}": t for i, t in enumerate(flat)}


def _name_batch_dimension(model_proto):
    for value in list(model_proto.graph.input) + list(model_proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if len(dims) and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"


def convert(model, path, opset=None):
    """Writes `model` (TensorFlow backend) to `path` as ONNX; `ConversionError` on failure."""
    import onnx
    import tensorflow as tf

    spec = signature(model)

    @tf.function
    def serve(inputs):
        return output_dict(model(inputs, training=False))

    with quiet_tf2onnx() as messages:
        import tf2onnx

        _patch_tf2onnx()
        try:
            model_proto, _ = tf2onnx.convert.from_function(
                serve,
                input_signature=[spec],
                opset=opset,
                custom_op_handlers=dict(CUSTOM_OP_HANDLERS),
            )
        except Exception as e:  # noqa: BLE001 - tf2onnx raises anything from its passes
            raise ConversionError(f"tf2onnx failed: {_first_line(e)}") from e
    unsupported = []
    for message in messages:
        for match in _UNSUPPORTED.finditer(message):
            unsupported.append((match.group("name"), match.group("type")))
    if unsupported:
        kinds = sorted({t for _, t in unsupported})
        raise ConversionError(
            f"tf2onnx cannot convert the TensorFlow op(s) {', '.join(kinds)}", unsupported
        )
    _name_batch_dimension(model_proto)
    onnx.save(model_proto, path)


def _first_line(error):
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
