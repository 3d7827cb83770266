"""`kfusion export --quantize ... --data ...`, and its failures as one line with exit code 2."""

import os

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion import _onnx
from tests.cli.commands import assert_user_error, run_here
from tests.conftest import requires_tensorflow

pytestmark = requires_tensorflow


@pytest.fixture
def cnn_model(tmp_path):
    model = kf.FusionModel(
        inputs=keras.Input((12, 3), name="signal"),
        branches=[kf.branches.CNN(filters=(8,)), kf.branches.Transformer(dim=8, depth=1)],
        head=kf.heads.Classification(3),
    )
    path = tmp_path / "model.keras"
    model.save(path)
    x = np.random.default_rng(0).normal(size=(40, 12, 3)).astype("float32")
    np.savez(tmp_path / "data.npz", signal=x, y=np.arange(40) % 3)
    return path, tmp_path / "data.npz"


def test_export_int8_litert_with_data(tmp_path, cnn_model, capsys):
    path, data = cnn_model
    out = tmp_path / "m.tflite"
    result = run_here(
        capsys,
        "export",
        path,
        "--format",
        "litert",
        "--quantize",
        "int8",
        "--data",
        data,
        "--out",
        out,
    )
    assert result.returncode == 0, result.stderr
    assert out.exists() and "quantize=int8" in result.stdout
    assert "predicted classes agree on" in result.stdout and "of 40 rows" in result.stdout


def test_int8_without_data_and_a_mode_the_format_lacks_are_one_line(tmp_path, cnn_model, capsys):
    path, _ = cnn_model
    out = tmp_path / "m.tflite"
    result = run_here(
        capsys, "export", path, "--format", "litert", "--quantize", "int8", "--out", out
    )
    assert_user_error(result, "--data", "int8")
    result = run_here(
        capsys,
        "export",
        path,
        "--format",
        "onnx",
        "--quantize",
        "float16",
        "--out",
        tmp_path / "m.onnx",
    )
    assert_user_error(result, "quantize='float16'")
    assert sorted(os.listdir(tmp_path)) == ["data.npz", "model.keras"]


def test_data_that_does_not_fit_the_model_is_one_line(tmp_path, cnn_model, capsys):
    path, _ = cnn_model
    np.savez(tmp_path / "bad.npz", signal=np.zeros((4, 5, 3), "float32"))
    result = run_here(
        capsys,
        "export",
        path,
        "--format",
        "litert",
        "--quantize",
        "int8",
        "--data",
        tmp_path / "bad.npz",
        "--out",
        tmp_path / "m.tflite",
    )
    assert_user_error(result, "--data", "(None, 12, 3)")
    np.savez(tmp_path / "other.npz", text=np.zeros((4, 5), "int32"))
    result = run_here(
        capsys,
        "export",
        path,
        "--format",
        "litert",
        "--data",
        tmp_path / "other.npz",
        "--out",
        tmp_path / "m.tflite",
    )
    assert_user_error(result, "no array for input(s) ['signal']")


def test_a_converter_failure_is_one_line_exit_code_2(tmp_path, cnn_model, capsys, monkeypatch):
    # Without kfusion's Erfc handler the Transformer's GELU can't be converted to ONNX.
    path, _ = cnn_model
    monkeypatch.setattr(_onnx, "CUSTOM_OP_HANDLERS", {})
    result = run_here(capsys, "export", path, "--format", "onnx", "--out", tmp_path / "m.onnx")
    assert_user_error(result, "format='onnx'", "Erfc", "intermediate_dense")
    assert not (tmp_path / "m.onnx").exists()
