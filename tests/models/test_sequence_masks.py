"""Float-sequence masks (`mask_value`), in-graph normalisation (`normalize`) and labels."""

import os

import keras
import numpy as np
import pytest

import kfusion as kf
from tests import helpers
from tests.conftest import requires_tensorflow

FUSIONS = ["concat", "weighted", "attention", "gated", "cross_attention", "low_rank", "film"]
LENGTH, FEATURES, PAD = 12, 3, 16


@pytest.fixture
def unequal(rng):
    """Sequences of 5..12 valid steps, right-padded with zeros to 12."""
    lengths = rng.integers(5, LENGTH + 1, size=8)
    lengths[0] = LENGTH
    x = rng.normal(1.0, 2.0, size=(8, LENGTH, FEATURES)).astype("float32")
    for i, n in enumerate(lengths):
        x[i, n:] = 0.0
    return x


def padded(x):
    return np.concatenate([x, np.zeros((len(x), PAD, x.shape[-1]), "float32")], axis=1)


def assert_padding_changes_nothing(model, x, atol=1e-5):
    before = helpers.as_numpy(model(x, training=False))
    after = helpers.as_numpy(model(padded(x), training=False))
    np.testing.assert_allclose(before, after, atol=atol, rtol=0)


def branches_for(fusion):
    pooling = None if fusion == "cross_attention" else "mean"
    made = [
        kf.branches.CNN(filters=(8,), kernel_size=3, pooling=pooling),
        kf.branches.RNN(units=8, pooling=pooling),
        kf.branches.Transformer(dim=8, depth=1, num_heads=2, pooling=pooling),
    ]
    return [made[0], made[2]] if fusion == "film" else made


def sequence_model(branches, fusion=None, **kwargs):
    return kf.FusionModel(
        inputs=keras.Input((None, FEATURES), name="signal"),
        branches=branches,
        fusion=fusion,
        head=kf.heads.Classification(3),
        **{"mask_value": 0.0, **kwargs},
    )


@pytest.mark.parametrize(
    "make_branch",
    [
        lambda: kf.branches.CNN(filters=(8, 8), kernel_size=5, residual=True, pooling="max"),
        lambda: kf.branches.CNN(filters=(8,), normalization="layer", pooling="last"),
        lambda: kf.branches.RNN(units=8, cell="lstm", pooling="last"),
        lambda: kf.branches.RNN(units=8, cell="gru", bidirectional=True, num_layers=2),
        lambda: kf.branches.Transformer(dim=8, depth=2, num_heads=2, pooling="cls"),
        lambda: kf.branches.Transformer(dim=8, depth=1, num_heads=2, pooling="max"),
    ],
    ids=["cnn", "cnn-layernorm", "lstm", "bigru", "transformer-cls", "transformer-max"],
)
def test_each_branch_alone_ignores_padding(unequal, make_branch):
    assert_padding_changes_nothing(sequence_model([make_branch()]), unequal)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_ignores_padding(unequal, fusion):
    assert_padding_changes_nothing(sequence_model(branches_for(fusion), fusion), unequal)


@pytest.mark.parametrize("normalize", ["series", "adapt"])
def test_normalized_inputs_ignore_padding(unequal, normalize):
    model = sequence_model(branches_for("gated"), "gated", normalize=normalize)
    if normalize == "adapt":
        model.adapt(unequal)
        layer = model.get_layer("signal_normalization")
        valid = unequal[np.any(unequal != 0.0, axis=-1)]
        np.testing.assert_allclose(layer.mean.numpy(), valid.mean(0), rtol=1e-5)
    assert_padding_changes_nothing(model, unequal)


def test_without_a_mask_value_padding_does_change_the_output(unequal):
    """The check above can fail: the same model without `mask_value` sees the zeros."""
    model = kf.FusionModel(
        inputs=keras.Input((None, FEATURES), name="signal"),
        branches=[kf.branches.RNN(units=8)],
        head=kf.heads.Classification(3),
    )
    with pytest.raises(AssertionError):
        assert_padding_changes_nothing(model, unequal)


def test_fit_adapts_on_the_training_rows_only(rng):
    x = rng.normal(10.0, 4.0, size=(40, LENGTH, FEATURES)).astype("float32")
    x[30:] += 100.0  # the validation rows: left out of the statistics
    y = np.arange(40) % 3
    model = sequence_model([kf.branches.CNN(filters=(8,))], normalize="adapt")
    model.compile(optimizer="adam")
    model.fit(x, y, validation_split=0.25, epochs=1, batch_size=10, verbose=0)
    mean = model.get_layer("signal_normalization").mean.numpy()
    np.testing.assert_allclose(mean, x[:30].reshape(-1, FEATURES).mean(0), rtol=1e-4)
    model.fit(x + 50.0, y, epochs=1, batch_size=10, verbose=0)  # adapted once, kept
    np.testing.assert_allclose(model.get_layer("signal_normalization").mean.numpy(), mean)


def test_masks_and_statistics_survive_keras_files_and_specs(unequal, tmp_path):
    model = sequence_model(branches_for("attention"), "attention", normalize="adapt")
    model.adapt(unequal)
    path = os.path.join(str(tmp_path), "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.mask_value == {"signal": 0.0} and loaded.normalize == {"signal": "adapt"}
    np.testing.assert_allclose(
        helpers.as_numpy(loaded(padded(unequal))), helpers.as_numpy(model(unequal)), atol=1e-5
    )
    spec = model.to_spec()
    assert spec["inputs"]["signal"]["mask_value"] == 0.0
    assert spec["inputs"]["signal"]["normalize"] == "adapt"
    rebuilt = kf.FusionModel.from_spec(spec)
    assert rebuilt.to_spec() == spec
    assert_padding_changes_nothing(rebuilt, unequal)


def _serve(fmt, path, x):
    if fmt == "saved_model":
        import tensorflow as tf

        served = tf.saved_model.load(path).signatures["serving_default"](signal=tf.constant(x))
        return next(iter(served.values())).numpy()
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@requires_tensorflow
@pytest.mark.parametrize("fmt", ["saved_model", "onnx", "litert"])
def test_exports_normalise_and_ignore_padding(unequal, tmp_path, fmt):
    from kfusion.export import export

    litert = fmt == "litert"  # LiteRT unrolls the RNN: it needs a fixed length
    model = kf.FusionModel(
        inputs=keras.Input((LENGTH + PAD if litert else None, FEATURES), name="signal"),
        branches=[kf.branches.CNN(filters=(8,)), kf.branches.RNN(units=8)],
        fusion="gated",
        head=kf.heads.Classification(3),
        mask_value=0.0,
        normalize="series",
    )
    target = os.path.join(
        str(tmp_path), {"saved_model": "sm", "onnx": "m.onnx"}.get(fmt, "m.tflite")
    )
    # export() reloads the artefact and compares it with the model on the padded probe.
    export(model, target, format=fmt, probe=padded(unequal))
    if not litert:  # the artefact itself, on another padding, answers as the model does
        np.testing.assert_allclose(
            _serve(fmt, target, padded(padded(unequal))),
            helpers.as_numpy(model(unequal)),
            atol=1e-4,
        )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask_value": "zero"}, "mask_value\\["),
        ({"mask_value": float("nan")}, "mask_value"),
        ({"mask_value": {"other": 0.0}}, "other"),
        ({"normalize": "zscore"}, "normalize"),
    ],
)
def test_bad_options_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sequence_model([kf.branches.CNN(filters=(8,))], **kwargs)


def test_options_that_fit_no_input_are_refused():
    inputs = {"x": keras.Input((5,), name="x"), "ids": keras.Input((6,), dtype="int32")}
    branches = {"x": [kf.branches.MLP(units=(4,))], "ids": [kf.branches.CNN(vocab_size=9)]}
    with pytest.raises(ValueError, match=r"mask_value.*float sequence"):
        kf.FusionModel(inputs=inputs, branches=branches, mask_value=0.0)
    with pytest.raises(ValueError, match=r"'series'.*'x'"):
        kf.FusionModel(inputs=inputs, branches=branches, normalize={"x": "series"})
    model = kf.FusionModel(inputs=inputs, branches=branches, normalize="adapt")
    assert model.normalize == {"x": "adapt"}  # token ids are never normalised


# ---------------------------------------------------------------------------------- labels
def test_string_labels_train_and_come_back_in_the_users_vocabulary():
    x, y = kf.datasets.sequence_classification(n=96, length=16, features=2)
    names = np.array(["low", "mid", "high"])
    model = kf.FusionModel(
        inputs=keras.Input((16, 2), name="signal"),
        branches=[kf.branches.CNN(filters=(16,), kernel_size=5)],
        head=kf.heads.Classification(labels=list(names)),
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(x, names[y], epochs=15, batch_size=16, verbose=0)
    predicted = model.predict_labels(x)
    assert predicted.dtype.kind == "U" and set(predicted) <= set(names)
    assert np.mean(predicted == names[y]) > 0.8
    _, accuracy = model.evaluate(x, names[y], verbose=0)
    assert accuracy == pytest.approx(np.mean(predicted == names[y]), abs=1e-6)
    with pytest.raises(ValueError, match="'top'"):
        model.fit(x[:4], np.array(["low", "top", "mid", "low"]), verbose=0)


def test_binary_heads_answer_class_ids_not_argmax_zero():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(128, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    model = kf.FusionModel(
        inputs=keras.Input((4,), name="x"),
        branches=[kf.branches.MLP(units=(8,))],
        head=kf.heads.Classification(labels=["no", "yes"]),
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-2))
    model.fit(x, y, epochs=10, batch_size=32, verbose=0)  # ids work too
    classes = model.predict_classes(x)
    assert model.predict(x, verbose=0).shape == (128, 1)
    assert set(np.unique(classes)) == {0, 1} and np.mean(classes == y) > 0.9
    np.testing.assert_array_equal(model.predict_labels(x), np.array(["no", "yes"])[classes])


def test_classification_labels_are_checked():
    with pytest.raises(ValueError, match="labels="):
        kf.heads.Classification(3, labels=["a", "b"])
    with pytest.raises(ValueError, match="labels="):
        kf.heads.Classification(labels=["a", "a"])
    with pytest.raises(ValueError, match="Classification head"):
        kf.FusionModel(
            inputs=keras.Input((4,)), branches=[kf.branches.MLP()], head=kf.heads.Regression()
        ).predict_classes(np.ones((2, 4), "float32"))
