import keras
import numpy as np
import pytest

from kfusion.layers import AttentionFusion
from tests import helpers
from tests.conftest import requires_tensorflow


@pytest.fixture
def arrays(rng):
    return [
        rng.normal(size=(8, 3)).astype("float32"),
        rng.normal(size=(8, 5)).astype("float32"),
        rng.normal(size=(8, 2)).astype("float32"),
    ]


def _numpy_attention(layer, arrays):
    projected = np.stack(
        [h @ p.kernel.numpy() + p.bias.numpy() for p, h in zip(layer.projections, arrays)],
        axis=1,
    )  # (batch, M, units)
    hidden = np.tanh(
        projected @ layer.attention_hidden.kernel.numpy() + layer.attention_hidden.bias.numpy()
    )
    scores = (hidden @ layer.attention_score.kernel.numpy())[..., 0]  # (batch, M)
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    weights = e / e.sum(axis=1, keepdims=True)
    return (weights[:, :, None] * projected).sum(axis=1), weights


def test_config_roundtrip():
    clone = helpers.check_config_roundtrip(AttentionFusion(6, attention_units=3, dropout=0.2))
    assert (clone.units, clone.attention_units, clone.dropout) == (6, 3, 0.2)
    helpers.check_config_roundtrip(AttentionFusion(4))


def test_symbolic_matches_eager(arrays):
    out = helpers.check_symbolic_matches_eager(AttentionFusion(4, attention_units=6), arrays)
    assert tuple(out.shape) == (8, 4)


def test_return_weights_symbolic_and_eager(arrays):
    layer = AttentionFusion(4)
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
    np.testing.assert_allclose(got_weights, eager_weights, rtol=1e-5, atol=1e-7)
    plain = helpers.as_numpy(layer(arrays))
    np.testing.assert_allclose(plain, eager_fused, rtol=1e-6)


@pytest.mark.parametrize("attention_units", [None, 6])
def test_matches_numpy_formula(arrays, attention_units):
    layer = AttentionFusion(4, attention_units=attention_units)
    out, weights = helpers.as_numpy(layer(arrays, return_weights=True))
    assert layer.attention_hidden.units == (attention_units or 4)
    expected, expected_w = _numpy_attention(layer, arrays)
    np.testing.assert_allclose(weights, expected_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_weights_sum_to_one_and_differ_per_sample(arrays):
    _, weights = helpers.as_numpy(AttentionFusion(4)(arrays, return_weights=True))
    np.testing.assert_allclose(weights.sum(axis=-1), np.ones(8), rtol=1e-6)
    assert np.all(weights > 0)
    # Per-sample attention: rows are not all the same.
    assert weights.std(axis=0).max() > 1e-3


def test_dict_inputs_read_in_sorted_key_order(arrays):
    layer = AttentionFusion(4)
    from_list = helpers.as_numpy(layer(arrays[:2], return_weights=True))
    from_dict = helpers.as_numpy(
        layer({"text": arrays[1], "image": arrays[0]}, return_weights=True)
    )
    for a, b in zip(from_list, from_dict):
        np.testing.assert_allclose(b, a, rtol=1e-6)


def test_weight_count():
    layer = AttentionFusion(4, attention_units=6)
    layer.build([(None, 3), (None, 5), (None, 2)])
    projections = (3 + 5 + 2) * 4 + 3 * 4
    attention = 4 * 6 + 6 + 6
    assert layer.count_params() == projections + attention
    assert len(layer.weights) == 3 * 2 + 3
    default = AttentionFusion(4)
    default.build([(None, 3), (None, 5)])
    assert default.count_params() == (3 + 5) * 4 + 2 * 4 + (4 * 4 + 4 + 4)


def test_fit_step(arrays):
    layer = AttentionFusion(4, dropout=0.1)
    helpers.check_fit_step(layer, arrays)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(arrays, policy):
    _, (fused, weights) = helpers.check_mixed_precision(
        lambda: AttentionFusion(4), arrays, policy, return_weights=True
    )
    assert keras.backend.standardize_dtype(weights.dtype) == "float32"
    np.testing.assert_allclose(helpers.as_numpy(weights).sum(-1), np.ones(8), rtol=1e-6)


def test_masks_are_consumed(arrays):
    layer = AttentionFusion(4)
    assert layer.compute_mask(arrays, [None, None, None]) is None
    masks = [np.ones((8,), bool)] * 3
    np.testing.assert_allclose(
        helpers.as_numpy(layer(arrays, mask=masks)), helpers.as_numpy(layer(arrays))
    )


def test_save_and_load(arrays, tmp_path):
    helpers.check_saving(AttentionFusion(4, attention_units=6), arrays, tmp_path)


def test_save_and_load_with_weights(arrays, tmp_path):
    loaded = helpers.check_saving(AttentionFusion(4), arrays, tmp_path, return_weights=True)
    assert len(loaded.outputs) == 2


@requires_tensorflow
def test_saved_model_export(arrays, tmp_path):
    helpers.check_saved_model(AttentionFusion(4), arrays, tmp_path)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"units": 0}, "units"),
        ({"units": None}, "units"),
        ({"units": 2.5}, "units"),
        ({"units": 4, "attention_units": 0}, "attention_units"),
        ({"units": 4, "attention_units": "8"}, "attention_units"),
        ({"units": 4, "dropout": 1.0}, "dropout"),
        ({"units": 4, "dropout": -0.1}, "dropout"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}={kwargs[name]!r}".replace(".", r"\.")):
        AttentionFusion(**kwargs)


def test_bad_inputs(arrays):
    with pytest.raises(ValueError, match="single input"):
        AttentionFusion(4)(arrays[0])
    with pytest.raises(ValueError, match="at least 2"):
        AttentionFusion(4)([arrays[0]])
    with pytest.raises(ValueError, match="rank 2"):
        AttentionFusion(4)([arrays[0], np.ones((8, 4, 2), "float32")])
    with pytest.raises(ValueError, match="rank 2"):
        AttentionFusion(4)([arrays[0], np.ones((8,), "float32")])
    with pytest.raises(ValueError, match="return_weights=1"):
        AttentionFusion(4)(arrays, return_weights=1)
    keras.backend.clear_session()


def test_built_layer_rejects_other_inputs(arrays):
    helpers.check_built_fusion_rejects_other_inputs(AttentionFusion(4), arrays)


def test_save_and_load_mixed_float16(arrays, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(
        AttentionFusion(4, attention_units=6), arrays, tmp_path, atol=1e-3, return_weights=True
    )
