"""A quantized FusionModel saves and loads on every backend (kfusion layers' sub-layers).

Small on purpose (it runs on three backends); tests/test_quantization.py covers every
fusion kind, the Transformer blocks and the other modes on TensorFlow.
"""

import os

import keras
import numpy as np

import kfusion as kf


def test_int8_fusion_model_round_trips_through_keras_file(tmp_path):
    model = kf.FusionModel(
        inputs=keras.Input((5,), name="x"),
        branches=[kf.branches.MLP(units=(4,)), kf.branches.MLP(units=(6,))],
        fusion="gated",
        head=kf.heads.Classification(3, hidden_units=(4,)),
    )
    x = np.random.default_rng(0).normal(size=(3, 5)).astype("float32")
    model.quantize("int8")
    expected = keras.ops.convert_to_numpy(model(x))
    path = os.path.join(str(tmp_path), "q.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), expected, atol=1e-6)
    assert loaded.get_layer("gated_fusion").gate.quantization_mode == "int8"
