import keras
import numpy as np
import pytest

from kfusion.layers import WeightedSumFusion
from tests import helpers
from tests.conftest import requires_tensorflow


@pytest.fixture
def arrays(rng):
    return [
        rng.normal(size=(8, 3)).astype("float32"),
        rng.normal(size=(8, 5)).astype("float32"),
        rng.normal(size=(8, 2)).astype("float32"),
    ]


@pytest.fixture
def same_width(rng):
    return [rng.normal(size=(8, 4)).astype("float32") for _ in range(3)]


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _numpy_weighted_sum(layer, arrays, activation=lambda x: x):
    weights = _softmax(np.asarray(layer.branch_logits.numpy(), "float64"))
    if layer.projections:
        projected = [
            h @ p.kernel.numpy() + p.bias.numpy() for p, h in zip(layer.projections, arrays)
        ]
    else:
        projected = list(arrays)
    fused = sum(w * p for w, p in zip(weights, projected))
    return activation(fused), weights


def test_config_roundtrip():
    clone = helpers.check_config_roundtrip(
        WeightedSumFusion(units=6, activation="tanh", dropout=0.2)
    )
    assert (clone.units, clone.activation, clone.dropout) == (6, "tanh", 0.2)
    helpers.check_config_roundtrip(WeightedSumFusion())


def test_symbolic_matches_eager(arrays, same_width):
    out = helpers.check_symbolic_matches_eager(WeightedSumFusion(units=4), arrays)
    assert tuple(out.shape) == (8, 4)
    out = helpers.check_symbolic_matches_eager(WeightedSumFusion(), same_width)
    assert tuple(out.shape) == (8, 4)


def test_return_weights_symbolic_and_eager(arrays):
    layer = WeightedSumFusion(units=4)
    inputs = helpers.to_inputs(arrays)
    fused, weights = layer(inputs, return_weights=True)
    assert tuple(fused.shape) == (None, 4)
    assert tuple(weights.shape) == (None, 3)
    assert weights.dtype == "float32"
    model = keras.Model(inputs, [fused, weights])
    model.compile(jit_compile=helpers.BACKEND != "torch")
    got_fused, got_weights = model.predict(arrays, verbose=0)
    eager_fused, eager_weights = helpers.as_numpy(layer(arrays, return_weights=True))
    assert eager_fused.shape == (8, 4) and eager_weights.shape == (8, 3)
    np.testing.assert_allclose(got_fused, eager_fused, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_weights, eager_weights, rtol=1e-6)
    plain = helpers.as_numpy(layer(arrays))
    np.testing.assert_allclose(plain, eager_fused, rtol=1e-6)


def test_matches_numpy_formula(arrays):
    layer = WeightedSumFusion(units=4, activation="tanh")
    layer(arrays)
    layer.branch_logits.assign(np.array([0.5, -1.0, 2.0], "float32"))
    out, weights = helpers.as_numpy(layer(arrays, return_weights=True))
    expected, expected_w = _numpy_weighted_sum(layer, arrays, activation=np.tanh)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(weights, np.broadcast_to(expected_w, (8, 3)), rtol=1e-5)


def test_matches_numpy_without_projection(same_width):
    layer = WeightedSumFusion()
    layer(same_width)
    layer.branch_logits.assign(np.array([1.0, 0.0, -2.0], "float32"))
    out = helpers.as_numpy(layer(same_width))
    expected, _ = _numpy_weighted_sum(layer, same_width)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_weights_start_uniform_and_sum_to_one(arrays):
    layer = WeightedSumFusion(units=4)
    _, weights = helpers.as_numpy(layer(arrays, return_weights=True))
    np.testing.assert_allclose(weights, np.full((8, 3), 1 / 3), rtol=1e-6)
    layer.branch_logits.assign(np.array([3.0, -1.0, 0.2], "float32"))
    _, weights = helpers.as_numpy(layer(arrays, return_weights=True))
    np.testing.assert_allclose(weights.sum(axis=-1), np.ones(8), rtol=1e-6)
    np.testing.assert_allclose(weights, np.broadcast_to(weights[:1], (8, 3)))
    assert weights[0, 0] > weights[0, 2] > weights[0, 1]


def test_dict_inputs_read_in_sorted_key_order(same_width):
    layer = WeightedSumFusion()
    layer(same_width[:2])
    layer.branch_logits.assign(np.array([2.0, -1.0], "float32"))
    from_list = helpers.as_numpy(layer(same_width[:2]))
    from_dict = helpers.as_numpy(layer({"b": same_width[1], "a": same_width[0]}))
    np.testing.assert_allclose(from_dict, from_list, rtol=1e-6)
    swapped = helpers.as_numpy(layer([same_width[1], same_width[0]]))
    assert not np.allclose(swapped, from_list)


def test_weight_count():
    layer = WeightedSumFusion(units=4)
    layer.build([(None, 3), (None, 5), (None, 2)])
    assert layer.count_params() == (3 + 5 + 2) * 4 + 3 * 4 + 3
    assert len(layer.weights) == 3 * 2 + 1
    plain = WeightedSumFusion()
    plain.build([(None, 4), (None, 4)])
    assert plain.count_params() == 2


def test_fit_step(arrays):
    layer = WeightedSumFusion(units=4, activation="relu", dropout=0.1)
    helpers.check_fit_step(layer, arrays)
    assert not np.allclose(layer.branch_logits.numpy(), 0.0), "branch logits did not train"


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(arrays, policy):
    layer, (fused, weights) = helpers.check_mixed_precision(
        lambda: WeightedSumFusion(units=4), arrays, policy, return_weights=True
    )
    assert keras.backend.standardize_dtype(weights.dtype) == "float32"
    np.testing.assert_allclose(helpers.as_numpy(weights).sum(-1), np.ones(8), rtol=1e-6)
    assert keras.backend.standardize_dtype(layer.branch_logits.dtype) == "float32"


def test_masks_are_consumed(arrays):
    layer = WeightedSumFusion(units=4)
    assert layer.compute_mask(arrays, [None, None, None]) is None
    masks = [np.ones((8,), bool)] * 3
    np.testing.assert_allclose(
        helpers.as_numpy(layer(arrays, mask=masks)), helpers.as_numpy(layer(arrays))
    )


def test_save_and_load(arrays, tmp_path):
    helpers.check_saving(WeightedSumFusion(units=4, activation="tanh"), arrays, tmp_path)


def test_save_and_load_with_weights(arrays, tmp_path):
    layer = WeightedSumFusion(units=4)
    layer(arrays)
    layer.branch_logits.assign(np.array([0.3, -0.7, 1.1], "float32"))
    loaded = helpers.check_saving(layer, arrays, tmp_path, return_weights=True)
    assert len(loaded.outputs) == 2


@requires_tensorflow
def test_saved_model_export(arrays, tmp_path):
    helpers.check_saved_model(WeightedSumFusion(units=4), arrays, tmp_path)


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
        WeightedSumFusion(**kwargs)


def test_bad_inputs(arrays):
    with pytest.raises(ValueError, match="single input"):
        WeightedSumFusion(units=4)(arrays[0])
    with pytest.raises(ValueError, match="at least 2"):
        WeightedSumFusion(units=4)([arrays[0]])
    with pytest.raises(ValueError, match="rank 2"):
        WeightedSumFusion(units=4)([arrays[0], np.ones((8, 4, 2), "float32")])
    with pytest.raises(ValueError, match="rank 2"):
        WeightedSumFusion(units=4)([arrays[0], np.ones((8,), "float32")])
    with pytest.raises(ValueError, match=r"units=None.*\(None, 3\), \(None, 5\)"):
        WeightedSumFusion()(helpers.to_inputs(arrays[:2]))
    with pytest.raises(ValueError, match="return_weights='yes'"):
        WeightedSumFusion(units=4)(arrays, return_weights="yes")
    keras.backend.clear_session()


def test_built_layer_rejects_other_inputs(arrays):
    helpers.check_built_fusion_rejects_other_inputs(WeightedSumFusion(units=4), arrays)


def test_save_and_load_mixed_float16(arrays, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(
        WeightedSumFusion(units=4, activation="tanh"),
        arrays,
        tmp_path,
        atol=1e-3,
        return_weights=True,
    )
