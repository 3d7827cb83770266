"""The ensemble's own layers: EnsembleAverage and FrozenMember (kfusion/ensemble/_layers.py)."""

import keras
import numpy as np
import pytest

from kfusion.ensemble._layers import EnsembleAverage, FrozenMember
from tests import helpers
from tests.conftest import requires_tensorflow

SPACES = ["probabilities", "logits", "probabilities"]


@pytest.fixture
def arrays(rng):
    logits = rng.normal(size=(3, 8, 4)).astype("float32")
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return [probs[0], logits[1], probs[2]]


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _member(width=4, name="member", dropout=0.0):
    i = keras.Input((3,), name="x")
    h = keras.layers.Dropout(dropout)(keras.layers.Dense(5, activation="relu", name="hidden")(i))
    return keras.Model(i, keras.layers.Dense(width, name="out")(h), name=name)


# ------------------------------------------------------------------------ EnsembleAverage
def test_average_config_roundtrip():
    helpers.check_config_roundtrip(
        EnsembleAverage(
            [0.2, 0.3, 0.5], learned=True, mode="logits", input_spaces=SPACES, activation="sigmoid"
        )
    )


@pytest.mark.parametrize("learned", [False, True])
def test_average_symbolic_matches_eager(arrays, learned):
    layer = EnsembleAverage([1 / 3] * 3, learned=learned, input_spaces=SPACES)
    out = helpers.check_symbolic_matches_eager(layer, arrays)
    assert tuple(out.shape) == (8, 4)


def test_average_matches_numpy_formula(arrays):
    p0, z1, p2 = arrays
    layer = EnsembleAverage([0.2, 0.3, 0.5], input_spaces=SPACES)
    expected = 0.2 * p0 + 0.3 * _softmax(z1) + 0.5 * p2
    np.testing.assert_allclose(helpers.as_numpy(layer(arrays)), expected, rtol=1e-5, atol=1e-6)

    learned = EnsembleAverage([0.2, 0.3, 0.5], learned=True, mode="logits", input_spaces=SPACES)
    learned.build([(None, 4)] * 3)
    learned.mix_logits.assign(np.array([0.5, -1.0, 2.0], "float32"))
    w = _softmax(np.array([0.5, -1.0, 2.0]))
    expected = w[0] * np.log(p0) + w[1] * z1 + w[2] * np.log(p2)
    np.testing.assert_allclose(helpers.as_numpy(learned(arrays)), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(helpers.as_numpy(learned.mixing_weights()), w, rtol=1e-6)


def test_average_sigmoid_conversions(rng):
    z = rng.normal(size=(6, 2)).astype("float32")
    p = 1 / (1 + np.exp(-z))
    to_logits = EnsembleAverage(
        [0.5, 0.5], mode="logits", input_spaces=["probabilities", "logits"], activation="sigmoid"
    )
    np.testing.assert_allclose(helpers.as_numpy(to_logits([p, z])), z, rtol=1e-4, atol=1e-4)
    to_probs = EnsembleAverage([0.5, 0.5], input_spaces=["logits", "values"], activation="sigmoid")
    np.testing.assert_allclose(helpers.as_numpy(to_probs([z, p])), (p + p) / 2, atol=1e-6)


def test_average_learned_starts_at_the_coefficients():
    layer = EnsembleAverage([0.1, 0.9], learned=True)
    layer.build([(None, 2), (None, 2)])
    np.testing.assert_allclose(helpers.as_numpy(layer.mixing_weights()), [0.1, 0.9], rtol=1e-5)


def test_average_weight_count():
    layer = EnsembleAverage([0.5, 0.5], learned=True)
    layer.build([(None, 3), (None, 3)])
    assert layer.count_params() == 2
    fixed = EnsembleAverage([0.5, 0.5])
    fixed.build([(None, 3), (None, 3)])
    assert fixed.count_params() == 0


def test_average_fit_step(arrays):
    helpers.check_fit_step(EnsembleAverage([1 / 3] * 3, learned=True, input_spaces=SPACES), arrays)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_average_mixed_precision(arrays, policy):
    layer, out = helpers.check_mixed_precision(
        lambda: EnsembleAverage([1 / 3] * 3, learned=True, input_spaces=SPACES), arrays, policy
    )
    weights = layer.mixing_weights()
    assert keras.backend.standardize_dtype(weights.dtype) == "float32"


def test_average_masks_are_consumed(arrays):
    assert EnsembleAverage([0.5, 0.5]).compute_mask(arrays[:2], [None, None]) is None


def test_average_save_and_load(arrays, tmp_path):
    layer = EnsembleAverage([0.2, 0.3, 0.5], learned=True, input_spaces=SPACES)
    helpers.check_saving(layer, arrays, tmp_path)


@requires_tensorflow
def test_average_saved_model_export(arrays, tmp_path):
    helpers.check_saved_model(
        EnsembleAverage([0.2, 0.3, 0.5], learned=True, input_spaces=SPACES), arrays, tmp_path
    )


BAD_AVERAGE_ARGUMENTS = [
    ({"coefficients": []}, r"coefficients=\[\]"),
    ({"coefficients": [0.5, 0.6]}, r"coefficients=\[0\.5, 0\.6\]"),
    ({"coefficients": [1.5, -0.5]}, r"coefficients=\[1\.5, -0\.5\]"),
    ({"learned": "yes"}, "learned='yes'"),
    ({"mode": "votes"}, "mode='votes'"),
    ({"input_spaces": ["logits"]}, r"input_spaces=\['logits'\]"),
    ({"input_spaces": ["logits", "odds"]}, "input_spaces='odds'"),
    ({"activation": "relu"}, "activation='relu'"),
]


def test_average_bad_arguments():
    for kwargs, pattern in BAD_AVERAGE_ARGUMENTS:
        args = {"coefficients": [0.5, 0.5], **kwargs}
        with pytest.raises(ValueError, match=pattern):
            EnsembleAverage(**args)


def test_average_bad_inputs(arrays):
    with pytest.raises(ValueError, match="averages 2 inputs. Received: 3"):
        EnsembleAverage([0.5, 0.5])(arrays)
    with pytest.raises(ValueError, match="one shape"):
        EnsembleAverage([0.5, 0.5])([arrays[0], np.ones((8, 3), "float32")])
    with pytest.raises(ValueError, match="single input"):
        EnsembleAverage([1.0])(arrays[0])


# --------------------------------------------------------------------------- FrozenMember
def test_member_config_roundtrip():
    layer = FrozenMember(_member(), name="frozen")
    clone = FrozenMember.from_config(layer.get_config())
    config = clone.get_config()
    assert config["name"] == "frozen" and not config["trainable"]
    assert config["model"]["config"]["name"] == "member"


def test_member_symbolic_matches_eager(rng):
    x = rng.normal(size=(4, 3)).astype("float32")
    out = helpers.check_symbolic_matches_eager(FrozenMember(_member()), x)
    assert tuple(out.shape) == (4, 4)


def test_member_matches_numpy_and_ignores_training(rng):
    model = _member(dropout=0.5)
    layer = FrozenMember(model)
    x = rng.normal(size=(4, 3)).astype("float32")
    k1, b1, k2, b2 = model.get_weights()
    expected = np.maximum(x @ k1 + b1, 0) @ k2 + b2
    for training in (False, True):
        got = helpers.as_numpy(layer(x, training=training))
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_member_weight_count_and_frozen(rng):
    model = _member()
    layer = FrozenMember(model)
    assert layer.count_params() == 3 * 5 + 5 + 5 * 4 + 4
    assert not model.trainable and layer.trainable_weights == []
    wrapped = helpers.wrap(layer, rng.normal(size=(8, 3)).astype("float32"), head_units=1)
    wrapped.compile(optimizer=keras.optimizers.Adam(0.1), loss="mse")
    before = [np.array(w) for w in model.get_weights()]
    x = rng.normal(size=(8, 3)).astype("float32")
    wrapped.fit(x, np.ones((8, 1), "float32"), epochs=2, verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_member_mixed_precision(rng, policy):
    x = rng.normal(size=(4, 3)).astype("float32")
    helpers.check_mixed_precision(lambda: FrozenMember(_member()), x, policy)


def test_member_masks_are_consumed(rng):
    assert FrozenMember(_member()).compute_mask(np.ones((2, 3)), None) is None


def test_member_save_and_load(rng, tmp_path):
    x = rng.normal(size=(4, 3)).astype("float32")
    loaded = helpers.check_saving(FrozenMember(_member()), x, tmp_path)
    assert loaded.trainable_weights == []


@requires_tensorflow
def test_member_saved_model_export(rng, tmp_path):
    x = rng.normal(size=(4, 3)).astype("float32")
    helpers.check_saved_model(FrozenMember(_member()), x, tmp_path)


def test_member_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="model='dense'"):
        FrozenMember("dense")
    with pytest.raises(ValueError, match="incompatible|expected"):
        FrozenMember(_member())(np.ones((2, 5), "float32"))
