import keras
import numpy as np
import pytest

from kfusion.layers import GatedFusion
from tests import helpers
from tests.conftest import requires_tensorflow


@pytest.fixture
def arrays(rng):
    return [
        rng.normal(size=(8, 3)).astype("float32"),
        rng.normal(size=(8, 5)).astype("float32"),
        rng.normal(size=(8, 2)).astype("float32"),
    ]


def _numpy_gmu(layer, arrays):
    projected = [
        np.tanh(h @ p.kernel.numpy() + p.bias.numpy()) for p, h in zip(layer.projections, arrays)
    ]
    logits = np.concatenate(arrays, -1) @ layer.gate.kernel.numpy() + layer.gate.bias.numpy()
    if len(arrays) == 2:
        z = 1.0 / (1.0 + np.exp(-logits))
        return z * projected[0] + (1.0 - z) * projected[1], np.stack([z, 1.0 - z], axis=1)
    logits = logits.reshape(len(arrays[0]), len(arrays), layer.units)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    gates = e / e.sum(axis=1, keepdims=True)
    return (gates * np.stack(projected, axis=1)).sum(axis=1), gates


def test_config_roundtrip():
    clone = helpers.check_config_roundtrip(GatedFusion(6, dropout=0.2))
    assert (clone.units, clone.dropout) == (6, 0.2)


@pytest.mark.parametrize("m", [2, 3])
def test_symbolic_matches_eager(arrays, m):
    out = helpers.check_symbolic_matches_eager(GatedFusion(4), arrays[:m])
    assert tuple(out.shape) == (8, 4)


@pytest.mark.parametrize("m", [2, 3])
def test_return_weights_symbolic_and_eager(arrays, m):
    layer = GatedFusion(4)
    inputs = helpers.to_inputs(arrays[:m])
    fused, gates = layer(inputs, return_weights=True)
    assert tuple(fused.shape) == (None, 4)
    assert tuple(gates.shape) == (None, m, 4)
    assert gates.dtype == "float32"
    model = keras.Model(inputs, [fused, gates])
    model.compile(jit_compile=helpers.BACKEND != "torch")
    got_fused, got_gates = model.predict(arrays[:m], verbose=0)
    eager_fused, eager_gates = helpers.as_numpy(layer(arrays[:m], return_weights=True))
    assert eager_fused.shape == (8, 4) and eager_gates.shape == (8, m, 4)
    np.testing.assert_allclose(got_fused, eager_fused, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_gates, eager_gates, rtol=1e-5, atol=1e-6)
    plain = helpers.as_numpy(layer(arrays[:m]))
    np.testing.assert_allclose(plain, eager_fused, rtol=1e-6)


@pytest.mark.parametrize("m", [2, 3])
def test_matches_numpy_formula(arrays, m):
    layer = GatedFusion(4)
    out, gates = helpers.as_numpy(layer(arrays[:m], return_weights=True))
    expected, expected_gates = _numpy_gmu(layer, arrays[:m])
    np.testing.assert_allclose(gates, expected_gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("m", [2, 3])
def test_gates_sum_to_one_over_branches(arrays, m):
    _, gates = helpers.as_numpy(GatedFusion(4)(arrays[:m], return_weights=True))
    np.testing.assert_allclose(gates.sum(axis=1), np.ones((8, 4)), rtol=1e-6)
    branch_weights = gates.mean(axis=-1)
    np.testing.assert_allclose(branch_weights.sum(axis=-1), np.ones(8), rtol=1e-6)
    # Gates depend on the inputs: they differ between samples and features.
    assert gates.std(axis=0).max() > 1e-3
    assert gates.std(axis=-1).max() > 1e-3


def test_dict_inputs_read_in_sorted_key_order(arrays):
    layer = GatedFusion(4)
    from_list = helpers.as_numpy(layer(arrays, return_weights=True))
    from_dict = helpers.as_numpy(
        layer({"c": arrays[2], "a": arrays[0], "b": arrays[1]}, return_weights=True)
    )
    for a, b in zip(from_list, from_dict):
        np.testing.assert_allclose(b, a, rtol=1e-6)


def test_weight_count():
    two = GatedFusion(4)
    two.build([(None, 3), (None, 5)])
    assert two.count_params() == (3 + 5) * 4 + 2 * 4 + (8 * 4 + 4)
    assert two.gate.units == 4
    three = GatedFusion(4)
    three.build([(None, 3), (None, 5), (None, 2)])
    assert three.count_params() == (3 + 5 + 2) * 4 + 3 * 4 + (10 * 12 + 12)
    assert three.gate.units == 12
    assert len(three.weights) == 3 * 2 + 2


@pytest.mark.parametrize("m", [2, 3])
def test_fit_step(arrays, m):
    helpers.check_fit_step(GatedFusion(4, dropout=0.1), arrays[:m])


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("m", [2, 3])
def test_mixed_precision(arrays, policy, m):
    _, (fused, gates) = helpers.check_mixed_precision(
        lambda: GatedFusion(4), arrays[:m], policy, return_weights=True
    )
    assert keras.backend.standardize_dtype(gates.dtype) == "float32"
    np.testing.assert_allclose(helpers.as_numpy(gates).sum(1), np.ones((8, 4)), rtol=1e-6)


def test_masks_are_consumed(arrays):
    layer = GatedFusion(4)
    assert layer.compute_mask(arrays, [None, None, None]) is None
    masks = [np.ones((8,), bool)] * 3
    np.testing.assert_allclose(
        helpers.as_numpy(layer(arrays, mask=masks)), helpers.as_numpy(layer(arrays))
    )


@pytest.mark.parametrize("m", [2, 3])
def test_save_and_load(arrays, tmp_path, m):
    helpers.check_saving(GatedFusion(4), arrays[:m], tmp_path)


def test_save_and_load_with_weights(arrays, tmp_path):
    loaded = helpers.check_saving(GatedFusion(4), arrays, tmp_path, return_weights=True)
    assert len(loaded.outputs) == 2


@requires_tensorflow
def test_saved_model_export(arrays, tmp_path):
    helpers.check_saved_model(GatedFusion(4), arrays, tmp_path)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"units": 0}, "units"),
        ({"units": None}, "units"),
        ({"units": 2.5}, "units"),
        ({"units": True}, "units"),
        ({"units": 4, "dropout": 1.0}, "dropout"),
        ({"units": 4, "dropout": -0.1}, "dropout"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}={kwargs[name]!r}".replace(".", r"\.")):
        GatedFusion(**kwargs)


def test_bad_inputs(arrays):
    with pytest.raises(ValueError, match="single input"):
        GatedFusion(4)(arrays[0])
    with pytest.raises(ValueError, match="at least 2"):
        GatedFusion(4)([arrays[0]])
    with pytest.raises(ValueError, match="rank 2"):
        GatedFusion(4)([arrays[0], np.ones((8, 4, 2), "float32")])
    with pytest.raises(ValueError, match="rank 2"):
        GatedFusion(4)([arrays[0], np.ones((8,), "float32")])
    with pytest.raises(ValueError, match="return_weights=None"):
        GatedFusion(4)(arrays, return_weights=None)
    keras.backend.clear_session()


def test_built_layer_rejects_other_inputs(arrays):
    helpers.check_built_fusion_rejects_other_inputs(GatedFusion(4), arrays)


def test_save_and_load_mixed_float16(arrays, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(
        GatedFusion(4), arrays, tmp_path, atol=1e-3, return_weights=True
    )
