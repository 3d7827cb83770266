import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion import export as kexport
from kfusion.datasets import multimodal_classification
from tests import helpers
from tests.conftest import requires_tensorflow

TF_FORMATS = ["saved_model", "onnx", "litert"]


def _model():
    return helpers.multimodal_model(fusion="gated", num_classes=3)


@pytest.fixture
def data():
    x, _ = multimodal_classification(n=4)
    return x


def test_keras_format_round_trips(tmp_path, data):
    model = _model()
    path = kexport.export(model, tmp_path / "m.keras", format="keras", probe=data)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(data, verbose=0), model.predict(data, verbose=0))


def _model_without_rnn():
    text = kf.branches.Transformer(dim=8, depth=1, num_heads=2, vocab_size=20)
    return helpers.multimodal_model(fusion="attention", num_classes=3, text=text)


@requires_tensorflow
@pytest.mark.parametrize("fmt", TF_FORMATS)
def test_tensorflow_formats_round_trip(tmp_path, data, fmt):
    model = _model() if fmt != "litert" else _model_without_rnn()
    name = {"saved_model": "saved", "onnx": "m.onnx", "litert": "m.tflite"}[fmt]
    path = kexport.export(model, tmp_path / name, format=fmt, probe=data)
    assert os.path.exists(path)
    # Only the export is left at the destination: no temporary files beside it.
    assert sorted(os.listdir(tmp_path)) == [name]


@requires_tensorflow
def test_saved_model_loads_without_kfusion(tmp_path, data):
    model = _model()
    path = kexport.export(model, tmp_path / "saved", probe=data)
    np.savez(tmp_path / "probe.npz", **data)
    np.save(tmp_path / "expected.npy", model.predict(data, verbose=0))
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["kfusion"] = None  # any import of kfusion now fails
        import numpy as np, tensorflow as tf
        try:
            import kfusion  # noqa: F401
            raise SystemExit("kfusion was importable")
        except ImportError:
            pass
        loaded = tf.saved_model.load({str(path)!r})
        sig = loaded.signatures["serving_default"]
        probe = dict(np.load({str(tmp_path / "probe.npz")!r}))
        out = sig(**{{k: tf.constant(v) for k, v in probe.items()}})
        got = list(out.values())[0].numpy()
        np.testing.assert_allclose(got, np.load({str(tmp_path / "expected.npy")!r}), atol=1e-5)
        print("OK")
        """
    )
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("OK")


def test_failed_export_leaves_earlier_export_intact(tmp_path, data, monkeypatch):
    model = _model()
    path = tmp_path / "m.keras"
    kexport.export(model, path, format="keras", probe=data)
    before = keras.saving.load_model(path, safe_mode=True).predict(data, verbose=0)

    other = _model()  # different weights

    def broken_writer(model, tmp, probe, atol, rtol):
        with open(tmp, "wb") as f:
            f.write(b"half written")
        raise OSError("disk full")

    monkeypatch.setitem(kexport._WRITERS, "keras", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        kexport.export(other, path, format="keras", probe=data)
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]
    after = keras.saving.load_model(path, safe_mode=True).predict(data, verbose=0)
    np.testing.assert_array_equal(before, after)


def test_verification_failure_raises_and_keeps_old(tmp_path, data, monkeypatch):
    model = _model()
    path = tmp_path / "m.keras"
    kexport.export(model, path, format="keras", probe=data)
    stamp = os.path.getmtime(path)

    def wrong(expected, got, atol, rtol, what):
        raise kexport.ExportVerificationError(f"{what}: differ")

    monkeypatch.setattr(kexport, "_compare", wrong)
    with pytest.raises(kexport.ExportVerificationError):
        kexport.export(_model(), path, format="keras", probe=data)
    assert os.path.getmtime(path) == stamp
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]


def test_unwritable_destination_is_a_clear_error(tmp_path, data):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError):
        kexport.export(_model(), blocker / "m.keras", format="keras", probe=data)
    assert blocker.read_text() == "not a folder"


def test_bad_format():
    with pytest.raises(ValueError, match="format='pickle'"):
        kexport.export(_model(), "x", format="pickle")


def test_probe_batch_matches_inputs():
    probe = kexport.probe_batch(_model(), batch_size=3)
    assert probe["image"].shape == (3, 8, 8, 1)
    assert probe["text"].dtype == np.int32 and probe["text"].min() >= 1


def _rnn_flags(model):
    return [
        layer.unroll
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.RNN)
    ]


@requires_tensorflow
def test_litert_unrolls_recurrent_branches_of_fixed_length(tmp_path, data):
    # The LSTM over 10 token ids converts to builtin ops only, and the export is verified
    # on a probe with padded rows (padding must not change the unrolled results).
    assert (data["text"] == 0).any()
    model = _model()
    path = kexport.export(model, tmp_path / "m.tflite", format="litert", probe=data)
    assert os.listdir(tmp_path) == ["m.tflite"] and os.path.getsize(path) > 0
    assert _rnn_flags(model) == [False]  # unrolled for the export's trace only


def _rnn_only_model(length, bidirectional, num_layers=1):
    branch = kf.branches.RNN(
        units=4, vocab_size=20, embedding_dim=4, bidirectional=bidirectional, num_layers=num_layers
    )
    return kf.FusionModel(
        inputs=keras.Input((length,), dtype="int32", name="text"),
        branches=[branch],
        head=kf.heads.Classification(3),
    )


@requires_tensorflow
@pytest.mark.parametrize(
    "length, bidirectional, num_layers",
    [(None, False, 1), (10, True, 2)],
    ids=["unknown length", "bidirectional returning sequences"],
)
def test_litert_refuses_recurrent_loops_it_cannot_unroll(
    tmp_path, data, length, bidirectional, num_layers
):
    # Unknown length: nothing to unroll over. A bidirectional layer that returns sequences:
    # keras' unrolled form is not padding-safe, so it stays a loop. Either way the loop
    # needs Select-TF ops, the export is refused and nothing is written.
    model = _rnn_only_model(length, bidirectional, num_layers)
    with pytest.raises(kexport.ExportVerificationError, match="Select TensorFlow ops"):
        kexport.export(model, tmp_path / "m.tflite", format="litert", probe=data["text"])
    assert os.listdir(tmp_path) == []
    assert not any(_rnn_flags(model))


def test_litert_unrolls_each_recurrent_layer_that_has_a_fixed_length():
    # One input of 5 steps, one of unknown length: only the first branch's LSTM is chosen
    # (before, one unknown length sent every RNN of the model back to a loop).
    model = kf.FusionModel(
        inputs={"signal": keras.Input((5, 3)), "text": keras.Input((None,), dtype="int32")},
        branches={
            "signal": [kf.branches.RNN(units=4, name="fixed")],
            "text": [kf.branches.RNN(units=4, vocab_size=9, cell="gru", name="open")],
        },
        head=kf.heads.Regression(),
    )
    chosen = kexport._unrollable_layers(model)
    assert [type(layer).__name__ for layer in chosen] == ["LSTM"]
    assert chosen[0] is model.get_layer("fixed").rnn_layers[0]


def _dense_model():
    i = keras.Input((3,), name="x")
    return keras.Model(i, keras.layers.Dense(2)(i))


def test_a_file_export_replaces_the_earlier_file_in_one_rename(tmp_path, monkeypatch):
    # Moving the earlier file aside first would leave nothing at `path` for a moment (and
    # after a crash there); one os.replace onto it never does.
    path = tmp_path / "m.keras"
    kexport.export(_dense_model(), path, format="keras")
    renames = []
    real_replace = os.replace

    def replace(src, dst):
        renames.append((os.fspath(src), os.fspath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(kexport.os, "replace", replace)
    kexport.export(_dense_model(), path, format="keras")
    assert len(renames) == 1 and renames[0][1] == str(path)
    assert sorted(os.listdir(tmp_path)) == ["m.keras"]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"path": None}, "path"),
        ({"path": ""}, "path"),
        ({"format": ["keras"]}, "format"),
        ({"atol": "tight"}, "atol"),
        ({"atol": -1.0}, "atol"),
        ({"rtol": float("nan")}, "rtol"),
        ({"model": "model.keras"}, "model"),
    ],
)
def test_export_bad_arguments(tmp_path, kwargs, name):
    args = {"model": _dense_model(), "path": tmp_path / "m.keras", "format": "keras", **kwargs}
    with pytest.raises(ValueError, match=f"Received: {name}="):
        kexport.export(**args)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "2"}, "batch_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_probe_batch_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"Received: {name}="):
        kexport.probe_batch(_dense_model(), **kwargs)
    with pytest.raises(ValueError, match="Received: model=None"):
        kexport.probe_batch(None)


def test_load_bad_path():
    with pytest.raises(ValueError, match="Received: path=None"):
        kexport.load(None)


@pytest.mark.parametrize(
    "inputs, name, bad",
    [
        ({"heart rate": keras.Input((3,))}, None, "heart rate"),
        ({"température": keras.Input((3,))}, None, "température"),
        ({"_x": keras.Input((3,))}, None, "_x"),
        ({"x": keras.Input((3,))}, "my model", "my model"),
    ],
)
def test_names_a_signature_cannot_carry_are_refused_when_the_model_is_built(inputs, name, bad):
    key = next(iter(inputs))
    with pytest.raises(ValueError, match="can't be used in a SavedModel") as info:
        kf.FusionModel(inputs=inputs, branches={key: [kf.branches.MLP((4,))]}, name=name)
    assert repr(bad) in str(info.value)
    assert repr(kexport.safe_signature_name(bad)) in str(info.value)  # the name to use


def test_names_that_signatures_carry_build_and_export(tmp_path):
    model = kf.FusionModel(
        inputs={"heart_rate": keras.Input((3,)), "a-b.c": keras.Input((2,))},
        branches={"heart_rate": [kf.branches.MLP((4,))], "a-b.c": [kf.branches.MLP((4,))]},
        name="model-1.v2",
    )
    kexport.export(model, tmp_path / "saved", format="saved_model")


@requires_tensorflow
def test_a_plain_keras_model_with_an_odd_name_is_one_line_and_nothing_is_written(tmp_path):
    i = keras.Input((3,), name="x")
    model = keras.Model(i, keras.layers.Dense(2)(i), name="my model")
    with pytest.raises(kexport.ExportError) as info:
        kexport.export(model, tmp_path / "saved", format="saved_model")
    message = str(info.value)
    assert "\n" not in message and "format='saved_model'" in message
    assert "'my model'" in message and "'my_model'" in message
    assert os.listdir(tmp_path) == []


def test_a_converter_failure_is_one_line_naming_the_format_and_layer(tmp_path, monkeypatch):
    model = _model()

    def fails(model, tmp, probe, atol, rtol, **options):
        raise TypeError(
            "Could not convert op 'fusion_model/gated_fusion_1/gate/MatMul':\n  long trace"
        )

    monkeypatch.setitem(kexport._WRITERS, "keras", fails)
    with pytest.raises(kexport.ExportError) as info:
        kexport.export(model, tmp_path / "m.keras", format="keras")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("format='keras'") and "'gated_fusion/gate'" in message
    assert "To do:" in message
    assert isinstance(info.value.__cause__, TypeError)
    assert os.listdir(tmp_path) == []


@requires_tensorflow
@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_parallel_scan_cells_export_to_litert_at_any_length(tmp_path, cell):
    # MinGRU / MinLSTM run as a parallel scan, not a recurrent loop: LiteRT takes them
    # with builtin ops at an unknown length, padding masks included (nothing to unroll).
    model = kf.FusionModel(
        inputs=keras.Input((None, 3), name="signal"),
        branches=[kf.branches.RNN(units=4, cell=cell, bidirectional=True)],
        head=kf.heads.Classification(3),
        mask_value=0.0,
    )
    probe = np.random.default_rng(0).normal(size=(3, 12, 3)).astype("float32")
    probe[1, 8:] = 0.0  # a padded row
    path = kexport.export(model, tmp_path / "m.tflite", format="litert", probe=probe)
    assert os.listdir(tmp_path) == ["m.tflite"] and os.path.getsize(path) > 0
