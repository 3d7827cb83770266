"""`kfusion train`: training, resuming, validation, recipes, checkpoints."""

import json
import os
import re
import signal
import stat
import subprocess
import sys

import keras
import numpy as np
import pytest
import yaml

import kfusion as kf
from kfusion import export as kexport
from kfusion.cli.train import _Checkpoint
from tests.cli.commands import (
    ENV,
    QUIET_ENV,
    ROOT,
    SPEC,
    assert_user_error,
    make_data,
    run_command,
    run_here,
)
from tests.conftest import requires_tensorflow

pytestmark = requires_tensorflow  # the command's exports are TensorFlow formats


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_train_writes_model_and_metrics(spec_and_data, tmp_path, capsys):
    spec, data = spec_and_data
    out = tmp_path / "run"
    # Without TF_CPP_MIN_LOG_LEVEL set (as a user runs it): none of TensorFlow's start-up log.
    result = run_command("train", spec, "--data", data, "--out", out, env=QUIET_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not re.search(r"^([IWEF]\d{4} |WARNING: All log messages)", result.stderr, re.M)
    assert "oneDNN" not in result.stderr and "cuda" not in result.stderr.lower()
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == 3
    assert _mode(out / "metrics.json") == _mode(out / "model.keras")  # not mkstemp's 0600
    assert metrics["history"]["loss"][-1] < metrics["history"]["loss"][0]
    assert (out / "model.keras").exists() and (out / "saved_model" / "saved_model.pb").exists()
    assert (out / "checkpoints" / "last.keras").exists()

    info = run_here(capsys, "inspect", out / "model.keras")
    assert info.returncode == 0, info.stderr
    for fragment in ("input  signal", "input  table", "fusion: gated", "signal -> cnn", "head:"):
        assert fragment in info.stdout
    info = run_here(capsys, "inspect", out / "saved_model")
    assert info.returncode == 0 and "serving_default" in info.stdout

    for fmt, name in (("onnx", "m.onnx"), ("litert", "m.tflite"), ("saved_model", "sm")):
        result = run_here(
            capsys, "export", out / "model.keras", "--format", fmt, "--out", tmp_path / name
        )
        assert result.returncode == 0, result.stderr[-2000:]
        assert (tmp_path / name).exists()


RESUME_SPEC = {
    "inputs": {"signal": {"shape": [12, 3]}, "table": {"shape": [4]}},
    "branches": {
        "signal": [{"type": "RNN", "units": 8, "dropout": 0.2, "name": "rnn"}],
        "table": [{"type": "MLP", "units": [8], "name": "mlp"}],
    },
    "fusion": "gated",
    "branch_dropout": 0.2,
    "head": {"type": "Classification", "num_classes": 2},
    "recipe": {"name": "small_data", "max_epochs": 6, "patience": 4},
    "seed": 7,
}


def _train_here(capsys, monkeypatch, *args):
    """`kfusion train` in this process; its exports replaced by a record of the weights."""
    exported = {}

    def export(model, path, format, probe):
        exported[format] = model.get_weights()
        return str(path)

    monkeypatch.setattr(kexport, "export", export)
    return run_here(capsys, "train", *args), exported


def _state(path):
    """Weights and optimizer variables of a checkpoint, as NumPy arrays."""
    model = keras.saving.load_model(path, safe_mode=True)
    return [np.asarray(v) for v in model.get_weights() + model.optimizer.variables]


def test_train_resume_after_kill_is_exact_with_dropout(tmp_path, capsys, monkeypatch):
    # RNN dropout, branch dropout and the recipe's plateau and early-stopping callbacks:
    # a run killed in the middle of an epoch and resumed (from a damaged backup, even)
    # ends with the weights, optimizer state and history of a run never interrupted.
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(RESUME_SPEC))
    data = make_data(tmp_path / "data.npz", n=640)
    args = (spec_path, "--data", data, "--quiet")
    full, full_exports = _train_here(capsys, monkeypatch, *args, "--out", tmp_path / "full")
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
                proc.send_signal(signal.SIGKILL)  # in the middle of epoch 4
                break
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be interrupted"
    assert not (out / "model.keras").exists()
    backups = sorted((out / "backup").iterdir())
    assert len(backups) == 2 and all(b.name.startswith("epoch-") for b in backups)
    # The newest backup is damaged (a disk error; a kill can't leave one, they are renamed
    # into place): the resumed run falls back to the one before it.
    weights = backups[-1] / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    older = int(backups[0].name.split("-")[1])

    resumed, resumed_exports = _train_here(capsys, monkeypatch, *args, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming after epoch {older} instead" in resumed.stderr
    for a, b in zip(
        _state(tmp_path / "full" / "checkpoints" / "last.keras"),
        _state(out / "checkpoints" / "last.keras"),
    ):
        np.testing.assert_array_equal(a, b)
    for fmt in ("keras", "saved_model"):  # the best epoch's weights, restored at the end
        for a, b in zip(full_exports[fmt], resumed_exports[fmt]):
            np.testing.assert_array_equal(a, b)
    full_metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == 6 and "learning_rate" in metrics["history"]
    assert metrics["history"] == full_metrics["history"]  # every epoch, not the resumed ones

    for backup in (out / "backup").iterdir():  # no readable backup left: one line
        (backup / "model.weights.h5").write_bytes(b"damaged")
    result = run_here(capsys, "train", *args, "--out", out, "--resume")
    assert_user_error(result, "cannot resume", "without --resume")


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
    result = run_command(
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
    result = run_here(capsys, *args, "--out", tmp_path / "run")
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
    result = run_here(capsys, *args, "--out", tmp_path / "again")
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
        "recipe": {"name": "small_data", "max_epochs": 12, "patience": 4, "lr_patience": 3},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    args = ("train", tmp_path / "spec.yaml", "--data", tmp_path / "d.npz", "--quiet")
    result = run_here(capsys, *args, "--out", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # a stratified fifth validates; batch size by data size (64 rows -> 8); the best
    # validation loss's weights are the ones exported
    assert metrics["validation"]["samples"] == 16 and metrics["validation"]["stratified"]
    assert metrics["recipe"] == {
        "name": "small_data",
        "max_epochs": 12,
        "patience": 4,
        "lr_patience": 3,
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
        ({"name": "small_data", "lr_patience": 0}, "recipe 'lr_patience' must be an integer >= 1"),
    ):
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**spec, "recipe": recipe}))
        bad = ("train", tmp_path / "bad.yaml", "--data", tmp_path / "d.npz")
        assert_user_error(run_here(capsys, *bad, "--out", tmp_path / "o"), fragment)


def test_train_refuses_an_export_destination_before_training(spec_and_data, tmp_path, capsys):
    # out/saved_model holds something that is not a SavedModel: the export at the end would
    # refuse to replace it, so the command says so before it spends time training.
    spec, data = spec_and_data
    out = tmp_path / "run"
    (out / "saved_model").mkdir(parents=True)
    (out / "saved_model" / "notes.txt").write_text("keep me")
    result = run_here(capsys, "train", spec, "--data", data, "--out", out, "--quiet")
    assert_user_error(result, "saved_model", "not a SavedModel")
    assert (out / "saved_model" / "notes.txt").read_text() == "keep me"
    assert not (out / "checkpoints").exists()  # no epoch ran


def test_unwritable_output_folder(tmp_path, spec_and_data, capsys):
    spec, data = spec_and_data
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = run_here(capsys, "train", spec, "--data", data, "--out", blocker / "run")
    assert_user_error(result, "cannot write")
    assert blocker.read_text() == "keep me"


def test_checkpoint_that_fails_to_save_keeps_the_last_one(tmp_path, small_keras_model):

    model, _ = small_keras_model
    path = tmp_path / "checkpoints" / "last.keras"
    path.parent.mkdir()
    checkpoint = _Checkpoint(str(path))
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


def test_backup_keeps_the_recipe_callbacks_state(tmp_path, small_keras_model):
    # ReduceLROnPlateau and EarlyStopping reset themselves when training begins; a resumed
    # run gets back their counters, best value and best weights from the backup.
    from kfusion.cli._backup import Backup
    from kfusion.cli._backup import callback as backup_callback

    model, _ = small_keras_model
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)  # as after an epoch
    plateau = keras.callbacks.ReduceLROnPlateau(patience=2)
    stop = keras.callbacks.EarlyStopping(patience=5, restore_best_weights=True)
    for callback in (plateau, stop):
        callback.set_model(model)
        callback.on_train_begin()
    plateau.wait, plateau.best, plateau.cooldown_counter = 1, 0.25, 1
    stop.wait, stop.best, stop.best_epoch = 2, 0.5, 3
    stop.best_weights = [w + 1 for w in model.get_weights()]
    backup = Backup(str(tmp_path / "backup"))
    backup.save(model, 4, {"loss": [1.0, 0.9, 0.8, 0.7]}, [plateau, stop])

    fresh = [keras.callbacks.ReduceLROnPlateau(patience=2), keras.callbacks.EarlyStopping()]
    state = backup.restore(model)
    saver = backup_callback(backup, state, fresh)
    for callback in (*fresh, saver):  # in the order `fit` calls them
        callback.set_model(model)
        callback.on_train_begin()
    assert (fresh[0].wait, fresh[0].best, fresh[0].cooldown_counter) == (1, 0.25, 1)
    assert (fresh[1].wait, fresh[1].best, fresh[1].best_epoch) == (2, 0.5, 3)
    for a, b in zip(fresh[1].best_weights, stop.best_weights):
        np.testing.assert_array_equal(a, b)
    assert state["epochs_done"] == 4 and saver.history == {"loss": [1.0, 0.9, 0.8, 0.7]}


def test_a_diverged_run_is_one_line_and_leaves_no_empty_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz", x=rng.normal(size=(64, 4)).astype("float32"), y=rng.normal(size=(64, 1))
    )
    spec = {
        "inputs": {"x": {"shape": [4]}},
        "branches": [{"type": "MLP", "units": [8]}],
        "head": {"type": "Regression"},
        "learning_rate": 1e30,
        "epochs": 2,
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "run"
    result = run_here(
        capsys, "train", tmp_path / "spec.yaml", "--data", tmp_path / "d.npz", "--out", out
    )
    assert_user_error(result, "training diverged")
    assert not out.exists()  # no empty OUT/ nor OUT/checkpoints/


def test_train_takes_the_multimodal_spec_keys_and_presence_arrays(tmp_path, capsys):
    spec = json.loads(json.dumps(SPEC))
    spec.update(
        modality_dropout={"signal": 0.3, "table": 0.2},
        aux_loss_weight=0.5,
        balance="ogm",
        epochs=2,
    )
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    data = dict(np.load(make_data(tmp_path / "data.npz")))
    data["table_present"] = np.arange(len(data["y"])) % 3 != 0  # a third without a table
    np.savez(tmp_path / "holes.npz", **data)
    out = tmp_path / "run"
    result = run_here(capsys, "train", spec_path, "--data", tmp_path / "holes.npz", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    history = json.loads((out / "metrics.json").read_text())["history"]
    assert {"aux_cnn_loss", "aux_mlp_loss"} <= set(history)
    model = kexport.load(out / "model.keras")
    assert model.missing_modalities and model.balance == "ogm"
    assert model.modality_dropout == {"signal": 0.3, "table": 0.2}
    coefficients = np.asarray(model.get_layer("gradient_modulation").coefficients)
    assert coefficients.shape == (2,) and coefficients.min() <= 1.0
    # The exported SavedModel takes the flags; an input left out of the data is absent.
    del data["table"], data["table_present"]
    np.savez(tmp_path / "no_table.npz", **data)
    result = run_here(
        capsys, "train", spec_path, "--data", tmp_path / "no_table.npz", "--out", tmp_path / "r2"
    )
    assert result.returncode == 0, result.stderr[-3000:]
