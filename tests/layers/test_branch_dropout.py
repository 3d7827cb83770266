import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion.layers import BranchDropout
from tests import helpers


@pytest.fixture
def arrays():
    return [
        np.ones((256, 3), "float32"),
        np.ones((256, 3), "float32"),
        np.ones((256, 5, 3), "float32"),
    ]


def test_config_roundtrip():
    helpers.check_config_roundtrip(BranchDropout(0.3, seed=4))


def test_inference_is_the_identity(arrays):
    out = BranchDropout(0.5)(arrays)
    for a, b in zip(arrays, out):
        np.testing.assert_array_equal(helpers.as_numpy(b), a)


def test_training_drops_whole_branches_never_all_and_rescales(arrays):
    out = [helpers.as_numpy(t) for t in BranchDropout(0.4, seed=0)(arrays, training=True)]
    kept = np.stack([out[0][:, 0], out[1][:, 0], out[2][:, 0, 0]], axis=1) > 0
    assert kept.sum(axis=1).min() >= 1  # never all dropped
    assert 0.45 < kept.mean() < 0.75  # about 1 - 0.4, plus the rescued samples
    # Whole branches: a sequence branch is dropped at every step and feature at once.
    assert np.all((out[2] > 0).all(axis=(1, 2)) | (out[2] == 0).all(axis=(1, 2)))
    # Survivors are scaled by M / (number kept).
    expected = np.where(kept, 3.0 / kept.sum(axis=1, keepdims=True), 0.0)
    np.testing.assert_allclose(np.stack([o.reshape(256, -1)[:, 0] for o in out], 1), expected)


def test_masks_pass_through(arrays):
    masks = [None, None, np.ones((256, 5), bool)]
    assert BranchDropout(0.2).compute_mask(arrays, masks) is masks


@pytest.mark.parametrize("kwargs, name", [({"rate": 1.0}, "rate"), ({"seed": -2}, "seed")])
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        BranchDropout(**kwargs)


def test_in_a_fusion_model_it_trains_saves_and_is_off_at_inference(tmp_path):
    x, y = kf.datasets.sequence_classification(n=64, length=16, features=2)

    def make(rate):
        keras.utils.set_random_seed(0)
        return kf.FusionModel(
            inputs=keras.Input((16, 2), name="signal"),
            branches=[
                kf.branches.CNN(filters=(8,), name="cnn"),
                kf.branches.RNN(units=8, name="rnn"),
            ],
            fusion=kf.layers.GatedFusion(8, name="gated"),
            head=kf.heads.Classification(3, name="head"),
            branch_dropout=rate,
        )

    model, plain = make(0.5), make(0.0)
    for layer in plain.layers:
        if layer.weights:
            layer.set_weights(model.get_layer(layer.name).get_weights())
    np.testing.assert_allclose(helpers.as_numpy(model(x)), helpers.as_numpy(plain(x)), atol=1e-6)
    assert model.to_spec()["branch_dropout"] == 0.5
    model.compile(optimizer="adam")
    model.fit(x, y, epochs=1, batch_size=16, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.branch_dropout == 0.5
    np.testing.assert_allclose(helpers.as_numpy(loaded(x)), helpers.as_numpy(model(x)), atol=1e-6)
    with pytest.raises(ValueError, match="branch_dropout="):
        make(-0.1)
