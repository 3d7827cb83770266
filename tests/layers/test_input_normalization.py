import numpy as np
import pytest

from kfusion.layers import InputNormalization
from tests import helpers
from tests.conftest import requires_tensorflow


@pytest.fixture
def sequences(rng):
    return rng.normal(3.0, 2.0, size=(8, 12, 3)).astype("float32")


def adapted(x, mode="adapt"):
    layer = InputNormalization(mode)
    if mode == "adapt":
        layer.adapt(x)
    return layer


def test_config_roundtrip():
    helpers.check_config_roundtrip(InputNormalization("series", epsilon=1e-4))


@pytest.mark.parametrize("mode", ["adapt", "series"])
def test_symbolic_matches_eager(sequences, mode):
    out = helpers.check_symbolic_matches_eager(adapted(sequences, mode), sequences)
    assert tuple(out.shape) == sequences.shape


def test_adapt_matches_numpy_formula(sequences):
    layer = adapted(sequences)
    mean = sequences.reshape(-1, 3).mean(0)
    std = sequences.reshape(-1, 3).std(0)
    np.testing.assert_allclose(layer.mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(
        helpers.as_numpy(layer(sequences)), (sequences - mean) / std, rtol=1e-4, atol=1e-5
    )
    assert layer.adapted and not InputNormalization("adapt").adapted


def test_unadapted_layer_is_the_identity(sequences):
    np.testing.assert_allclose(helpers.as_numpy(InputNormalization()(sequences)), sequences)


def test_series_matches_numpy_formula(sequences):
    out = helpers.as_numpy(InputNormalization("series")(sequences))
    mean = sequences.mean(1, keepdims=True)
    std = sequences.std(1, keepdims=True)
    np.testing.assert_allclose(out, (sequences - mean) / std, rtol=1e-4, atol=1e-5)


def test_constant_series_become_zeros():
    x = np.full((2, 5, 1), 7.0, "float32")
    np.testing.assert_array_equal(helpers.as_numpy(InputNormalization("series")(x)), 0.0)


@pytest.mark.parametrize("mode", ["adapt", "series"])
def test_masked_steps_are_left_out(sequences, mode):
    mask = np.ones(sequences.shape[:2], bool)
    mask[:, 8:] = False
    garbage = sequences.copy()
    garbage[:, 8:] = 1e4
    layer = InputNormalization(mode)
    reference = InputNormalization(mode)
    if mode == "adapt":
        layer.adapt(garbage, mask=mask)
        reference.adapt(sequences[:, :8])
    out = helpers.as_numpy(layer(garbage, mask=mask))
    expected = helpers.as_numpy(reference(sequences[:, :8]))
    np.testing.assert_allclose(out[:, :8], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(out[:, 8:], 0.0)
    assert layer.compute_mask(garbage, mask) is mask


def test_large_raw_values_are_read_in_float32(sequences):
    import keras

    keras.config.set_dtype_policy("mixed_float16")
    layer = InputNormalization("series")
    out = helpers.as_numpy(layer(sequences * 1e5))  # over float16's 65504
    assert np.all(np.isfinite(out))
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_computes_in_float32(sequences, policy):
    import keras

    keras.config.set_dtype_policy(policy)
    layer = adapted(sequences)
    out = layer(sequences)
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    assert all(keras.backend.standardize_dtype(v.dtype) == "float32" for v in layer.weights)
    keras.config.set_dtype_policy("float32")
    np.testing.assert_allclose(helpers.as_numpy(out), helpers.as_numpy(layer(sequences)), rtol=1e-6)


def test_save_and_load_keeps_the_statistics(sequences, tmp_path):
    loaded = helpers.check_saving(adapted(sequences), sequences, tmp_path)
    assert any(layer.__class__ is InputNormalization and layer.adapted for layer in loaded.layers)


@requires_tensorflow
def test_saved_model_export(sequences, tmp_path):
    helpers.check_saved_model(adapted(sequences), sequences, tmp_path)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"mode": "zscore"}, "mode"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": "small"}, "epsilon"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        InputNormalization(**kwargs)


def test_bad_inputs_are_refused(sequences):
    with pytest.raises(ValueError, match=r"\(batch, T, F\)"):
        InputNormalization("series")(np.ones((4, 3), "float32"))
    with pytest.raises(ValueError, match="needs no adapt"):
        InputNormalization("series").adapt(sequences)
    with pytest.raises(ValueError, match="mask must have shape"):
        InputNormalization().adapt(sequences, mask=np.ones((8, 3), bool))
    with pytest.raises(ValueError, match="finite"):
        InputNormalization().adapt(np.full((2, 3), np.nan))
