"""The training spec `kfusion train` reads: one-line errors for what is wrong in it."""

import pytest
import yaml

from kfusion.cli._train_spec import read_spec
from tests.cli.commands import SPEC, assert_user_error, run_here
from tests.conftest import requires_tensorflow

pytestmark = requires_tensorflow  # the command's exports are TensorFlow formats


def test_missing_spec_file(tmp_path, capsys):
    assert_user_error(
        run_here(capsys, "train", tmp_path / "nope.yaml", "--data", "x.npz"), "not found"
    )


def test_malformed_yaml(tmp_path, spec_and_data, capsys):
    _, data = spec_and_data
    bad = tmp_path / "bad.yaml"
    bad.write_text("inputs: [unclosed\n  - : :")
    assert_user_error(
        run_here(capsys, "train", bad, "--data", data, "--out", tmp_path / "o"), "YAML"
    )
    assert not (tmp_path / "o").exists()


def test_unknown_key_suggests_closest(tmp_path, spec_and_data, capsys):
    _, data = spec_and_data
    spec = tmp_path / "typo.yaml"
    spec.write_text(yaml.safe_dump({**SPEC, "epocs": 3}))
    result = run_here(capsys, "train", spec, "--data", data, "--out", tmp_path / "o")
    assert_user_error(result, "'epocs'", "'epochs'")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "setting, fragment",
    [
        ({"epochs": "ten"}, "'epochs' must be an integer >= 1; got epochs='ten'"),
        ({"epochs": 0}, "'epochs' must be an integer >= 1; got epochs=0"),
        ({"batch_size": 2.5}, "'batch_size' must be an integer >= 1"),
        ({"seed": "abc"}, "'seed' must be an integer in [0, 4294967295]"),
        ({"validation_split": 1.5}, "'validation_split' must be a number in [0, 1)"),
        ({"learning_rate": "fast"}, "'learning_rate' must be a number > 0"),
        ({"label": ["y"]}, "'label' must be the name"),
        ({"metrics": "accuracy"}, "'metrics' must be a list of metric names"),
        ({"loss": "nonexistent_loss"}, "'loss' names 'nonexistent_loss'"),
        ({"metrics": ["accuracy", "nonexistent_metric"]}, "'metrics' names 'nonexistent_metric'"),
        ({"seed": 2**40}, "'seed' must be an integer in [0, 4294967295]; got seed=1099511627776"),
        ({"metrics": [123]}, "'metrics' must be a list of metric names"),
        ({"optimizer": {}}, "'optimizer' must be an optimizer name or {class_name: NAME"),
        ({"optimizer": {"class_name": "Adam", "config": 3}}, "'optimizer' must be"),
        ({"name": "modèle"}, "name 'modèle' must start with a letter"),
        (
            {
                "branches": {
                    "signal": [{"type": "CNN", "name": "cnn é"}],
                    "table": [{"type": "MLP"}],
                }
            },
            "spec.branches.signal[0] name 'cnn é'",
        ),
        (
            {"head": {"type": "Classification", "num_classes": 3}, "loss": "mse"},
            "the loss or metrics can't be computed on labels of shape (2,) and the model's "
            "output of shape (None, 3)",
        ),
        (
            {"head": {"type": "Regression"}, "validation_split": 0.998},
            "validation_split=0.998 of 256 rows leaves 1 row(s) to train on",
        ),
        ({"head": {"type": "Classification", "num_classes": 10**9}}, "`num_classes`=1000000000"),
        ({"inputs": {"": {"shape": [4]}}, "branches": [{"type": "MLP"}]}, "Received: ''"),
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
    result = run_here(capsys, "train", spec, "--data", data, "--out", tmp_path / "o")
    assert_user_error(result, fragment)
    assert not (tmp_path / "o").exists()


def test_numbers_yaml_reads_as_strings_are_accepted(tmp_path):

    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC) + "learning_rate: 1e-3\nvalidation_split: 0.25\n")
    _, train = read_spec(str(spec))
    assert train["learning_rate"] == 0.001 and train["validation_split"] == 0.25
    assert train["epochs"] == 3 and isinstance(train["epochs"], int)


def test_the_cli_knows_every_model_spec_key():
    from kfusion.cli import _train_spec
    from kfusion.models import _spec

    assert set(_train_spec.MODEL_KEYS) == set(_spec.MODEL_KEYS)
