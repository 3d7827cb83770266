"""Auxiliary per-branch heads, gradient modulation (OGM) and multi-task loss weights."""

import os

import keras
import numpy as np
import pytest

import kfusion as kf
from tests import helpers
from tests.conftest import BACKEND


def two_views(n=320, seed=0):
    """View "a" holds the label's signal; view "b" is noise."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, 6)).astype("float32")
    b = rng.normal(size=(n, 6)).astype("float32")
    y = (a[:, 0] + a[:, 1] > 0).astype("int32")
    return {"a": a, "b": b}, y


def make(aux_loss_weight=0.5, balance=None, fusion="concat", **kwargs):
    keras.utils.set_random_seed(0)
    return kf.FusionModel(
        inputs={"a": keras.Input((6,)), "b": keras.Input((6,))},
        branches={
            "a": kf.branches.MLP(units=(16,), name="mlp_a"),
            "b": kf.branches.MLP(units=(16,), name="mlp_b"),
        },
        fusion=fusion,
        head=kf.heads.Classification(2, name="head"),
        aux_loss_weight=aux_loss_weight,
        balance=balance,
        **kwargs,
    )


def test_auxiliary_heads_train_each_branch_and_stay_out_of_predict(tmp_path):
    x, y = two_views()
    model = make()
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    history = model.fit(x, y, epochs=15, batch_size=32, validation_split=0.25, verbose=0)
    assert {"aux_mlp_a_loss", "aux_mlp_b_loss"} <= set(history.history)
    assert not any(k.startswith("val_aux") for k in history.history)
    # Only the fused head is an output; the auxiliary heads are trained weights.
    assert len(model.outputs) == 1 and model.output_shape == (None, 1)
    assert any("aux_mlp_a" in v.path for v in model.trainable_variables)
    x_test, y_test = two_views(200, seed=1)
    report = kf.inspect.branch_accuracy(model, x_test, y_test)
    assert report["branches"]["mlp_a"] > 0.85  # the informative view, on its own
    assert report["branches"]["mlp_b"] < 0.65  # noise, on its own
    assert report["fused"] > 0.85
    predictions = model.branch_predictions(x_test)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        loaded.branch_predictions(x_test)["mlp_b"], predictions["mlp_b"], atol=1e-6
    )
    np.testing.assert_allclose(
        helpers.as_numpy(loaded.predict(x_test, verbose=0)),
        helpers.as_numpy(model.predict(x_test, verbose=0)),
        atol=1e-6,
    )


def test_the_loss_adds_the_weighted_auxiliary_losses():
    x, y = two_views(16)
    model = make(aux_loss_weight=0.25)
    model.compile(optimizer="adam")
    y_pred = model(x, training=True)
    loss = float(helpers.as_numpy(model.compute_loss(x, y, y_pred, training=True)))
    bce = keras.losses.BinaryCrossentropy()
    features = model.get_layer("auxiliary_heads")._last[0]
    main = float(helpers.as_numpy(bce(y, y_pred)))
    aux = sum(float(helpers.as_numpy(bce(y, p))) for p in features)
    np.testing.assert_allclose(loss, main + 0.25 * aux, rtol=1e-5)
    # Outside training the loss is the head's alone.
    y_pred = model(x, training=False)
    plain = float(helpers.as_numpy(model.compute_loss(x, y, y_pred, training=False)))
    np.testing.assert_allclose(plain, float(helpers.as_numpy(bce(y, y_pred))), rtol=1e-5)


def test_an_absent_modality_counts_nothing_in_its_auxiliary_loss():
    x, y = two_views(16)
    model = make(missing_modalities=True)
    model.compile(optimizer="adam")
    flags = np.arange(16) % 2 == 0
    given = model.complete_inputs({**x, "b_present": flags})
    model(given, training=True)
    losses = model.get_layer("auxiliary_heads").losses_for(keras.ops.convert_to_tensor(y))
    changed = model.complete_inputs({**x, "b": x["b"] * 0 + 9, "b_present": flags})
    model(changed, training=True)
    other = model.get_layer("auxiliary_heads").losses_for(keras.ops.convert_to_tensor(y))
    # Branch b's loss only reads its present rows (unchanged here); a's is untouched.
    b_rows = np.asarray(helpers.as_numpy(losses[1]))
    assert not np.allclose(b_rows, helpers.as_numpy(other[1]))  # present rows did change
    model2 = make(missing_modalities=True)
    model2.compile(optimizer="adam")
    only_absent = model2.complete_inputs({**x, "b_present": np.zeros(16, bool)})
    model2(only_absent, training=True)
    loss_b = model2.get_layer("auxiliary_heads").losses_for(keras.ops.convert_to_tensor(y))[1]
    assert float(helpers.as_numpy(loss_b)) == 0.0


def test_gradient_modulation_scales_the_gradient_and_not_the_value():
    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.ones((8, 2), "float32")

    def step(coefficient):
        keras.utils.set_random_seed(0)
        inp = keras.Input((4,))
        dense = keras.layers.Dense(2, name="dense")
        modulation = kf.layers.GradientModulation(name="modulation")
        a, b = modulation([dense(inp), inp[:, :2]])
        model = keras.Model(inp, keras.layers.Add()([a, b]))
        modulation.coefficients.assign([coefficient, 1.0])
        before = helpers.as_numpy(model.predict(x, verbose=0))
        start = [helpers.as_numpy(w) for w in dense.weights]
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.train_on_batch(x, y)
        return before, [helpers.as_numpy(w) - s for w, s in zip(dense.weights, start)]

    value_full, delta_full = step(1.0)
    value_half, delta_half = step(0.5)
    _, delta_none = step(0.0)
    np.testing.assert_array_equal(value_full, value_half)  # the forward pass is unchanged
    for full, half, none in zip(delta_full, delta_half, delta_none):
        assert np.abs(full).max() > 1e-4
        np.testing.assert_allclose(half, 0.5 * full, rtol=1e-4, atol=1e-7)
        np.testing.assert_array_equal(none, 0.0)


def test_balance_slows_the_dominant_branch():
    callback = kf.callbacks.ModalityBalance(alpha=0.5)
    k = callback.coefficients_for([0.9, 0.45])
    np.testing.assert_allclose(k, [1 - np.tanh(0.5 * (2.0 - 1.0)), 1.0])
    assert callback.coefficients_for([0.5, 0.5]) == [1.0, 1.0]
    x, y = two_views()
    model = make(balance="ogm")
    model.compile(optimizer=keras.optimizers.Adam(0.01))
    model.fit(x, y, epochs=4, batch_size=32, verbose=0)
    coefficients = helpers.as_numpy(model.get_layer("gradient_modulation").coefficients)
    # View a is the confident one: slowed; noise view b learns at full speed.
    assert coefficients[0] < 0.95 and coefficients[1] == 1.0
    assert model.to_spec()["balance"] == "ogm"
    rebuilt = kf.FusionModel.from_spec(model.to_spec())
    assert rebuilt.balance == "ogm" and rebuilt.aux_loss_weight == 0.5


def test_multi_task_loss_weights_and_learned_uncertainty(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 6)).astype("float32")
    noisy = (3 * x[:, 1:2] + rng.normal(size=(256, 1)) * 3).astype("float32")
    y = {"label": (x[:, 0] > 0).astype("int32"), "score": noisy}
    spec = {
        "inputs": {"x": {"shape": [6]}},
        "branches": [{"type": "MLP", "units": [16]}],
        "head": {
            "type": "MultiTask",
            "heads": {
                "label": {"type": "Classification", "num_classes": 2},
                "score": {"type": "Regression"},
            },
            "loss_weights": {"score": 0.5},
            "uncertainty_weighting": True,
        },
    }
    keras.utils.set_random_seed(0)
    model = kf.FusionModel.from_spec(spec)
    assert model.head.loss_weights == {"score": 0.5}
    model.compile(optimizer=keras.optimizers.Adam(0.02))
    model.fit(x, y, epochs=8, batch_size=32, verbose=0)
    weights = model.head.task_weights()
    # The noisy regression task (loss ~9) is weighted down, the classification up.
    assert weights["score"] < 0.5 * 0.5 and weights["label"] > 1.0
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.head.task_weights() == pytest.approx(weights)
    # Fixed weights reach keras' compile.
    spec["head"]["uncertainty_weighting"] = False
    fixed = kf.FusionModel.from_spec(spec)
    fixed.compile(optimizer="adam")
    out = fixed(x[:8])
    total = float(
        helpers.as_numpy(fixed.compute_loss(x[:8], {k: v[:8] for k, v in y.items()}, out))
    )
    bce = keras.losses.BinaryCrossentropy()
    mse = keras.losses.MeanSquaredError()
    expected = float(helpers.as_numpy(bce(y["label"][:8], out["label"]))) + 0.5 * float(
        helpers.as_numpy(mse(y["score"][:8], out["score"]))
    )
    np.testing.assert_allclose(total, expected, rtol=1e-5)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="SavedModel export needs TensorFlow")
def test_export_leaves_the_auxiliary_heads_out(tmp_path):
    import tensorflow as tf

    x, _ = two_views(8)
    model = make(balance="ogm")
    path = os.path.join(str(tmp_path), "saved")
    kf.export.export(model, path, format="saved_model")
    reloaded = tf.saved_model.load(path)
    out = reloaded.serve(x)
    outputs = out if isinstance(out, dict) else {"output": out}
    assert len(outputs) == 1
    np.testing.assert_allclose(
        helpers.as_numpy(next(iter(outputs.values()))), helpers.as_numpy(model(x)), atol=1e-5
    )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match=r"`aux_loss_weight` must be a finite number >= 0"):
        make(aux_loss_weight=-1.0)
    with pytest.raises(ValueError, match="`balance` must be one of"):
        make(balance="ogm-ge")
    with pytest.raises(ValueError, match="set `aux_loss_weight` > 0"):
        make(aux_loss_weight=0.0, balance="ogm")
    with pytest.raises(ValueError, match="needs two branches or more and a single-task head"):
        kf.FusionModel(
            inputs=keras.Input((4,)),
            branches=[kf.branches.MLP(units=(4,))],
            head=kf.heads.Classification(2),
            aux_loss_weight=0.5,
        )
    with pytest.raises(ValueError, match="`loss_weights` names a task that does not exist"):
        kf.heads.MultiTask({"a": kf.heads.Regression()}, loss_weights={"b": 1.0})
    with pytest.raises(ValueError, match=r"loss_weights\['a'\]=-2"):
        kf.heads.MultiTask({"a": kf.heads.Regression()}, loss_weights={"a": -2})
    with pytest.raises(ValueError, match="`uncertainty_weighting` must be"):
        kf.heads.MultiTask({"a": kf.heads.Regression()}, uncertainty_weighting="yes")
    with pytest.raises(ValueError, match="`alpha` must be a positive float"):
        kf.callbacks.ModalityBalance(alpha=0)
    with pytest.raises(ValueError, match="`min_coefficient` must be a float in"):
        kf.callbacks.ModalityBalance(min_coefficient=0)
    model = kf.FusionModel(
        inputs=keras.Input((4,)),
        branches=[kf.branches.MLP(units=(4,))],
        head=kf.heads.MultiTask(
            {"a": kf.heads.Regression(), "b": kf.heads.Regression()}, uncertainty_weighting=True
        ),
    )
    with pytest.raises(ValueError, match="compile with loss=None"):
        model.compile(optimizer="adam", loss={"a": "mae", "b": "mae"})


def test_branch_predictions_of_sequence_features_leave_padding_out():
    # Cross-attention keeps the branches' token sequences; each auxiliary head reads its
    # branch's mean over the valid steps, so right-padding changes no branch prediction.
    keras.utils.set_random_seed(0)
    model = kf.FusionModel(
        inputs={"s": keras.Input((None, 3)), "t": keras.Input((4,))},
        branches={
            "s": kf.branches.CNN(filters=(4,), pooling=None, name="cnn"),
            "t": kf.branches.MLP(units=(4,), name="mlp"),
        },
        fusion="cross_attention",
        head=kf.heads.Classification(3),
        mask_value=0.0,
        aux_loss_weight=0.5,
    )
    rng = np.random.default_rng(0)
    x = {"s": rng.normal(size=(4, 6, 3)).astype("float32"), "t": rng.normal(size=(4, 4))}
    padded = {**x, "s": np.concatenate([x["s"], np.zeros((4, 5, 3), "float32")], axis=1)}
    a, b = model.branch_predictions(x), model.branch_predictions(padded)
    np.testing.assert_allclose(a["cnn"], b["cnn"], atol=1e-5)
    np.testing.assert_allclose(a["mlp"], b["mlp"], atol=1e-6)
