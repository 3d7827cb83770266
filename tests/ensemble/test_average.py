import os

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion.datasets import multimodal_classification
from tests import helpers
from tests.conftest import BACKEND, requires_tensorflow
from tests.ensemble import ensemble_data as data

JIT = BACKEND != "torch"  # XLA where the backend offers it


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _logit(p):
    p = np.clip(p, 1e-7, 1.0)
    return np.log(p) - np.log(np.clip(1.0 - p, 1e-7, 1.0))


# ------------------------------------------------------------------------- real training
def test_uniform_average_beats_best_member(split, members):
    x, y = split["test"]
    scores = [data.binary_accuracy(m, x, y) for m in members]
    # Each member misses one of the three useful features: ~0.80 each.
    assert 0.7 <= max(scores) <= 0.9, scores
    ensemble = kf.ensemble.average(members)
    # One test sample of tolerance; in this setting the average reaches ~0.93.
    assert data.binary_accuracy(ensemble, x, y) >= max(scores) - 1 / len(y)


def test_learned_average_trains_only_mix_and_beats_best_member(split, members):
    before = [[np.array(w) for w in m.get_weights()] for m in members]
    ensemble = kf.ensemble.average(members, weights="learned")
    mix = ensemble.get_layer("average")
    assert [w.path for w in ensemble.trainable_weights] == ["average/mix_logits"]
    np.testing.assert_allclose(helpers.as_numpy(mix.mixing_weights()), [1 / 3] * 3, atol=1e-6)
    ensemble.compile(
        optimizer=keras.optimizers.Adam(0.1), loss="binary_crossentropy", jit_compile=JIT
    )
    ensemble.fit(*split["holdout"], epochs=3, batch_size=25, verbose=0)
    weights = helpers.as_numpy(mix.mixing_weights())
    assert not np.allclose(weights, 1 / 3)
    np.testing.assert_allclose(weights.sum(), 1.0, atol=1e-6)
    assert np.all(weights > 0)
    for member, old in zip(members, before):
        for a, b in zip(old, member.get_weights()):
            np.testing.assert_array_equal(a, b)
    x, y = split["test"]
    best = max(data.binary_accuracy(m, x, y) for m in members)
    assert data.binary_accuracy(ensemble, x, y) >= best - 1 / len(y)


# ----------------------------------------------------------------------------- formulas
def test_fixed_weights_match_numpy(split, members):
    x = split["test"][0][:16]
    preds = [m.predict(x, verbose=0) for m in members]
    ensemble = kf.ensemble.average(members, weights=[1, 0, 3])
    expected = 0.25 * preds[0] + 0.75 * preds[2]
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), expected, atol=1e-6)
    weights = helpers.as_numpy(ensemble.get_layer("average").mixing_weights())
    np.testing.assert_allclose(weights, [0.25, 0.0, 0.75], atol=1e-7)


def test_logits_mode_on_probability_members_is_geometric_mean(split, members):
    x = split["test"][0][:16]
    preds = [m.predict(x, verbose=0) for m in members]
    ensemble = kf.ensemble.average(members, mode="logits")
    expected = np.mean([_logit(p) for p in preds], axis=0)
    np.testing.assert_allclose(ensemble.predict(x, verbose=0), expected, rtol=1e-4, atol=1e-4)


def test_logit_members_both_modes(split):
    x, y = split["train"]
    logit_members = [
        data.subset_member(f, f"logit_member_{i}", from_logits=True)
        for i, f in enumerate(data.SUBSETS)
    ]
    z = [m.predict(x[:8], verbose=0) for m in logit_members]
    in_logits = kf.ensemble.average(logit_members, mode="logits", from_logits=True)
    np.testing.assert_allclose(in_logits.predict(x[:8], verbose=0), np.mean(z, 0), atol=1e-5)
    in_probs = kf.ensemble.average(logit_members, mode="probabilities", from_logits=True)
    expected = np.mean([_sigmoid(v) for v in z], 0)
    np.testing.assert_allclose(in_probs.predict(x[:8], verbose=0), expected, atol=1e-6)


def test_fusion_model_heads_say_logits_or_probabilities():
    x, _ = multimodal_classification(n=6)
    a = data.multimodal_member("logit_model", from_logits=True, num_classes=3)
    b = data.multimodal_member("prob_model", num_classes=3)
    za, pb = a.predict(x, verbose=0), b.predict(x, verbose=0)
    softmax = np.exp(za) / np.exp(za).sum(-1, keepdims=True)
    ensemble = kf.ensemble.average([a, b])
    out = ensemble.predict(x, verbose=0)
    np.testing.assert_allclose(out, (softmax + pb) / 2, atol=1e-6)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)
    # Fresh inputs mirror the members' dict of named inputs.
    assert sorted(ensemble.input) == ["image", "tabular", "text"]


def test_frozen_members_run_in_inference_mode():
    inputs = keras.Input((4,), name="x")
    noisy = keras.Model(inputs, keras.layers.Dropout(0.9)(inputs), name="noisy")
    inputs2 = keras.Input((4,), name="x")
    plain = keras.Model(inputs2, keras.layers.Identity()(inputs2), name="plain")
    ensemble = kf.ensemble.average([noisy, plain], weights="learned")
    x = np.ones((3, 4), "float32")
    np.testing.assert_allclose(helpers.as_numpy(ensemble(x, training=True)), x, atol=1e-6)


def test_learned_weight_count(members):
    ensemble = kf.ensemble.average(members, weights="learned")
    assert ensemble.get_layer("average").count_params() == 3
    assert sum(int(np.prod(w.shape)) for w in ensemble.trainable_weights) == 3
    assert kf.ensemble.average(members).get_layer("average").count_params() == 0


# ------------------------------------------------------------------------ save / export
@pytest.mark.parametrize("weights", [None, "learned"])
def test_save_and_load(tmp_path, weights):
    x, _ = multimodal_classification(n=6)
    models = [data.multimodal_member(f"m{i}") for i in range(2)]
    ensemble = kf.ensemble.average(models, weights=weights)
    expected = ensemble.predict(x, verbose=0)
    path = os.path.join(str(tmp_path), "average.keras")
    ensemble.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), expected, atol=1e-6)
    assert len(loaded.trainable_weights) == len(ensemble.trainable_weights)


@requires_tensorflow
def test_saved_model_export(tmp_path):
    import tensorflow as tf

    x, _ = multimodal_classification(n=6)
    models = [data.multimodal_member(f"m{i}") for i in range(2)]
    ensemble = kf.ensemble.average(models, weights="learned")
    path = kf.export.export(ensemble, tmp_path / "saved", format="saved_model", probe=x)
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(
        helpers.as_numpy(reloaded.serve(x)), ensemble.predict(x, verbose=0), atol=1e-5
    )


# ---------------------------------------------------------------------------- bad input
def _two(name_a="a", name_b="b", width_b=1, input_b=data.WIDTH):
    def model(name, width, input_width):
        i = keras.Input((input_width,), name="x")
        return keras.Model(i, keras.layers.Dense(width, activation="sigmoid")(i), name=name)

    return [model(name_a, 1, data.WIDTH), model(name_b, width_b, input_b)]


BAD_WEIGHTS = [
    ([1.0], r"weights=\[1\.0\]"),
    ([1.0, 2.0, 3.0], r"weights=\[1\.0, 2\.0, 3\.0\]"),
    ([1.0, -1.0], r"weights=\[1\.0, -1\.0\]"),
    ([0, 0], r"weights=\[0, 0\]"),
    ("learn", "weights='learn'"),
    ([1.0, "a"], r"weights=\[1\.0, 'a'\]"),
]


def test_bad_weights():
    for weights, pattern in BAD_WEIGHTS:
        with pytest.raises(ValueError, match=pattern):
            kf.ensemble.average(_two(), weights=weights)


def test_bad_mode_and_from_logits():
    with pytest.raises(ValueError, match="mode='votes'"):
        kf.ensemble.average(_two(), mode="votes")
    with pytest.raises(ValueError, match="from_logits='yes'"):
        kf.ensemble.average(_two(), from_logits="yes")


def test_bad_models():
    with pytest.raises(ValueError, match="models=.*1 model"):
        kf.ensemble.average(_two()[:1])
    with pytest.raises(ValueError, match=r"models\[1\]='oops'"):
        kf.ensemble.average([_two()[0], "oops"])
    with pytest.raises(ValueError, match="same inputs.*Received: models=\\['a', 'b'\\]"):
        kf.ensemble.average(_two(input_b=4))
    with pytest.raises(ValueError, match="same output shape.*Received: models=\\['a', 'b'\\]"):
        kf.ensemble.average(_two(width_b=3))
    with pytest.raises(ValueError, match="own name.*\\['a'\\]"):
        kf.ensemble.average(_two(name_b="a"))
    regression = kf.FusionModel(
        inputs=keras.Input((data.WIDTH,), name="x"),
        branches=[kf.branches.MLP(units=(2,))],
        head=kf.heads.Regression(),
        name="reg",
    )
    with pytest.raises(ValueError, match="mixes regression models with classifiers"):
        kf.ensemble.average([_two()[0], regression])
