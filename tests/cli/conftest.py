import keras
import pytest
import yaml

import kfusion as kf  # registers the classes .keras files name
from tests.cli.commands import SPEC, make_data


@pytest.fixture
def spec_and_data(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    return spec, make_data(tmp_path / "data.npz")


@pytest.fixture
def small_keras_model(tmp_path):
    model = kf.FusionModel(
        inputs=keras.Input((4,), name="x"), branches=[kf.branches.MLP(units=(4,))]
    )
    path = tmp_path / "model.keras"
    model.save(path)
    return model, path
