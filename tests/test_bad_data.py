"""Bad data at fit/evaluate/predict time, and the NaN guard (StopOnNaN, export, CLI)."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml

import kfusion as kf
from kfusion import export as kexport
from tests.conftest import requires_tensorflow

VOCAB = 20


def _model(max_length=16):
    return kf.FusionModel(
        inputs={
            "signal": keras.Input((6, 3)),
            "text": keras.Input((None,), dtype="int32"),
            "table": keras.Input((4,)),
        },
        branches={
            "signal": [kf.branches.CNN(filters=(4,), name="cnn")],
            "text": [
                kf.branches.Transformer(
                    dim=4, depth=1, num_heads=2, vocab_size=VOCAB, max_length=max_length, name="tr"
                )
            ],
            "table": [kf.branches.MLP(units=(4,), name="mlp")],
        },
        fusion="concat",
        head=kf.heads.Classification(3),
    )


def _data(n=8, length=5, seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "signal": rng.normal(size=(n, 6, 3)).astype("float32"),
        "text": rng.integers(1, VOCAB, size=(n, length)).astype("int32"),
        "table": rng.normal(size=(n, 4)).astype("float32"),
    }
    return x, rng.integers(0, 3, size=n).astype("int32")


@pytest.fixture(scope="module")
def compiled():
    model = _model(max_length=8)
    model.compile(optimizer="adam")
    return model


def _call(model, method, x, y):
    if method == "fit":
        return model.fit(x, y, epochs=1, verbose=0)
    if method == "evaluate":
        return model.evaluate(x, y, verbose=0)
    return model.predict(x, verbose=0)


# Each case: what is wrong with the data, and the fragments the message must hold.
BAD_DATA = {
    "missing input": (
        lambda x: {k: v for k, v in x.items() if k != "table"},
        ["'table'", "(None, 4)"],
    ),
    "unknown input": (
        lambda x: {"signal": x["signal"], "txt": x["text"], "table": x["table"]},
        ["'txt'", "'text'"],
    ),
    "wrong feature size": (
        lambda x: dict(x, signal=x["signal"][:, :, :2]),
        ["'signal'", "(None, 6, 3)"],
    ),
    "wrong length": (lambda x: dict(x, signal=x["signal"][:, :4]), ["'signal'", "(None, 6, 3)"]),
    "wrong rank": (lambda x: dict(x, table=x["table"][:, :, None]), ["'table'", "(None, 4)"]),
    "float token ids": (
        lambda x: dict(x, text=x["text"].astype("float32")),
        ["'text'", "integer token ids", "(None, None)"],
    ),
    "strings": (lambda x: dict(x, table=x["table"].astype(str)), ["'table'", "(None, 4)"]),
    "objects": (lambda x: dict(x, table=x["table"].astype(object)), ["'table'", "(None, 4)"]),
    "token id too large": (
        lambda x: dict(x, text=np.where(x["text"] == x["text"][0, 0], VOCAB, x["text"])),
        ["'text'", f"token id {VOCAB}", f"vocab_size={VOCAB}", "'tr'"],
    ),
    "negative token id": (
        lambda x: dict(x, text=-x["text"]),
        ["'text'", "token id -", f"vocab_size={VOCAB}"],
    ),
    "longer than max_length": (
        lambda x: dict(x, text=np.ones((8, 9), "int32")),
        ["'text'", "9 steps", "max_length=8", "'tr'"],
    ),
    "row counts differ": (lambda x: dict(x, table=x["table"][:5]), ["'table'", "5 rows", "8 rows"]),
    "not an array": (lambda x: dict(x, table="table.csv"), ["'table'", "(None, 4)"]),
    "a list, not a dict": (lambda x: [x["signal"], x["text"]], ["'table'", "dict"]),
}


@pytest.mark.parametrize("method", ["fit", "evaluate", "predict"])
@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_names_the_input_and_the_expected_shape(compiled, case, method):
    corrupt, fragments = BAD_DATA[case]
    x, y = _data()
    with pytest.raises(ValueError) as info:
        _call(compiled, method, corrupt(x), y)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("bad_id", [VOCAB, -1])
def test_token_ids_are_range_checked_in_backend_tensors(compiled, bad_id):
    # Out-of-range ids in a backend tensor used to pass: TensorFlow then failed in its
    # gather kernel, JAX silently read a clamped row of the embedding table.
    x, y = _data()
    text = x["text"].copy()
    text[3, 2] = bad_id
    x = {k: keras.ops.convert_to_tensor(v) for k, v in dict(x, text=text).items()}
    with pytest.raises(ValueError, match=f"token id {bad_id}, outside \\[0, {VOCAB}\\)"):
        compiled.check_data(x)
    with pytest.raises(ValueError, match=f"vocab_size={VOCAB}"):
        compiled.predict(x, verbose=0)


def test_a_model_stays_usable_after_bad_data(compiled):
    # The checks run before keras touches the data: a refused batch leaves no broken
    # predict function behind (JAX's trainer would keep a failed one).
    x, _ = _data()
    with pytest.raises(ValueError, match="max_length"):
        compiled.predict(dict(x, text=np.ones((8, 9), "int32")), verbose=0)
    assert compiled.predict(x, verbose=0).shape == (8, 3)


def test_good_data_in_every_accepted_form_passes(compiled):
    x, _ = _data()
    compiled.check_data(x)
    compiled.check_data([x["signal"], x["text"], x["table"]])  # a list in input order
    compiled.check_data({k: keras.ops.convert_to_tensor(v) for k, v in x.items()})
    compiled.check_data(dict(x, text=x["text"].astype("int64"), table=x["table"] > 0))
    padded = dict(x, text=np.concatenate([x["text"], np.zeros((8, 3), "int32")], axis=1))
    compiled.check_data(padded)  # 8 steps = max_length, id 0 is padding
    assert compiled.predict(padded, verbose=0).shape == (8, 3)


def test_single_input_model_data_errors():
    model = kf.FusionModel(
        inputs=keras.Input((6, 3), name="signal"),
        branches=[kf.branches.RNN(units=4)],
        head=kf.heads.Regression(),
    )
    x = np.zeros((4, 6, 3), "float32")
    model.check_data(x)
    model.check_data([x])
    model.check_data({"signal": x})
    with pytest.raises(ValueError, match="one input 'signal' of shape \\(None, 6, 3\\).*'sig'"):
        model.predict({"sig": x}, verbose=0)
    with pytest.raises(ValueError, match="one input 'signal'.*list of 2 arrays"):
        model.predict([x, x], verbose=0)
    with pytest.raises(ValueError, match="'signal' expects arrays of shape \\(None, 6, 3\\)"):
        model.predict(x[0], verbose=0)
    with pytest.raises(ValueError, match="'signal'.*could not be read as one array"):
        model.predict([[[0.0] * 3] * 6, [[0.0] * 3] * 5], verbose=0)


# ---------------------------------------------------------------------------- labels
def _first_row(y, value):
    y = y.astype("float32")
    y[0] = value
    return y


# Each case: how the labels are wrong, and the fragments the message must hold.
BAD_LABELS = {
    "class id too large": (lambda y: _first_row(y, 3), ["num_classes=3", "[0, 3)", "to 3"]),
    "negative class id": (lambda y: _first_row(y, -1), ["[0, 3)", "from -1"]),
    "fractional class id": (lambda y: _first_row(y, 0.5), ["whole class ids"]),
    "one-hot labels": (lambda y: np.eye(3)[y], ["(batch,)", "(8, 3)", "argmax"]),
    "NaN label": (lambda y: _first_row(y, np.nan), ["finite", "1 of 8"]),
    "strings": (lambda y: y.astype(str), ["must be numbers", "(8,)"]),
}


@pytest.mark.parametrize("method", ["fit", "evaluate"])
@pytest.mark.parametrize("case", sorted(BAD_LABELS))
def test_bad_labels_name_the_head_and_the_expected_values(compiled, case, method):
    corrupt, fragments = BAD_LABELS[case]
    x, y = _data()
    with pytest.raises(ValueError) as info:
        _call(compiled, method, x, corrupt(y))
    message = str(info.value)
    for fragment in ["labels y", f"'{compiled.head.name}'", *fragments]:
        assert fragment in message, message


def test_label_checks_of_every_head():
    binary = kf.heads.Classification(2, name="binary")
    binary.check_labels(np.array([0, 1, 1]))
    binary.check_labels([[0.2], [0.9]])  # soft targets
    with pytest.raises(ValueError, match=r"'binary' \(Classification\).*\[0, 1\].*to 2"):
        binary.check_labels(np.array([0, 2]))
    tags = kf.heads.MultiLabel(4, name="tags")
    tags.check_labels(np.eye(4))
    with pytest.raises(ValueError, match=r"'tags' \(MultiLabel\).*from -1"):
        tags.check_labels(-np.eye(4))
    kf.heads.Regression().check_labels(np.array([-3.0, 1e6]))
    with pytest.raises(ValueError, match="finite; 1 of 2"):
        kf.heads.Regression().check_labels(np.array([1.0, np.inf]))
    multi = kf.heads.MultiTask(
        {"label": kf.heads.Classification(3), "score": kf.heads.Regression()}
    )
    multi.check_labels({"label": np.array([0, 2]), "score": np.ones((2, 1))})
    with pytest.raises(ValueError, match=r"labels y\['label'\].*\[0, 3\)"):
        multi.check_labels({"label": np.array([0, 5]), "score": np.ones((2, 1))})


def test_labels_are_checked_after_loading_and_with_the_heads_loss_given_again(compiled, tmp_path):
    # A `.keras` file restores the head's loss object; it is still the head's contract.
    x, y = _data()
    path = tmp_path / "model.keras"
    compiled.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    bad = _first_row(y, 3)
    with pytest.raises(ValueError, match=r"labels y.*\[0, 3\)"):
        reloaded.fit(x, bad, epochs=1, verbose=0)
    model = _model()
    model.compile(optimizer="adam", loss=model.head.default_loss())
    with pytest.raises(ValueError, match=r"labels y.*\[0, 3\)"):
        model.evaluate(x, bad, verbose=0)
    # A loss configured differently (here: it ignores class 2) is the user's own contract.
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=2))
    model.evaluate(x, y, verbose=0)
    assert not model._check_labels


class _LossWithoutConfig(keras.losses.SparseCategoricalCrossentropy):
    def get_config(self):
        raise NotImplementedError("no config")


def test_compile_takes_any_loss_keras_takes():
    # Deciding whether labels feed the head's loss must never reject a loss keras accepts:
    # a lambda whose source can't be read (made by eval, as in a REPL) and a loss whose
    # get_config raises both compile and train, without the head's label checks.
    x, y = _data()
    for loss in (
        eval("lambda y_true, y_pred: keras.ops.mean(y_pred)"),  # noqa: S307 - no source file
        _LossWithoutConfig(),
    ):
        model = _model()
        model.compile(optimizer="adam", loss=loss)
        assert not model._check_labels
        assert np.isfinite(model.fit(x, y, epochs=1, verbose=0).history["loss"][0])


def test_multitask_labels_are_checked_with_its_loss_dict_given_again():
    head = kf.heads.MultiTask({"label": kf.heads.Classification(3), "score": kf.heads.Regression()})
    model = kf.FusionModel(
        inputs=keras.Input((4,), name="x"), branches=[kf.branches.MLP(units=(4,))], head=head
    )
    model.compile(optimizer="adam", loss=head.default_loss())
    assert model._check_labels
    x = np.ones((4, 4), "float32")
    with pytest.raises(ValueError, match=r"labels y\['label'\].*\[0, 3\)"):
        model.fit(x, {"label": np.array([0, 1, 2, 3]), "score": np.ones((4, 1))}, verbose=0)
    model.compile(
        optimizer="adam", loss={"label": "sparse_categorical_crossentropy", "score": "mse"}
    )
    assert not model._check_labels


def test_labels_for_a_loss_of_ones_own_are_left_to_it():
    # With an explicit loss the head's label contract does not apply: one-hot labels for
    # categorical cross-entropy train.
    x, y = _data()
    model = _model()
    model.compile(optimizer="adam", loss="categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, np.eye(3)[y], epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


# ---------------------------------------------------------------------------- NaN guard
def _vector_model():
    return kf.FusionModel(
        inputs=keras.Input((4,), name="x"),
        branches=[kf.branches.MLP(units=(8,), name="mlp")],
        head=kf.heads.Regression(name="regression"),
    )


def _vectors(n=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4)).astype("float32")
    return x, x.sum(axis=1, keepdims=True)


def _nan_learning_rate_from_epoch_2(epoch, lr):
    return 0.01 if epoch == 0 else float("nan")


def _all_finite(model):
    return all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.parametrize("batch_size", [4, 16], ids=["4_batches", "1_batch"])
def test_stop_on_nan_keeps_the_last_good_checkpoint(tmp_path, batch_size):
    # Epoch 1 trains normally; from epoch 2 the learning rate is NaN, so the first step of
    # epoch 2 makes every weight NaN. With 4 batches the next batch's loss is NaN; with a
    # single batch the loss of that step is still finite and the weight check at the end
    # of the epoch catches it. Either way fit raises before ModelCheckpoint's on_epoch_end.
    x, y = _vectors()
    model = _vector_model()
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    path = tmp_path / "last.keras"
    saved = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved.append([np.array(w) for w in self.model.get_weights()])

    callbacks = [
        kf.callbacks.StopOnNaN(),
        keras.callbacks.LearningRateScheduler(_nan_learning_rate_from_epoch_2),
        keras.callbacks.ModelCheckpoint(path),
        Record(),
    ]
    expected = "loss is nan" if batch_size == 4 else "holds NaN or inf"
    with pytest.raises(FloatingPointError, match=f"epoch 2.*{expected}") as info:
        model.fit(x, y, batch_size=batch_size, epochs=3, verbose=0, callbacks=callbacks)
    if batch_size == 4:
        assert "at batch 2" in str(info.value)
    else:
        assert "'mlp/" in str(info.value) or "'regression/" in str(info.value)
    assert len(saved) == 1  # only epoch 1 reached on_epoch_end
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert _all_finite(loaded)
    for got, want in zip(loaded.get_weights(), saved[0]):
        np.testing.assert_array_equal(got, want)


def test_stop_on_nan_from_a_nan_label_and_its_arguments():
    x, y = _vectors()
    y[-1] = np.nan
    model = _vector_model()
    model.compile(optimizer="sgd", loss="mse")  # the head's own loss would refuse NaN labels
    with pytest.raises(FloatingPointError, match="epoch 1 at batch 4: loss is nan"):
        model.fit(
            x, y, batch_size=4, shuffle=False, verbose=0, callbacks=[kf.callbacks.StopOnNaN()]
        )
    with pytest.raises(ValueError, match="monitor=''"):
        kf.callbacks.StopOnNaN(monitor="")
    with pytest.raises(ValueError, match="check_weights='yes'"):
        kf.callbacks.StopOnNaN(check_weights="yes")


def test_stop_on_nan_watches_a_validation_value_at_the_epoch_end():
    # "val_loss" is logged once per epoch, never per batch: it is checked at the epoch end.
    x, y = _vectors()
    y_val = y.copy()
    y_val[0] = np.nan
    model = _vector_model()
    model.compile(optimizer="sgd", loss="mse")
    saved = []

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            saved.append(epoch)

    with pytest.raises(FloatingPointError, match="end of epoch 1: val_loss is nan"):
        model.fit(
            x,
            y,
            validation_data=(x, y_val),
            epochs=2,
            verbose=0,
            callbacks=[kf.callbacks.StopOnNaN(monitor="val_loss"), Record()],
        )
    assert saved == []  # raised before the callbacks listed after it


def test_stop_on_nan_lets_finite_training_finish():
    x, y = _vectors()
    model = _vector_model()
    model.compile(optimizer="adam", run_eagerly=True)
    history = model.fit(
        x, y, batch_size=4, epochs=2, verbose=0, callbacks=[kf.callbacks.StopOnNaN()]
    )
    assert len(history.history["loss"]) == 2


def _poison(model):
    weights = model.get_weights()
    weights[0] = np.full_like(weights[0], np.nan)
    model.set_weights(weights)


@pytest.mark.parametrize("fmt", ["keras", "saved_model"])
def test_export_refuses_non_finite_weights_and_keeps_the_earlier_export(tmp_path, fmt):
    if fmt == "saved_model" and keras.config.backend() == "torch":
        pytest.skip("SavedModel export needs the TensorFlow or JAX backend")
    x, _ = _vectors(4)
    model = _vector_model()
    path = tmp_path / ("m.keras" if fmt == "keras" else "saved")
    kexport.export(model, path, format=fmt, probe=x)
    listing = sorted(os.listdir(tmp_path))
    diverged = _vector_model()
    _poison(diverged)
    with pytest.raises(ValueError, match="NaN or inf values in weight 'mlp/"):
        kexport.export(diverged, path, format=fmt, probe=x)
    assert sorted(os.listdir(tmp_path)) == listing
    if fmt == "keras":
        loaded = keras.saving.load_model(path, safe_mode=True)
        np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    else:
        import tensorflow as tf

        reloaded = tf.saved_model.load(str(path))
        got = reloaded.serve(x)
        np.testing.assert_allclose(np.asarray(got), model.predict(x, verbose=0), atol=1e-5)


@requires_tensorflow
def test_cli_train_stops_on_nan_and_keeps_earlier_files(tmp_path):
    # An earlier run's model.keras and checkpoint sit in the output folder; a run whose
    # loss turns NaN must fail with one clear line and leave both as they were.
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    earlier = _vector_model()
    earlier.save(out / "model.keras")
    earlier.save(out / "checkpoints" / "last.keras")
    before = {p: (out / p).read_bytes() for p in ("model.keras", "checkpoints/last.keras")}
    x, y = _vectors(64)
    y[40] = np.nan
    np.savez(tmp_path / "data.npz", x=x, y=y)
    spec = {
        "inputs": {"x": {"shape": [4]}},
        "branches": [{"type": "MLP", "units": [8]}],
        "head": {"type": "Regression"},
        "epochs": 2,
        "batch_size": 8,
        "loss": "mse",  # the head's own loss would refuse the NaN label before training
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [sys.executable, "-m", "kfusion", "train", str(tmp_path / "spec.yaml")]
        + ["--data", str(tmp_path / "data.npz"), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("kfusion")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "training diverged" in lines[0] and "epoch 1 at batch 6: loss is nan" in lines[0]
    assert not (out / "saved_model").exists() and not (out / "metrics.json").exists()
    for name, content in before.items():
        assert (out / name).read_bytes() == content, f"{name} was rewritten"
    assert _all_finite(keras.saving.load_model(out / "model.keras", safe_mode=True))
