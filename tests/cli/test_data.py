"""The data `kfusion train --data` reads."""

import numpy as np

from tests.cli.commands import assert_user_error, run_here
from tests.conftest import requires_tensorflow

pytestmark = requires_tensorflow  # the command's exports are TensorFlow formats


def test_data_names_and_shapes_must_match(tmp_path, spec_and_data, capsys):
    spec, _ = spec_and_data
    wrong_name = tmp_path / "names.npz"
    np.savez(wrong_name, sig=np.zeros((4, 12, 3)), table=np.zeros((4, 4)), y=np.zeros(4))
    assert_user_error(
        run_here(capsys, "train", spec, "--data", wrong_name, "--out", tmp_path / "o"), "signal"
    )
    wrong_shape = tmp_path / "shape.npz"
    np.savez(wrong_shape, signal=np.zeros((4, 10, 3)), table=np.zeros((4, 4)), y=np.zeros(4))
    result = run_here(capsys, "train", spec, "--data", wrong_shape, "--out", tmp_path / "o")
    assert_user_error(result, "'signal'", "(None, 12, 3)")
    wrong_label = tmp_path / "labels.npz"
    np.savez(wrong_label, signal=np.zeros((4, 12, 3)), table=np.zeros((4, 4)), y=np.arange(4) + 1)
    result = run_here(capsys, "train", spec, "--data", wrong_label, "--out", tmp_path / "o")
    assert_user_error(result, "labels y", "[0, 1]", "from 1 to 4")
    assert not (tmp_path / "o").exists()
