import keras
import numpy as np
import pytest

from kfusion import heads
from kfusion.heads._base import SparseCategoricalCrossentropyWithSmoothing
from tests import helpers
from tests.conftest import requires_tensorflow

D = 6  # width of the fused features the heads read


@pytest.fixture
def features(rng):
    return rng.normal(size=(8, D)).astype("float32")


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _numpy_head(head, x):
    """The head's logits computed with NumPy on its actual weights (inference mode)."""
    h = x.astype("float64")
    for dense in head.hidden_layers:
        kernel, bias = dense.get_weights()
        h = np.maximum(h @ kernel + bias, 0.0)
    kernel, bias = head.output_layer.get_weights()
    return h @ kernel + bias


def _tiny_model(head, width=D):
    """Inputs -> Dense(16, relu) -> head: the smallest model a head trains in."""
    inputs = keras.Input((width,))
    features = keras.layers.Dense(16, activation="relu")(inputs)
    return keras.Model(inputs, head(features))


def _compile_with_defaults(model, head):
    model.compile(optimizer="adam", loss=head.default_loss(), metrics=head.default_metrics())


def _linear_data(seed, n, outputs):
    """Inputs and a linear signal `x @ w` (train and test sets from the same rule)."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(D, outputs)) / np.sqrt(D)  # z has about unit variance
    x = rng.normal(size=(2 * n, D)).astype("float32")
    z = x @ w
    return (x[:n], z[:n]), (x[n:], z[n:])


HEADS = {
    "binary": lambda: heads.Classification(2, hidden_units=(8,), dropout=0.1),
    "multiclass": lambda: heads.Classification(4, hidden_units=(8, 4)),
    "logits": lambda: heads.Classification(3, from_logits=True),
    "multilabel": lambda: heads.MultiLabel(3, threshold=0.3, hidden_units=(8,)),
    "regression": lambda: heads.Regression(2, hidden_units=(8,)),
}


# ---------------------------------------------------------------- config and shapes
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_config_roundtrip(kind):
    helpers.check_config_roundtrip(HEADS[kind]())


def test_config_roundtrip_keeps_every_argument():
    head = heads.Classification(
        5, hidden_units=[8, 4], dropout=0.2, from_logits=True, label_smoothing=0.1, name="cls"
    )
    config = helpers.check_config_roundtrip(head).get_config()
    assert config["num_classes"] == 5 and config["hidden_units"] == [8, 4]
    assert config["dropout"] == 0.2 and config["from_logits"] and config["label_smoothing"] == 0.1
    labels = helpers.check_config_roundtrip(heads.MultiLabel(4, threshold=0.7, dropout=0.3))
    assert labels.threshold == 0.7 and labels.num_labels == 4 and labels.dropout == 0.3
    assert helpers.check_config_roundtrip(heads.Regression(3)).units == 3


def test_multi_task_config_roundtrip_through_keras_serialization():
    head = heads.MultiTask(
        {
            "label": heads.Classification(3, hidden_units=(4,), label_smoothing=0.1),
            "tags": heads.MultiLabel(2, threshold=0.4),
            "score": heads.Regression(2),
        },
        name="tasks",
    )
    helpers.check_config_roundtrip(head)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(head))
    assert isinstance(restored, heads.MultiTask)
    assert list(restored.heads) == ["label", "score", "tags"]
    assert isinstance(restored.heads["tags"], heads.MultiLabel)
    assert restored.heads["tags"].threshold == 0.4
    assert restored.heads["label"].hidden_units == (4,)
    assert restored.get_config() == head.get_config()


@pytest.mark.parametrize(
    "kind, width", [("binary", 1), ("multiclass", 4), ("logits", 3), ("multilabel", 3)]
)
def test_symbolic_matches_eager(features, kind, width):
    out = helpers.check_symbolic_matches_eager(HEADS[kind](), features)
    assert tuple(out.shape) == (8, width)


def test_classification_with_one_class_is_binary(features):
    head = heads.Classification(1)
    assert tuple(head(features).shape) == (8, 1)
    assert isinstance(head.default_loss(), keras.losses.BinaryCrossentropy)


def test_multi_task_shapes(features):
    head = heads.MultiTask({"b": heads.Regression(2), "a": heads.Classification(3)})
    symbolic = head(keras.Input((D,)))
    eager = head(features)
    assert sorted(symbolic) == sorted(eager) == ["a", "b"]
    assert tuple(symbolic["a"].shape) == (None, 3) and tuple(symbolic["b"].shape) == (None, 2)
    assert tuple(eager["a"].shape) == (8, 3) and tuple(eager["b"].shape) == (8, 2)
    assert head.compute_output_shape((None, D)) == {"a": (None, 3), "b": (None, 2)}


# ---------------------------------------------------------------- formulas
def test_classification_matches_numpy(features):
    multi = heads.Classification(4, hidden_units=(5, 3), dropout=0.5)
    out = helpers.as_numpy(multi(features, training=False))
    np.testing.assert_allclose(out, _softmax(_numpy_head(multi, features)), atol=1e-5)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)

    binary = heads.Classification(2)
    out = helpers.as_numpy(binary(features))
    np.testing.assert_allclose(out, _sigmoid(_numpy_head(binary, features)), atol=1e-5)

    logits = heads.Classification(3, hidden_units=(4,), from_logits=True)
    out = helpers.as_numpy(logits(features))
    np.testing.assert_allclose(out, _numpy_head(logits, features), atol=1e-5)


def test_multi_label_and_regression_match_numpy(features):
    labels = heads.MultiLabel(3, hidden_units=(4,))
    out = helpers.as_numpy(labels(features))
    np.testing.assert_allclose(out, _sigmoid(_numpy_head(labels, features)), atol=1e-5)

    regression = heads.Regression(2, hidden_units=(5,))
    out = helpers.as_numpy(regression(features))
    np.testing.assert_allclose(out, _numpy_head(regression, features), atol=1e-5)


def test_dropout_follows_training_flag(features):
    head = heads.Regression(4, hidden_units=(16,), dropout=0.5)
    inference = helpers.as_numpy(head(features, training=False))
    np.testing.assert_allclose(inference, _numpy_head(head, features), atol=1e-5)
    training = helpers.as_numpy(head(features, training=True))
    assert not np.allclose(training, inference)
    # Without hidden layers the dropout acts on the input features.
    plain = heads.Regression(4, dropout=0.5)
    assert not np.allclose(
        helpers.as_numpy(plain(features, training=True)),
        helpers.as_numpy(plain(features, training=False)),
    )


def test_label_smoothing_loss_matches_numpy(rng):
    logits = rng.normal(size=(6, 4)).astype("float32")
    labels = np.array([0, 3, 1, 2, 3, 0])
    s = 0.2
    target = (1 - s) * np.eye(4)[labels] + s / 4
    expected = -np.mean(np.sum(target * np.log(_softmax(logits)), axis=-1))

    head = heads.Classification(4, from_logits=True, label_smoothing=s)
    loss = head.default_loss()
    assert isinstance(loss, SparseCategoricalCrossentropyWithSmoothing)
    np.testing.assert_allclose(float(loss(labels, logits)), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss(labels[:, None], logits)), expected, rtol=1e-5)
    probs_loss = heads.Classification(4, label_smoothing=s).default_loss()
    np.testing.assert_allclose(float(probs_loss(labels, _softmax(logits))), expected, rtol=1e-4)
    # No smoothing: keras' own loss, the same numbers as the formula with s = 0.
    plain = heads.Classification(4, from_logits=True).default_loss()
    assert isinstance(plain, keras.losses.SparseCategoricalCrossentropy)
    expected_plain = -np.mean(np.log(_softmax(logits))[np.arange(6), labels])
    np.testing.assert_allclose(float(plain(labels, logits)), expected_plain, rtol=1e-5)


def test_binary_loss_knows_logits_and_smoothing(rng):
    z = rng.normal(size=(6, 1)).astype("float32")
    y = np.array([[0], [1], [1], [0], [1], [0]], "float32")
    ys = y * 0.9 + 0.05
    p = _sigmoid(z.astype("float64"))
    expected = -np.mean(ys * np.log(p) + (1 - ys) * np.log(1 - p))
    loss = heads.Classification(2, from_logits=True, label_smoothing=0.1).default_loss()
    np.testing.assert_allclose(float(loss(y, z)), expected, rtol=1e-4)


# ---------------------------------------------------------------- default metrics
def test_default_metrics_are_fresh_objects_of_the_right_kind():
    binary = heads.Classification(2)
    first, second = binary.default_metrics(), binary.default_metrics()
    assert first[0] is not second[0]
    assert isinstance(first[0], keras.metrics.BinaryAccuracy) and first[0].name == "accuracy"
    assert first[0].threshold == 0.5
    logits = heads.Classification(2, from_logits=True).default_metrics()[0]
    assert logits.threshold == 0.0
    sparse = heads.Classification(3).default_metrics()[0]
    assert isinstance(sparse, keras.metrics.SparseCategoricalAccuracy)
    accuracy, auc = heads.MultiLabel(3, threshold=0.25, from_logits=True).default_metrics()
    np.testing.assert_allclose(accuracy.threshold, np.log(0.25 / 0.75))
    assert isinstance(auc, keras.metrics.AUC) and auc.multi_label and auc.num_labels == 3
    mae, rmse = heads.Regression().default_metrics()
    assert isinstance(mae, keras.metrics.MeanAbsoluteError)
    assert isinstance(rmse, keras.metrics.RootMeanSquaredError)
    assert isinstance(heads.Regression().default_loss(), keras.losses.MeanSquaredError)
    assert isinstance(heads.MultiLabel(2).default_loss(), keras.losses.BinaryCrossentropy)


# ---------------------------------------------------------------- training
def test_multiclass_classification_learns():
    (x, z), (xt, zt) = _linear_data(0, 384, 3)
    y, yt = z.argmax(-1), zt.argmax(-1)
    head = heads.Classification(3, hidden_units=(16,))
    model = _tiny_model(head)
    _compile_with_defaults(model, head)
    model.fit(x, y, epochs=20, batch_size=16, verbose=0)
    result = model.evaluate(xt, yt, verbose=0, return_dict=True)
    assert result["accuracy"] > 0.8  # chance: about 0.33


@pytest.mark.parametrize("from_logits", [False, True])
def test_binary_classification_learns_and_accuracy_uses_the_right_threshold(from_logits):
    (x, z), (xt, zt) = _linear_data(1, 384, 1)
    y, yt = (z[:, 0] > 0).astype("float32"), (zt[:, 0] > 0).astype("float32")
    head = heads.Classification(2, from_logits=from_logits, label_smoothing=0.05)
    model = _tiny_model(head)
    _compile_with_defaults(model, head)
    model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    result = model.evaluate(xt, yt, verbose=0, return_dict=True)
    assert result["accuracy"] > 0.85  # chance: about 0.5
    pred = model.predict(xt, verbose=0)[:, 0]
    numpy_accuracy = np.mean((pred > (0.0 if from_logits else 0.5)) == (yt > 0.5))
    np.testing.assert_allclose(result["accuracy"], numpy_accuracy, atol=1e-6)


def test_multi_label_learns():
    (x, z), (xt, zt) = _linear_data(2, 384, 3)
    y, yt = (z > 0).astype("float32"), (zt > 0).astype("float32")
    head = heads.MultiLabel(3, threshold=0.4)
    model = _tiny_model(head)
    _compile_with_defaults(model, head)
    model.fit(x, y, epochs=20, batch_size=16, verbose=0)
    result = model.evaluate(xt, yt, verbose=0, return_dict=True)
    assert result["accuracy"] > 0.8  # chance: about 0.5
    assert result["auc"] > 0.9  # chance: 0.5
    pred = model.predict(xt, verbose=0)
    np.testing.assert_allclose(result["accuracy"], np.mean((pred > 0.4) == (yt > 0.5)), atol=1e-6)


def test_regression_learns():
    (x, z), (xt, zt) = _linear_data(3, 384, 2)
    head = heads.Regression(2)
    model = _tiny_model(head)
    _compile_with_defaults(model, head)
    model.fit(x, z, epochs=25, batch_size=16, verbose=0)
    result = model.evaluate(xt, zt, verbose=0, return_dict=True)
    baseline = float(np.sqrt(np.mean((zt - z.mean(0)) ** 2)))  # predicting the mean
    assert result["rmse"] < 0.45 * baseline  # R^2 above 0.8
    assert result["mae"] < result["rmse"] * 1.01


def test_multi_task_model_compiles_with_default_losses_fits_and_saves(tmp_path):
    (x, z), (xt, zt) = _linear_data(4, 384, 3)
    y = {"label": (z[:, 0] > 0).astype("int32") + (z[:, 1] > 0), "score": z[:, 2:]}
    yt = {"label": (zt[:, 0] > 0).astype("int32") + (zt[:, 1] > 0), "score": zt[:, 2:]}
    head = heads.MultiTask(
        {
            "score": heads.Regression(),
            "label": heads.Classification(3, hidden_units=(16,), label_smoothing=0.05),
        }
    )
    model = _tiny_model(head)
    assert isinstance(model.output, dict) and sorted(model.output) == ["label", "score"]
    _compile_with_defaults(model, head)
    model.fit(x, y, epochs=20, batch_size=16, verbose=0)
    result = model.evaluate(xt, yt, verbose=0, return_dict=True)
    assert result["label_accuracy"] > 0.75  # chance: below 0.5 (largest class)
    assert result["score_rmse"] < 0.5 * float(np.std(zt[:, 2]))

    path = str(tmp_path / "multi_task.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    expected, got = model.predict(xt, verbose=0), loaded.predict(xt, verbose=0)
    for task in ("label", "score"):
        np.testing.assert_allclose(got[task], expected[task], atol=1e-5)
    # The compiled default losses (including the smoothed sparse loss) come back too.
    again = loaded.evaluate(xt, yt, verbose=0, return_dict=True)
    np.testing.assert_allclose(again["loss"], result["loss"], rtol=1e-4)


def test_fit_step(features):
    helpers.check_fit_step(heads.Classification(3, hidden_units=(4,), dropout=0.1), features)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_output_is_float32_under_mixed_precision(features, policy, kind):
    keras.config.set_dtype_policy(policy)
    try:
        head = HEADS[kind]()
        symbolic = head(keras.Input((D,)))
        out = head(features)
        compute = keras.DTypePolicy(policy).compute_dtype
        assert keras.backend.standardize_dtype(out.dtype) == "float32"
        assert keras.backend.standardize_dtype(symbolic.dtype) == "float32"
        assert head.output_layer.compute_dtype == "float32"
        for dense in head.hidden_layers:
            assert dense.compute_dtype == compute
        for v in head.weights:
            assert keras.backend.standardize_dtype(v.dtype) == "float32", v.path
        assert np.all(np.isfinite(helpers.as_numpy(out)))
    finally:
        keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_multi_task_trains_under_mixed_precision(policy):
    (x, z), _ = _linear_data(5, 32, 2)
    keras.config.set_dtype_policy(policy)
    try:
        head = heads.MultiTask(
            {"label": heads.Classification(2, hidden_units=(8,)), "score": heads.Regression()}
        )
        model = _tiny_model(head)
        assert all(keras.backend.standardize_dtype(t.dtype) == "float32" for t in model.outputs)
        _compile_with_defaults(model, head)
        history = model.fit(
            x, {"label": z[:, 0] > 0, "score": z[:, 1:]}, epochs=2, batch_size=16, verbose=0
        )
        assert np.all(np.isfinite(history.history["loss"]))
    finally:
        keras.config.set_dtype_policy("float32")


def test_weight_count():
    head = heads.Classification(4, hidden_units=(5, 3))
    head.build((None, D))
    assert head.count_params() == (D * 5 + 5) + (5 * 3 + 3) + (3 * 4 + 4)
    binary = heads.Classification(2)
    binary.build((None, D))
    assert binary.count_params() == D + 1
    labels = heads.MultiLabel(3)
    labels.build((None, D))
    assert labels.count_params() == D * 3 + 3
    tasks = heads.MultiTask({"a": heads.Regression(2), "b": heads.Classification(3)})
    tasks.build((None, D))
    assert tasks.count_params() == (D * 2 + 2) + (D * 3 + 3)
    assert len(tasks.trainable_weights) == 4


def test_trainable_false_freezes_every_sub_layer():
    head = heads.MultiTask(
        {"a": heads.Classification(3, hidden_units=(4,)), "b": heads.Regression()},
        trainable=False,
    )
    model = _tiny_model(head)
    assert len(model.trainable_weights) == 2  # only the Dense feeding the head
    single = heads.Regression(hidden_units=(4,), trainable=False)
    assert len(_tiny_model(single).trainable_weights) == 2


def test_masks_are_consumed(features):
    assert heads.Regression().compute_mask(features, None) is None
    assert heads.MultiTask({"a": heads.Regression()}).compute_mask(features, None) is None


# ---------------------------------------------------------------- saving
@pytest.mark.parametrize("kind", sorted(HEADS))
def test_save_and_load(features, tmp_path, kind):
    helpers.check_saving(HEADS[kind](), features, tmp_path)


def test_multi_task_save_and_load(features, tmp_path):
    head = heads.MultiTask({"x": heads.Classification(3), "y": heads.Classification(2)})
    loaded = helpers.check_saving(head, features, tmp_path)
    restored = [layer for layer in loaded.layers if isinstance(layer, heads.MultiTask)][0]
    for task in ("x", "y"):
        for a, b in zip(head.heads[task].get_weights(), restored.heads[task].get_weights()):
            np.testing.assert_array_equal(a, b)


@requires_tensorflow
@pytest.mark.parametrize("kind", ["multiclass", "regression"])
def test_saved_model_export(features, tmp_path, kind):
    helpers.check_saved_model(HEADS[kind](), features, tmp_path)


@requires_tensorflow
def test_multi_task_saved_model_export(features, tmp_path):
    head = heads.MultiTask({"a": heads.Classification(3), "b": heads.Regression()})
    helpers.check_saved_model(head, features, tmp_path)


# ---------------------------------------------------------------- bad arguments / inputs
@pytest.mark.parametrize(
    "cls, kwargs, name",
    [
        (heads.Classification, {"num_classes": 0}, "num_classes"),
        (heads.Classification, {"num_classes": 2.5}, "num_classes"),
        (heads.Classification, {"num_classes": "10"}, "num_classes"),
        (heads.Classification, {"num_classes": 3, "dropout": 1.0}, "dropout"),
        (heads.Classification, {"num_classes": 3, "hidden_units": [4, 0]}, "hidden_units"),
        (heads.Classification, {"num_classes": 3, "from_logits": "yes"}, "from_logits"),
        (heads.Classification, {"num_classes": 3, "label_smoothing": -0.1}, "label_smoothing"),
        (heads.MultiLabel, {"num_labels": 0}, "num_labels"),
        (heads.MultiLabel, {"num_labels": 3, "threshold": 1.0}, "threshold"),
        (heads.MultiLabel, {"num_labels": 3, "threshold": 0}, "threshold"),
        (heads.MultiLabel, {"num_labels": 3, "threshold": "high"}, "threshold"),
        (heads.Regression, {"units": 0}, "units"),
        (heads.Regression, {"dropout": -0.5}, "dropout"),
    ],
)
def test_bad_arguments(cls, kwargs, name):
    expected = f"{name}={kwargs[name]!r}"
    for char in "[].()":
        expected = expected.replace(char, "\\" + char)
    with pytest.raises(ValueError, match=expected):
        cls(**kwargs)


@pytest.mark.parametrize(
    "value",
    [
        {},
        [heads.Regression()],
        {"a b": heads.Regression()},
        {"1st": heads.Regression()},
        {"a": keras.layers.Dense(1)},
        {"a": heads.MultiTask({"b": heads.Regression()})},
    ],
)
def test_multi_task_bad_heads(value):
    with pytest.raises(ValueError, match="Received: heads="):
        heads.MultiTask(value)


def test_multi_task_rejects_a_head_listed_twice():
    shared = heads.Regression()
    with pytest.raises(ValueError, match="appears twice"):
        heads.MultiTask({"a": shared, "b": shared})


def test_bad_inputs(features):
    with pytest.raises(ValueError, match=r"\(batch, D\)"):
        heads.Classification(3)(np.ones((4, 3, 2), "float32"))
    with pytest.raises(ValueError, match=r"\(batch, D\)"):
        heads.Regression()(np.ones((4,), "float32"))
    with pytest.raises(ValueError, match=r"\(batch, D\)"):
        heads.MultiTask({"a": heads.Regression()})(keras.Input((3, 4)))
    with pytest.raises(ValueError, match="known D"):
        heads.MultiLabel(2)(keras.Input((None,)))


# ---------------------------------------------------------------- label checks
@pytest.mark.parametrize(
    "head, labels, expected",
    [
        (heads.Regression(), np.zeros((4, 3)), r"\(batch, 1\) or \(batch,\).*\(4, 3\)"),
        (heads.Regression(2), np.zeros(4), r"\(batch, 2\).*\(4,\)"),
        (heads.Regression(2), np.zeros((4, 3)), r"\(batch, 2\).*\(4, 3\)"),
        (heads.MultiLabel(3), np.zeros(4), r"\(batch, 3\).*\(4,\)"),
        (heads.MultiLabel(3), np.zeros((4, 5)), r"\(batch, 3\).*\(4, 5\)"),
        (heads.Classification(2), np.eye(2), r"\(batch,\) or \(batch, 1\).*\(2, 2\).*argmax"),
        (heads.Classification(3), np.zeros((4, 1, 1)), r"\(batch,\) or \(batch, 1\)"),
    ],
)
def test_labels_of_the_wrong_shape_name_the_expected_shape(head, labels, expected):
    # keras would broadcast (batch, 3) targets against one regression output silently.
    with pytest.raises(ValueError, match=f"labels y for head '{head.name}'.*{expected}"):
        head.check_labels(labels)


def test_labels_of_the_right_shape_pass():
    heads.Regression().check_labels(np.zeros(4))
    heads.Regression().check_labels(np.zeros((4, 1)))
    heads.Regression(2).check_labels(np.zeros((4, 2)))
    heads.MultiLabel(1).check_labels(np.zeros(4))
    heads.MultiLabel(3).check_labels(np.zeros((4, 3)))
    heads.Classification(2).check_labels(np.array([[0], [1]]))
    heads.Classification(3).check_labels(np.array([0, 2]))


def test_multi_task_labels_need_one_entry_per_task():
    head = heads.MultiTask({"label": heads.Classification(3), "score": heads.Regression()})
    head.check_labels({"label": np.array([0, 2]), "score": np.ones(2)})
    with pytest.raises(ValueError, match=r"one entry per task.*\['lable', 'score'\]"):
        head.check_labels({"lable": np.array([0, 2]), "score": np.ones(2)})
    with pytest.raises(ValueError, match=r"one entry per task.*Received keys \['score'\]"):
        head.check_labels({"score": np.ones(2)})
    with pytest.raises(ValueError, match=r"dict task name -> labels.*shape \(2,\)"):
        head.check_labels(np.ones(2))
    with pytest.raises(ValueError, match=r"labels y\['score'\].*\(batch, 1\)"):
        head.check_labels({"label": np.array([0, 2]), "score": np.ones((2, 4))})
