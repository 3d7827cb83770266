import keras
import numpy as np
import pytest

from kfusion.layers import ConcatFusion
from tests import helpers
from tests.conftest import requires_tensorflow


@pytest.fixture
def arrays(rng):
    return [
        rng.normal(size=(8, 3)).astype("float32"),
        rng.normal(size=(8, 5)).astype("float32"),
        rng.normal(size=(8, 2)).astype("float32"),
    ]


def test_config_roundtrip():
    helpers.check_config_roundtrip(ConcatFusion(units=6, activation="tanh", dropout=0.2))


@pytest.mark.parametrize("units", [None, 4])
def test_symbolic_matches_eager(arrays, units):
    out = helpers.check_symbolic_matches_eager(ConcatFusion(units=units), arrays)
    assert tuple(out.shape) == (8, 10 if units is None else 4)


def test_matches_numpy_formula(arrays):
    plain = helpers.as_numpy(ConcatFusion()(arrays))
    np.testing.assert_allclose(plain, np.concatenate(arrays, axis=-1), rtol=1e-6)

    layer = ConcatFusion(units=4, activation="relu")
    out = helpers.as_numpy(layer(arrays))
    kernel, bias = layer.projection.get_weights()
    expected = np.maximum(np.concatenate(arrays, -1) @ kernel + bias, 0.0)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_dict_inputs_read_in_sorted_key_order(arrays):
    as_dict = {"b": arrays[1], "a": arrays[0]}
    out = helpers.as_numpy(ConcatFusion()(as_dict))
    np.testing.assert_allclose(out, np.concatenate([arrays[0], arrays[1]], -1))


def test_weight_count():
    layer = ConcatFusion(units=4)
    layer.build([(None, 3), (None, 5)])
    assert layer.count_params() == 8 * 4 + 4
    plain = ConcatFusion()
    plain.build([(None, 3), (None, 5)])
    assert plain.count_params() == 0


def test_fit_step(arrays):
    helpers.check_fit_step(ConcatFusion(units=4, dropout=0.1), arrays)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(arrays, policy):
    helpers.check_mixed_precision(lambda: ConcatFusion(units=4), arrays, policy)


def test_masks_are_consumed(arrays):
    layer = ConcatFusion()
    assert layer.compute_mask(arrays, [None, None, None]) is None


def test_save_and_load(arrays, tmp_path):
    helpers.check_saving(ConcatFusion(units=4), arrays, tmp_path)


@requires_tensorflow
def test_saved_model_export(arrays, tmp_path):
    helpers.check_saved_model(ConcatFusion(units=4), arrays, tmp_path)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"units": 0}, "units"),
        ({"units": -3}, "units"),
        ({"units": 2.5}, "units"),
        ({"dropout": 1.5}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"activation": "no_such_activation"}, "activation"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}={kwargs[name]!r}".replace(".", r"\.")):
        ConcatFusion(**kwargs)


def test_bad_inputs(arrays):
    with pytest.raises(ValueError, match="single input"):
        ConcatFusion()(arrays[0])
    with pytest.raises(ValueError, match="at least 2"):
        ConcatFusion()([arrays[0]])
    with pytest.raises(ValueError, match="rank 2"):
        ConcatFusion()([arrays[0], np.ones((8, 4, 2), "float32")])
    keras.backend.clear_session()


def test_save_and_load_mixed_float16(arrays, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(ConcatFusion(units=4), arrays, tmp_path, atol=1e-3)
