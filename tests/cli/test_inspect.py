"""`kfusion inspect`."""

from tests.cli.commands import assert_user_error, run_here
from tests.conftest import requires_tensorflow

pytestmark = requires_tensorflow  # the command's exports are TensorFlow formats


def test_inspect_missing_model(tmp_path, capsys):
    assert_user_error(run_here(capsys, "inspect", tmp_path / "none.keras"), "not found")


def test_inspect_damaged_saved_model(tmp_path, capsys):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"not a protobuf")
    assert_user_error(run_here(capsys, "inspect", tmp_path / "sm"), "cannot load")
