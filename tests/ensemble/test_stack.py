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


def test_stack_fit_on_holdout_beats_best_member(split, members):
    before = [[np.array(w) for w in m.get_weights()] for m in members]
    stacked = kf.ensemble.stack(members)
    assert [w.path for w in stacked.trainable_weights] == [
        "meta_learner/kernel",
        "meta_learner/bias",
    ]
    assert all(not m.trainable for m in members)
    stacked.compile(
        optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy", jit_compile=JIT
    )
    # The meta learner trains on rows the members never saw (see stack's docstring).
    stacked.fit(*split["holdout"], epochs=20, batch_size=25, verbose=0)
    for member, old in zip(members, before):
        for a, b in zip(old, member.get_weights()):
            np.testing.assert_array_equal(a, b)
    x, y = split["test"]
    best = max(data.binary_accuracy(m, x, y) for m in members)
    # One test sample of tolerance; the stacked model reaches ~0.94-0.96 against ~0.82.
    assert data.binary_accuracy(stacked, x, y) >= best - 1 / len(y)
    # Every member got a positive weight: each carries information the others lack.
    kernel = stacked.get_layer("meta_learner").get_weights()[0]
    assert np.all(kernel > 0), kernel


def test_default_meta_is_logistic_regression_on_outputs(split, members):
    x = split["test"][0][:8]
    stacked = kf.ensemble.stack(members)
    kernel, bias = stacked.get_layer("meta_learner").get_weights()
    features = np.concatenate([m.predict(x, verbose=0) for m in members], axis=-1)
    expected = 1 / (1 + np.exp(-(features @ kernel + bias)))
    np.testing.assert_allclose(stacked.predict(x, verbose=0), expected, rtol=1e-5, atol=1e-6)
    assert stacked.get_layer("meta_learner").count_params() == 3 + 1


def test_default_meta_by_task():
    x, _ = multimodal_classification(n=4)
    multi = [data.multimodal_member(f"c{i}", num_classes=3) for i in range(2)]
    stacked = kf.ensemble.stack(multi)
    meta = stacked.get_layer("meta_learner")
    assert meta.get_config()["activation"] == "softmax"
    assert meta.count_params() == 6 * 3 + 3
    np.testing.assert_allclose(stacked.predict(x, verbose=0).sum(-1), 1.0, atol=1e-5)

    def regression(name):
        return kf.FusionModel(
            inputs=keras.Input((5,), name="x"),
            branches=[kf.branches.MLP(units=(4,))],
            head=kf.heads.Regression(2),
            name=name,
        )

    reg = kf.ensemble.stack([regression("r0"), regression("r1")])
    assert reg.get_layer("meta_learner").get_config()["activation"] == "linear"
    assert reg.output_shape == (None, 2)


def test_custom_meta_learner(split, members):
    meta = keras.Sequential(
        [keras.layers.Dense(4, activation="relu"), keras.layers.Dense(1, activation="sigmoid")],
        name="custom_meta",
    )
    stacked = kf.ensemble.stack(members, meta=meta)
    stacked.compile(optimizer="adam", loss="binary_crossentropy")
    stacked.fit(*split["holdout"], epochs=1, verbose=0)
    assert {w.path.split("/")[0] for w in stacked.trainable_weights} <= {"custom_meta"}
    assert stacked.output_shape == (None, 1)


def test_bases_run_in_inference_mode():
    def noisy(name):
        i = keras.Input((4,), name="x")
        return keras.Model(i, keras.layers.Dropout(0.9)(i), name=name)

    stacked = kf.ensemble.stack([noisy("a"), noisy("b")], task="regression")
    features = stacked.get_layer("stacked_outputs").output
    probe = keras.Model(stacked.input, features)
    x = np.ones((3, 4), "float32")
    np.testing.assert_allclose(helpers.as_numpy(probe(x, training=True)), np.ones((3, 8)))


def test_save_and_load(tmp_path, split, members):
    stacked = kf.ensemble.stack(members)
    stacked.compile(optimizer=keras.optimizers.Adam(0.05), loss="binary_crossentropy")
    stacked.fit(*split["holdout"], epochs=1, verbose=0)
    x = split["test"][0][:16]
    path = os.path.join(str(tmp_path), "stacked.keras")
    stacked.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        loaded.predict(x, verbose=0), stacked.predict(x, verbose=0), atol=1e-6
    )
    assert len(loaded.trainable_weights) == 2


def test_save_and_load_fusion_members(tmp_path):
    x, _ = multimodal_classification(n=6)
    stacked = kf.ensemble.stack([data.multimodal_member(f"m{i}") for i in range(2)])
    path = os.path.join(str(tmp_path), "stacked.keras")
    stacked.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), stacked.predict(x, verbose=0))


@requires_tensorflow
def test_saved_model_export(tmp_path):
    import tensorflow as tf

    x, _ = multimodal_classification(n=6)
    stacked = kf.ensemble.stack([data.multimodal_member(f"m{i}") for i in range(2)])
    path = kf.export.export(stacked, tmp_path / "saved", format="saved_model", probe=x)
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(
        helpers.as_numpy(reloaded.serve(x)), stacked.predict(x, verbose=0), atol=1e-5
    )


# ---------------------------------------------------------------------------- bad input
def _model(name, width=1, input_width=data.WIDTH):
    i = keras.Input((input_width,), name="x")
    return keras.Model(i, keras.layers.Dense(width, activation="sigmoid")(i), name=name)


def test_bad_arguments():
    models = [_model("a"), _model("b")]
    with pytest.raises(ValueError, match="task='ranking'"):
        kf.ensemble.stack(models, task="ranking")
    with pytest.raises(ValueError, match="meta='dense'"):
        kf.ensemble.stack(models, meta="dense")
    with pytest.raises(ValueError, match="meta=<Lambda"):
        kf.ensemble.stack(models, meta=keras.layers.Lambda(lambda t: t))
    with pytest.raises(ValueError, match="from_logits=1"):
        kf.ensemble.stack(models, from_logits=1)


def test_bad_models():
    with pytest.raises(ValueError, match="1 model"):
        kf.ensemble.stack([_model("a")])
    with pytest.raises(ValueError, match="same inputs"):
        kf.ensemble.stack([_model("a"), _model("b", input_width=3)])
    with pytest.raises(ValueError, match="same output shape"):
        kf.ensemble.stack([_model("a"), _model("b", width=2)])
    # With a custom meta learner, different widths are fine; several outputs are not.
    stacked = kf.ensemble.stack(
        [_model("a"), _model("b", width=2)], meta=keras.layers.Dense(1, name="meta")
    )
    assert stacked.output_shape == (None, 1)
    i = keras.Input((data.WIDTH,), name="x")
    two_outputs = keras.Model(i, [keras.layers.Dense(1)(i), keras.layers.Dense(1)(i)], name="c")
    with pytest.raises(ValueError, match="one tensor of shape \\(batch, K\\).*'c'"):
        kf.ensemble.stack([_model("a"), two_outputs], meta=keras.layers.Dense(1))
