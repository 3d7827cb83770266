"""Quantized exports: LiteRT dynamic / float16 / int8, ONNX dynamic, int8 `.keras`."""

import os

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion import export as kexport
from tests.conftest import requires_tensorflow

pytestmark = requires_tensorflow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A trained CNN model with kernels big enough for the converters to quantize, and
    its float LiteRT export."""
    keras.utils.set_random_seed(0)
    x, y = kf.datasets.sequence_classification(n=128, length=16, features=8, seed=0)
    model = kf.FusionModel(
        inputs=keras.Input((16, 8), name="signal"),
        branches=[kf.branches.CNN(filters=(32, 32))],
        head=kf.heads.Classification(int(y.max()) + 1, hidden_units=(64,)),
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    model.fit(x, y, epochs=4, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("float") / "float.tflite"
    kexport.export(model, path, format="litert", probe=x[:4])
    return model, x, path


def _int8_tensors(path):
    interpreter = kexport._litert_interpreter(str(path))
    return [t for t in interpreter.get_tensor_details() if t["dtype"] == np.int8]


def test_litert_exports_are_verified_with_the_ai_edge_litert_interpreter(trained):
    from ai_edge_litert.interpreter import Interpreter

    assert isinstance(kexport._litert_interpreter(str(trained[2])), Interpreter)


@pytest.mark.parametrize("mode", ["dynamic", "float16", "int8"])
def test_quantized_litert_is_smaller_and_agrees_with_the_float_model(tmp_path, trained, mode):
    model, x, float_path = trained
    float_size = os.path.getsize(float_path)
    weights = [w.numpy().copy() for w in model.weights]
    result = kexport.export(
        model, tmp_path / f"{mode}.tflite", format="litert", quantize=mode, data=x
    )
    assert result.quantize == mode and result.probe_rows == 64
    # Checked against the float model with the mode's tolerance; classes reported.
    assert result.max_abs_diff <= kexport._TOLERANCE[mode]
    assert result.class_agreement >= 0.9
    assert os.path.getsize(result) == result.size_bytes
    assert result.size_bytes < (0.75 if mode == "float16" else 0.6) * float_size
    assert bool(_int8_tensors(result)) == (mode != "float16")
    for before, after in zip(weights, model.weights):  # the model itself is untouched
        np.testing.assert_array_equal(before, after.numpy())
    assert f"quantize={mode}" in result.summary()


def test_int8_keras_and_dynamic_onnx_exports(tmp_path, trained):
    model, x, _ = trained
    result = kexport.export(model, tmp_path / "q.keras", format="keras", quantize="int8", data=x)
    loaded = kexport.load(result)
    assert loaded.get_layer("classification").output_layer.quantization_mode == "int8"
    assert model.get_layer("classification").output_layer.quantization_mode is None
    assert result.class_agreement >= 0.9
    onnx = kexport.export(model, tmp_path / "q.onnx", format="onnx", quantize="dynamic", data=x)
    float_onnx = kexport.export(model, tmp_path / "f.onnx", format="onnx", probe=x[:4])
    assert onnx.size_bytes < 0.7 * float_onnx.size_bytes and onnx.class_agreement >= 0.9
    assert sorted(os.listdir(tmp_path)) == ["f.onnx", "q.keras", "q.onnx"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"format": "litert", "quantize": "int8"}, "pass `data=`"),
        ({"format": "litert", "quantize": "int4"}, "quantize='int4'"),
        ({"format": "onnx", "quantize": "float16"}, "quantize='float16'"),
        ({"format": "keras", "quantize": "dynamic"}, "quantize='dynamic'"),
    ],
)
def test_bad_quantize_arguments_write_nothing(tmp_path, kwargs, match):
    i = keras.Input((3,), name="x")
    model = keras.Model(i, keras.layers.Dense(2)(i))
    with pytest.raises(ValueError, match=match):
        kexport.export(model, tmp_path / "m.out", **kwargs)
    assert os.listdir(tmp_path) == []
