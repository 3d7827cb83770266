"""`FusionModel(feature_norm="layer")`: each branch's features are layer-normalised."""

import keras
import numpy as np
import pytest

import kfusion as kf
from tests import helpers


def make(feature_norm, fusion="gated"):
    keras.utils.set_random_seed(0)
    return kf.FusionModel(
        inputs=keras.Input((16, 2), name="signal"),
        branches=[
            kf.branches.CNN(filters=(8,), name="cnn"),
            kf.branches.RNN(units=8, name="rnn"),
        ],
        fusion=fusion,
        head=kf.heads.Classification(3, name="head"),
        feature_norm=feature_norm,
    )


def test_branches_meet_on_one_scale_and_the_option_round_trips(tmp_path):
    # Inputs on a large scale: the CNN's ReLU features grow with them, the RNN's
    # tanh states cannot, so without the option the two branches differ in scale.
    x, y = kf.datasets.sequence_classification(n=64, length=16, features=2)
    x = (x * 300.0).astype("float32")
    plain = [helpers.as_numpy(f) for f in make(None).branch_features()(x)]
    assert np.abs(plain[0]).mean() > 20 * np.abs(plain[1]).mean()

    model = make("layer")
    assert model.get_layer("cnn_feature_norm") and model.get_layer("rnn_feature_norm")
    for features in model.branch_features()(x):
        features = helpers.as_numpy(features)
        np.testing.assert_allclose(features.mean(axis=-1), 0.0, atol=1e-3)
        std = features.std(axis=-1)
        # Unit scale, except a row whose features are all equal (all ReLUs off): zero.
        assert np.all(std < 1.01) and np.mean(np.abs(std - 1.0) < 0.02) > 0.8

    spec = model.to_spec()
    assert spec["feature_norm"] == "layer"
    assert "feature_norm" not in make(None).to_spec()
    rebuilt = kf.FusionModel.from_spec(spec)
    assert rebuilt.get_layer("rnn_feature_norm") is not None

    model.compile(optimizer="adam")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.feature_norm == "layer"
    np.testing.assert_allclose(helpers.as_numpy(loaded(x)), helpers.as_numpy(model(x)), atol=1e-5)


def test_sequence_features_for_cross_attention_are_normalised_too():
    model = make("layer", fusion="cross_attention")
    x, _ = kf.datasets.sequence_classification(n=8, length=16, features=2)
    assert model.predict(x, verbose=0).shape == (8, 3)


@pytest.mark.parametrize("value", ["batch", True, 1])
def test_a_bad_value_names_the_argument(value):
    with pytest.raises(ValueError, match="feature_norm="):
        make(value)
