import re

import keras
import numpy as np
import pytest

from kfusion.layers import PositionEmbedding
from tests import helpers
from tests.conftest import BACKEND, requires_tensorflow

B, T, D = 4, 5, 6


@pytest.fixture
def x(rng):
    return rng.normal(size=(B, T, D)).astype("float32")


def test_config_roundtrip():
    layer = PositionEmbedding(max_length=12, initializer=keras.initializers.RandomNormal(seed=3))
    clone = helpers.check_config_roundtrip(layer)
    assert clone.max_length == 12
    config = helpers.check_config_roundtrip(PositionEmbedding(7)).get_config()
    assert config["initializer"]["class_name"] == "GlorotUniform"


def test_symbolic_matches_eager(x):
    out = helpers.check_symbolic_matches_eager(PositionEmbedding(8), x)
    assert tuple(out.shape) == (B, T, D)


def test_matches_numpy_formula(x):
    layer = PositionEmbedding(8)
    out = helpers.as_numpy(layer(x))
    table = helpers.as_numpy(layer.embeddings)
    assert table.shape == (8, D)
    np.testing.assert_allclose(out, x + table[None, :T], rtol=1e-6, atol=1e-6)


def test_initializer_is_used(x):
    layer = PositionEmbedding(8, initializer="zeros")
    np.testing.assert_allclose(helpers.as_numpy(layer(x)), x)


def test_variable_length_up_to_max_length(rng):
    """One model, T unknown: every length <= max_length uses the first T rows (XLA too)."""
    layer = PositionEmbedding(6)
    inputs = keras.Input((None, D))
    out = layer(inputs)
    assert tuple(out.shape) == (None, None, D)
    model = keras.Model(inputs, out)
    model.compile(jit_compile=BACKEND != "torch")
    table = helpers.as_numpy(layer.embeddings)
    for length in (1, 3, 6):
        seq = rng.normal(size=(2, length, D)).astype("float32")
        got = helpers.as_numpy(model.predict(seq, verbose=0))
        np.testing.assert_allclose(got, seq + table[None, :length], rtol=1e-6, atol=1e-6)


def test_weight_count():
    layer = PositionEmbedding(10)
    layer.build((None, None, D))
    assert layer.count_params() == 10 * D
    assert [w.name for w in layer.weights] == ["embeddings"]


def test_fit_step(x):
    helpers.check_fit_step(PositionEmbedding(8), x)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(x, policy):
    layer, out = helpers.check_mixed_precision(lambda: PositionEmbedding(8), x, policy)
    table = helpers.as_numpy(layer.embeddings)
    expected = x + table[None, :T]
    got = helpers.as_numpy(keras.ops.cast(out, "float32"))
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=5e-2)


def test_mask_is_passed_through_and_padding_changes_nothing(rng, x):
    layer = PositionEmbedding(8)
    padded = np.concatenate([x, np.zeros((B, 2, D), "float32")], axis=1)
    inputs = keras.Input((None, D))
    masked = keras.layers.Masking(0.0)(inputs)
    out = layer(masked)
    assert out._keras_mask is not None
    # The mask reaches the next layer: a masked average over the real steps only.
    pooled = keras.layers.GlobalAveragePooling1D()(out)
    model = keras.Model(inputs, [out, pooled])
    seq_out, pooled_out = helpers.as_numpy(model(padded))
    unpadded = helpers.as_numpy(layer(x))
    np.testing.assert_allclose(seq_out[:, :T], unpadded, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(pooled_out, unpadded.mean(1), rtol=1e-5, atol=1e-5)
    mask = np.ones((B, T), bool)
    assert layer.compute_mask(x, mask) is mask
    assert layer.compute_mask(x, None) is None


def test_save_and_load(x, tmp_path):
    helpers.check_saving(PositionEmbedding(8), x, tmp_path)


@requires_tensorflow
def test_saved_model_export(x, tmp_path):
    helpers.check_saved_model(PositionEmbedding(8), x, tmp_path)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"max_length": 0}, "max_length"),
        ({"max_length": -4}, "max_length"),
        ({"max_length": 2.5}, "max_length"),
        ({"max_length": None}, "max_length"),
        ({"initializer": "no_such_initializer"}, "initializer"),
        ({"initializer": None}, "initializer"),
    ],
)
def test_bad_arguments(kwargs, name):
    arguments = {"max_length": 8, **kwargs}
    with pytest.raises(ValueError, match=re.escape(f"{name}={kwargs[name]!r}")):
        PositionEmbedding(**arguments)


def test_bad_inputs(x):
    with pytest.raises(ValueError, match=re.escape("length=5, max_length=4")):
        PositionEmbedding(4)(x)
    with pytest.raises(ValueError, match=re.escape("length=9, max_length=8")):
        PositionEmbedding(8)(keras.Input((9, D)))
    with pytest.raises(ValueError, match="rank 3"):
        PositionEmbedding(8)(x[:, 0])
    with pytest.raises(ValueError, match="known feature size"):
        PositionEmbedding(8)(keras.Input((4, None)))


def test_built_layer_rejects_another_width_or_a_longer_sequence(x):
    layer = PositionEmbedding(8)
    layer(x)
    with pytest.raises(ValueError, match=f"expected axis -1 of input shape to have value {D}"):
        layer(x[..., :4])  # would add the first 4 columns of the table
    with pytest.raises(ValueError, match=re.escape("length=9, max_length=8")):
        layer(np.zeros((B, 9, D), "float32"))


def test_save_and_load_mixed_float16(x, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(PositionEmbedding(8), x, tmp_path, atol=1e-3)
