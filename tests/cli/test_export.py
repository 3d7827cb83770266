"""`kfusion export`."""

import numpy as np

from tests.cli.commands import assert_user_error, run_here
from tests.conftest import requires_tensorflow

pytestmark = requires_tensorflow  # the command's exports are TensorFlow formats


def test_export_missing_model(tmp_path, capsys):
    result = run_here(
        capsys, "export", tmp_path / "none.keras", "--format", "onnx", "--out", tmp_path / "x"
    )
    assert_user_error(result, "not found")


def test_export_refusals_are_one_line_errors(tmp_path, small_keras_model, capsys):
    model, path = small_keras_model
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "keep").write_text("keep me")
    result = run_here(capsys, "export", path, "--format", "onnx", "--out", folder)
    assert_user_error(result, "is a folder")
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    result = run_here(capsys, "export", path, "--format", "saved_model", "--out", blocker)
    assert_user_error(result, "exists and is not a folder")
    weights = model.get_weights()
    weights[0][0, 0] = np.nan
    model.set_weights(weights)
    model.save(tmp_path / "nan.keras")
    result = run_here(
        capsys, "export", tmp_path / "nan.keras", "--format", "keras", "--out", tmp_path / "o.keras"
    )
    assert_user_error(result, "NaN or inf")
    assert (folder / "keep").read_text() == "keep me" and blocker.read_text() == "keep me"
    assert not (tmp_path / "o.keras").exists()
