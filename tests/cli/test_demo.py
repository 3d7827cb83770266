"""`kfusion demo`."""

import json
import os
import stat

import keras

from tests.cli.commands import run_command
from tests.conftest import requires_tensorflow

pytestmark = requires_tensorflow  # the command's exports are TensorFlow formats


def loaded_has_feature_norm(out):
    model = keras.saving.load_model(out / "best.keras", safe_mode=True)
    return model.feature_norm == "layer" and model.get_layer("cnn_branch_feature_norm")


def test_demo_tiny_budget(tmp_path):
    out = tmp_path / "demo"
    result = run_command("demo", "--epochs", 1, "--fusion", "gated", "--out", out, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("cnn_only", "rnn_only", "transformer_only", "fused_gated", "accuracy", "macro F1"):
        assert name in result.stdout
    assert "branch weights" in result.stdout and "ablation" in result.stdout
    assert "outputs equal" in result.stdout
    report = json.loads((out / "results.json").read_text())
    umask = os.umask(0)
    os.umask(umask)
    for name in ("results.json", "training_curves.png", "best.keras"):  # not mkstemp's 0600
        assert stat.S_IMODE(os.stat(out / name).st_mode) == 0o666 & ~umask, name
    assert report["best"] == "fused_gated"
    assert set(report["models"]) == {"cnn_only", "rnn_only", "transformer_only", "fused_gated"}
    assert 0.0 <= report["models"]["fused_gated"]["accuracy"] <= 1.0
    # The fused model is compared with the best single branch, in the output and report.
    versus = report["fused_vs_best_branch"]
    branches = ("cnn_only", "rnn_only", "transformer_only")
    branch_accuracy = {n: report["models"][n]["accuracy"] for n in branches}
    assert versus["best_branch_accuracy"] == max(branch_accuracy.values())
    margin = report["models"]["fused_gated"]["accuracy"] - versus["best_branch_accuracy"]
    assert versus["margins"]["fused_gated"] == margin
    assert "fused vs the best single branch" in result.stdout
    assert loaded_has_feature_norm(out)
    # validated on a stratified tenth of the 1,437 training images, not on the test images
    assert report["validation_samples"] == 144
    assert 0.0 <= report["models"]["fused_gated"]["val_accuracy"] <= 1.0
    assert report["fresh_process_max_difference"] < 1e-4
    assert (out / "best_saved_model" / "saved_model.pb").exists()
    assert (out / "best.keras").exists() and (out / "training_curves.png").exists()
    loaded = keras.saving.load_model(out / "best.keras", safe_mode=True)
    assert loaded.output_shape == (None, 10)
