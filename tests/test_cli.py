import json
import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml

import kfusion as kf  # registers the classes .keras files name
from tests.conftest import requires_tensorflow

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", PYTHONUNBUFFERED="1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = requires_tensorflow  # the command's exports are TensorFlow formats


def kfusion(*args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "kfusion", *map(str, args)],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=timeout,
    )


def kfusion_here(capsys, *args):
    """Runs the command's `main` in this process (no interpreter start-up): for the error paths
    and the commands that follow a real `python -m kfusion` run."""
    from types import SimpleNamespace

    from kfusion.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("kfusion")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


SPEC = {
    "inputs": {"signal": {"shape": [12, 3], "dtype": "float32"}, "table": {"shape": [4]}},
    "branches": {
        "signal": [{"type": "CNN", "filters": [8], "name": "cnn"}],
        "table": [{"type": "MLP", "units": [8], "name": "mlp"}],
    },
    "fusion": "gated",
    "head": {"type": "Classification", "num_classes": 2},
    "optimizer": "adam",
    "learning_rate": 0.01,
    "epochs": 3,
    "batch_size": 32,
    "seed": 7,
}


def _data(path, n=256):
    rng = np.random.default_rng(0)
    signal_ = rng.normal(size=(n, 12, 3)).astype("float32")
    table = rng.normal(size=(n, 4)).astype("float32")
    y = ((signal_[:, :, 0].mean(1) * 3 + table[:, 0]) > 0).astype("int32")
    np.savez(path, signal=signal_, table=table, y=y)
    return path


@pytest.fixture
def spec_and_data(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    return spec, _data(tmp_path / "data.npz")


def test_demo_tiny_budget(tmp_path):
    out = tmp_path / "demo"
    result = kfusion("demo", "--epochs", 1, "--fusion", "gated", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("cnn_only", "rnn_only", "transformer_only", "fused_gated", "accuracy", "macro F1"):
        assert name in result.stdout
    assert "branch weights" in result.stdout and "ablation" in result.stdout
    assert "outputs equal" in result.stdout
    report = json.loads((out / "results.json").read_text())
    assert report["best"] == "fused_gated"
    assert set(report["models"]) == {"cnn_only", "rnn_only", "transformer_only", "fused_gated"}
    assert 0.0 <= report["models"]["fused_gated"]["accuracy"] <= 1.0
    # validated on a stratified tenth of the 1,437 training images, not on the test images
    assert report["validation_samples"] == 144
    assert 0.0 <= report["models"]["fused_gated"]["val_accuracy"] <= 1.0
    assert report["fresh_process_max_difference"] < 1e-4
    assert (out / "best_saved_model" / "saved_model.pb").exists()
    assert (out / "best.keras").exists() and (out / "training_curves.png").exists()
    loaded = keras.saving.load_model(out / "best.keras", safe_mode=True)
    assert loaded.output_shape == (None, 10)


def test_train_writes_model_and_metrics(spec_and_data, tmp_path, capsys):
    spec, data = spec_and_data
    out = tmp_path / "run"
    result = kfusion("train", spec, "--data", data, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == 3
    assert metrics["history"]["loss"][-1] < metrics["history"]["loss"][0]
    assert (out / "model.keras").exists() and (out / "saved_model" / "saved_model.pb").exists()
    assert (out / "checkpoints" / "last.keras").exists()

    info = kfusion_here(capsys, "inspect", out / "model.keras")
    assert info.returncode == 0, info.stderr
    for fragment in ("input  signal", "input  table", "fusion: gated", "signal -> cnn", "head:"):
        assert fragment in info.stdout
    info = kfusion_here(capsys, "inspect", out / "saved_model")
    assert info.returncode == 0 and "serving_default" in info.stdout

    for fmt, name in (("onnx", "m.onnx"), ("litert", "m.tflite"), ("saved_model", "sm")):
        result = kfusion_here(
            capsys, "export", out / "model.keras", "--format", fmt, "--out", tmp_path / name
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert (tmp_path / name).exists()


def test_train_resume_after_kill_matches_uninterrupted(tmp_path):
    spec = dict(SPEC, epochs=8, batch_size=16)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    data = _data(tmp_path / "data.npz", n=2048)

    full = kfusion("train", spec_path, "--data", data, "--out", tmp_path / "full", "--quiet")
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "interrupted"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kfusion", "train", spec_path, "--data", data, "--out", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
        cwd=ROOT,
    )
    try:
        for line in proc.stdout:
            if line.startswith("epoch 3 done"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (out / "model.keras").exists()

    resumed = kfusion("train", spec_path, "--data", data, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "epoch 1 done" not in resumed.stdout  # it continued, it did not start over
    assert "epoch 8 done" in resumed.stdout
    a = keras.saving.load_model(tmp_path / "full" / "model.keras", safe_mode=True)
    b = keras.saving.load_model(out / "model.keras", safe_mode=True)
    for wa, wb in zip(a.get_weights(), b.get_weights()):
        np.testing.assert_allclose(wa, wb, atol=1e-6)


# ----------------------------------------------------------------------------- errors
def test_missing_spec_file(tmp_path, capsys):
    assert_user_error(
        kfusion_here(capsys, "train", tmp_path / "nope.yaml", "--data", "x.npz"), "not found"
    )


def test_malformed_yaml(tmp_path, spec_and_data, capsys):
    _, data = spec_and_data
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [unclosed\n  - : :")
    assert_user_error(
        kfusion_here(capsys, "train", bad, "--data", data, "--out", tmp_path / "o"), "YAML"
    )
    assert not (tmp_path / "o").exists()


def test_unknown_key_suggests_closest(tmp_path, spec_and_data, capsys):
    _, data = spec_and_data
    spec = tmp_path / "typo.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "epocs": 3}))
    result = kfusion_here(capsys, "train", spec, "--data", data, "--out", tmp_path / "o")
    assert_user_error(result, "'epocs'", "'epochs'")
    assert not (tmp_path / "o").exists()


def test_data_names_and_shapes_must_match(tmp_path, spec_and_data, capsys):
    spec, _ = spec_and_data
    wrong_name = tmp_path / "names.npz"
    np.savez(wrong_name, sig=np.zeros((4, 12, 3)), table=np.zeros((4, 4)), y=np.zeros(4))
    assert_user_error(
        kfusion_here(capsys, "train", spec, "--data", wrong_name, "--out", tmp_path / "o"), "signal"
    )
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, signal=np.zeros((4, 10, 3)), table=np.zeros((4, 4)), y=np.zeros(4))
    result = kfusion_here(capsys, "train", spec, "--data", wrong_shape, "--out", tmp_path / "o")
    assert_user_error(result, "'signal'", "(None, 12, 3)")
    wrong_label = tmp_path / "labels.npz"
    np.savez(wrong_label, signal=np.zeros((4, 12, 3)), table=np.zeros((4, 4)), y=np.arange(4) + 1)
    result = kfusion_here(capsys, "train", spec, "--data", wrong_label, "--out", tmp_path / "o")
    assert_user_error(result, "labels y", "[0, 1]", "from 1 to 4")
    assert not (tmp_path / "o").exists()


def test_unwritable_output_folder(tmp_path, spec_and_data, capsys):
    spec, data = spec_and_data
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = kfusion_here(capsys, "train", spec, "--data", data, "--out", blocker / "run")
    assert_user_error(result, "cannot write")
    assert blocker.read_text() == "keep me"


def test_inspect_and_export_missing_model(tmp_path, capsys):
    assert_user_error(kfusion_here(capsys, "inspect", tmp_path / "none.keras"), "not found")
    result = kfusion_here(
        capsys, "export", tmp_path / "none.keras", "--format", "onnx", "--out", tmp_path / "x"
    )
    assert_user_error(result, "not found")


def test_train_on_csv(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.normal(size=(200, 3))
    label = (table[:, 0] - table[:, 2] > 0).astype(int)
    lines = ["a,b,c,label"] + [f"{r[0]},{r[1]},{r[2]},{y}" for r, y in zip(table, label)]
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    spec = {
        "inputs": {"table": {"shape": [3]}},
        "branches": [{"type": "MLP", "units": [16]}, {"type": "MLP", "units": [8]}],
        "fusion": "concat",
        "head": {"type": "Classification", "num_classes": 2},
        "label": "label",
        "epochs": 30,
        "learning_rate": 0.02,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = kfusion(
        "train", tmp_path / "spec.yaml", "--data", tmp_path / "data.csv", "--out", tmp_path / "o"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert metrics["history"]["accuracy"][-1] > 0.9  # a linear rule on the columns


def test_train_validates_on_a_stratified_split(tmp_path, capsys, monkeypatch):
    # Rows sorted by class, as in the UCR/UEA training files: keras' validation_split would
    # validate on the last rows, all of class 2.
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40).astype("int32")
    signal_ = rng.normal(size=(120, 12, 3)).astype("float32")
    signal_[:, :, 0] += y[:, None]
    np.savez(tmp_path / "sorted.npz", signal=signal_, y=y)
    spec = {
        "inputs": {"signal": {"shape": [12, 3]}},
        "branches": [{"type": "CNN", "filters": [8], "name": "cnn"}],
        "head": {"type": "Classification", "num_classes": 3},
        "epochs": 2,
        "batch_size": 30,
        "validation_split": 0.25,
        "seed": 3,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    calls = []
    fit = kf.FusionModel.fit

    def spy(self, x=None, y=None, **kwargs):
        calls.append((y, kwargs))
        return fit(self, x, y, **kwargs)

    monkeypatch.setattr(kf.FusionModel, "fit", spy)
    args = ("train", tmp_path / "spec.yaml", "--data", tmp_path / "sorted.npz", "--quiet")
    result = kfusion_here(capsys, *args, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(calls) == 1
    y_fit, kwargs = calls[0]
    x_val, y_val = kwargs["validation_data"]
    assert not kwargs.get("validation_split")
    assert np.bincount(y_val).tolist() == [10, 10, 10] and x_val.shape == (30, 12, 3)
    assert np.bincount(y_fit).tolist() == [30, 30, 30]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["validation"] == {"samples": 30, "seed": 3, "stratified": True}
    assert len(metrics["history"]["val_loss"]) == 2 and "loss" in metrics["history"]

    # the same seed gives the same validation rows (a resumed run validates on them too)
    result = kfusion_here(capsys, *args, "--out", tmp_path / "again")
    assert result.returncode == 0, result.stderr[-2000:]
    np.testing.assert_array_equal(calls[1][1]["validation_data"][0], x_val)


def test_train_with_the_small_data_recipe(tmp_path, capsys):
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(2), 40).astype("int32")
    signal_ = rng.normal(size=(80, 12, 3)).astype("float32")
    signal_[:, :, 0] += 2.0 * y[:, None]
    np.savez(tmp_path / "d.npz", signal=signal_, y=y)
    spec = {
        "inputs": {"signal": {"shape": [12, 3], "normalize": "adapt"}},
        "branches": [{"type": "CNN", "filters": [8], "name": "cnn"}],
        "head": {"type": "Classification", "num_classes": 2},
        "recipe": {"name": "small_data", "max_epochs": 12, "patience": 4},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    args = ("train", tmp_path / "spec.yaml", "--data", tmp_path / "d.npz", "--quiet")
    result = kfusion_here(capsys, *args, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # a stratified fifth validates; batch size by data size (64 rows -> 8); the best
    # validation loss's weights are the ones exported
    assert metrics["validation"]["samples"] == 16 and metrics["validation"]["stratified"]
    assert metrics["recipe"] == {
        "name": "small_data",
        "max_epochs": 12,
        "patience": 4,
        "batch_size": 8,
    }
    val_loss = metrics["history"]["val_loss"]
    assert 1 <= len(val_loss) <= 12 and "learning_rate" in metrics["history"]
    model = keras.saving.load_model(tmp_path / "run" / "model.keras", safe_mode=True)
    (_, _), (x_val, y_val) = kf.datasets.train_validation_split(signal_, y, 0.2, seed=0)
    loss = model.evaluate(x_val, y_val, verbose=0, return_dict=True)["loss"]
    assert loss == pytest.approx(min(val_loss), rel=1e-3)
    for recipe, fragment in (
        ("fast", "'recipe' must name one of ['small_data']"),
        ({"name": "small_data", "epochs": 3}, "unknown recipe option 'epochs'"),
        ({"name": "small_data", "patience": 1}, "recipe 'patience' must be an integer >= 4"),
    ):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "recipe": recipe}))
        bad = ("train", tmp_path / "bad.yaml", "--data", tmp_path / "d.npz")
        assert_user_error(kfusion_here(capsys, *bad, "--out", tmp_path / "o"), fragment)


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ({"epochs": "ten"}, "'epochs' must be an integer >= 1; got epochs='ten'"),
        ({"epochs": 0}, "'epochs' must be an integer >= 1; got epochs=0"),
        ({"batch_size": 2.5}, "'batch_size' must be an integer >= 1"),
        ({"seed": "abc"}, "'seed' must be an integer >= 0"),
        ({"validation_split": 1.5}, "'validation_split' must be a number in [0, 1)"),
        ({"learning_rate": "fast"}, "'learning_rate' must be a number > 0"),
        ({"label": ["y"]}, "'label' must be the name"),
        ({"metrics": "accuracy"}, "'metrics' must be a list of metric names"),
        ({"loss": "nonexistent_loss"}, "'loss' names 'nonexistent_loss'"),
        ({"metrics": ["accuracy", "nonexistent_metric"]}, "'metrics' names 'nonexistent_metric'"),
        (
            {"inputs": {"signal": [12, 3], "table": {"shape": [4]}}},
            "Input 'signal' needs a 'shape'",
        ),
    ],
)
def test_ill_typed_settings_are_one_line_errors(tmp_path, spec_and_data, capsys, setting, fragment):
    _, data = spec_and_data
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, **setting}))
    result = kfusion_here(capsys, "train", spec, "--data", data, "--out", tmp_path / "o")
    assert_user_error(result, fragment)
    assert not (tmp_path / "o").exists()


def test_numbers_yaml_reads_as_strings_are_accepted(tmp_path):
    from kfusion import cli

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC) + "learning_rate: 1e-3\nvalidation_split: 0.25\n")
    _, train = cli._load_train_spec(str(spec))
    assert train["learning_rate"] == 0.001 and train["validation_split"] == 0.25
    assert train["epochs"] == 3 and isinstance(train["epochs"], int)


@pytest.fixture
def small_keras_model(tmp_path):
    model = kf.FusionModel(
        inputs=keras.Input((4,), name="x"), branches=[kf.branches.MLP(units=(4,))]
    )
    path = tmp_path / "model.keras"
    model.save(path)
    return model, path


def test_export_refusals_are_one_line_errors(tmp_path, small_keras_model, capsys):
    model, path = small_keras_model
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep").write_text("keep me")
    result = kfusion_here(capsys, "export", path, "--format", "onnx", "--out", folder)
    assert_user_error(result, "is a folder")
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = kfusion_here(capsys, "export", path, "--format", "saved_model", "--out", blocker)
    assert_user_error(result, "exists and is not a folder")
    weights = model.get_weights()
    weights[0][0, 0] = np.nan
    model.set_weights(weights)
    model.save(tmp_path / "nan.keras")
    result = kfusion_here(
        capsys, "export", tmp_path / "nan.keras", "--format", "keras", "--out", tmp_path / "o.keras"
    )
    assert_user_error(result, "NaN or inf")
    assert (folder / "keep").read_text() == "keep me" and blocker.read_text() == "keep me"
    assert not (tmp_path / "o.keras").exists()


def test_train_refuses_an_export_destination_before_training(spec_and_data, tmp_path, capsys):
    # out/saved_model holds something that is not a SavedModel: the export at the end would
    # refuse to replace it, so the command says so before it spends time training.
    spec, data = spec_and_data
    out = tmp_path / "run"
    (out / "saved_model").mkdir(parents=True)
    (out / "saved_model" / "notes.txt").write_text("keep me")
    result = kfusion_here(capsys, "train", spec, "--data", data, "--out", out, "--quiet")
    assert_user_error(result, "saved_model", "not a SavedModel")
    assert (out / "saved_model" / "notes.txt").read_text() == "keep me"
    assert not (out / "checkpoints").exists()  # no epoch ran


def test_inspect_damaged_saved_model(tmp_path, capsys):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"not a protobuf")
    assert_user_error(kfusion_here(capsys, "inspect", tmp_path / "sm"), "cannot load")


def test_checkpoint_that_fails_to_save_keeps_the_last_one(tmp_path, small_keras_model):
    from kfusion import cli

    model, _ = small_keras_model
    path = tmp_path / "checkpoints" / "last.keras"
    path.parent.mkdir()
    checkpoint = cli._Checkpoint(str(path))
    checkpoint.set_model(model)
    checkpoint.on_epoch_end(0)
    before = path.read_bytes()

    def broken_save(filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half written")
        raise OSError("disk full")

    model.save = broken_save
    with pytest.raises(OSError, match="disk full"):
        checkpoint.on_epoch_end(1)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == ["last.keras"]


def test_help_describes_every_argument():
    from kfusion.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"kfusion {name}: {action.dest} has no help"
