import keras
import numpy as np
import pytest

import kfusion as kf
from tests.conftest import BACKEND

JIT = BACKEND != "torch"  # XLA where the backend offers it


def _backbone_model(trainable=False):
    tiny = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.BatchNormalization(name="norm"),
        ],
        name="tiny",
    )
    model = kf.FusionModel(
        inputs={"image": keras.Input((8, 8, 3)), "table": keras.Input((3,))},
        branches={
            "image": [
                kf.branches.Backbone(tiny, trainable=trainable, preprocess=False, name="vision")
            ],
            "table": [kf.branches.MLP(units=(4,), name="tabular")],
        },
        fusion="concat",
        head=kf.heads.Classification(2),
    )
    return model, tiny


def _data(n=32):
    rng = np.random.default_rng(0)
    # Inputs far from zero mean: batch statistics differ from the moving ones.
    x = {
        "image": rng.normal(loc=3.0, size=(n, 8, 8, 3)).astype("float32"),
        "table": rng.normal(size=(n, 3)).astype("float32"),
    }
    return x, (x["table"][:, 0] > 0).astype("int32")


def _trainable_roots(model):
    """The names of the model's layers that own trainable weights."""
    trainable = {id(w) for w in model.trainable_weights}
    return sorted(
        layer.name for layer in model.layers if any(id(w) in trainable for w in layer.weights)
    )


def test_freeze_and_unfreeze_by_name():
    model, tiny = _backbone_model(trainable=True)
    assert _trainable_roots(model) == ["classification", "tabular", "vision"]
    branch = kf.ensemble.freeze(model, "vision")
    assert branch is model.get_layer("vision") and not branch.trainable
    assert _trainable_roots(model) == ["classification", "tabular"]
    kf.ensemble.unfreeze(model, "vision")
    assert _trainable_roots(model) == ["classification", "tabular", "vision"]
    # BatchNormalization stays frozen (and so in inference mode) by default...
    assert not tiny.get_layer("norm").trainable and tiny.get_layer("conv").trainable
    trainable_paths = {w.path for w in model.trainable_weights}
    assert not any("norm" in p for p in trainable_paths)
    # ...unless asked otherwise.
    kf.ensemble.unfreeze(model, "vision", keep_batchnorm_frozen=False)
    assert tiny.get_layer("norm").trainable


def test_frozen_branch_does_not_train():
    model, _ = _backbone_model(trainable=True)
    kf.ensemble.freeze(model, "tabular")
    model.compile(optimizer=keras.optimizers.Adam(0.05))
    before = [np.array(w) for w in model.get_layer("tabular").get_weights()]
    model.fit(*_data(), epochs=1, verbose=0)
    for a, b in zip(before, model.get_layer("tabular").get_weights()):
        np.testing.assert_array_equal(a, b)


def test_unknown_branch_name_lists_the_known_ones():
    model, _ = _backbone_model()
    with pytest.raises(ValueError, match=r"branch_name='visoin'.*") as info:
        kf.ensemble.freeze(model, "visoin")
    assert "['vision', 'tabular']" in str(info.value)
    with pytest.raises(ValueError, match="branch_name='nope'"):
        kf.ensemble.unfreeze(model, "nope")
    i = keras.Input((3,))
    with pytest.raises(ValueError, match="model='plain'"):
        kf.ensemble.freeze(keras.Model(i, keras.layers.Dense(1)(i), name="plain"), "dense")
    with pytest.raises(ValueError, match="keep_batchnorm_frozen='no'"):
        kf.ensemble.unfreeze(model, "vision", keep_batchnorm_frozen="no")


class _Snapshot(keras.callbacks.Callback):
    """Records the backbone's weights and the learning rate at the end of every epoch."""

    def __init__(self, tiny):
        super().__init__()
        self.tiny = tiny
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(
            {
                "conv": [np.array(w) for w in self.tiny.get_layer("conv").get_weights()],
                "norm": [np.array(w) for w in self.tiny.get_layer("norm").get_weights()],
                "rate": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            }
        )


def test_unfreeze_backbone_callback():
    model, tiny = _backbone_model(trainable=False)
    model.compile(optimizer=keras.optimizers.Adam(0.05), jit_compile=JIT)
    start_conv = [np.array(w) for w in tiny.get_layer("conv").get_weights()]
    start_norm = [np.array(w) for w in tiny.get_layer("norm").get_weights()]
    head_start = np.array(model.get_layer("classification").get_weights()[0])
    snapshot = _Snapshot(tiny)
    callback = kf.ensemble.UnfreezeBackbone(after_epochs=1, learning_rate=1e-2)
    x, y = _data()
    model.fit(x, y, epochs=3, batch_size=8, verbose=0, callbacks=[snapshot, callback])
    assert callback.unfrozen == ["vision"]
    first, last = snapshot.epochs[0], snapshot.epochs[-1]
    # Epoch 1: backbone frozen, the head trains at the first learning rate.
    for a, b in zip(start_conv, first["conv"]):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(head_start, model.get_layer("classification").get_weights()[0])
    assert first["rate"] == pytest.approx(0.05)
    # Epochs 2-3: the backbone's convolution trains at the lower rate...
    assert snapshot.epochs[1]["rate"] == pytest.approx(1e-2)
    assert any(not np.allclose(a, b) for a, b in zip(first["conv"], last["conv"]))
    # ...while BatchNormalization stays in inference mode: gamma, beta and the moving
    # statistics never change although the inputs have mean 3.
    for a, b in zip(start_norm, last["norm"]):
        np.testing.assert_array_equal(a, b)
    assert model.get_layer("vision").trainable


def test_unfreeze_backbone_bad_arguments_and_models():
    with pytest.raises(ValueError, match="after_epochs=0"):
        kf.ensemble.UnfreezeBackbone(after_epochs=0)
    with pytest.raises(ValueError, match="learning_rate=0"):
        kf.ensemble.UnfreezeBackbone(learning_rate=0)
    with pytest.raises(ValueError, match="keep_batchnorm_frozen=1"):
        kf.ensemble.UnfreezeBackbone(keep_batchnorm_frozen=1)
    no_backbone = kf.FusionModel(
        inputs=keras.Input((3,)), branches=[kf.branches.MLP(units=(2,))], name="tab_only"
    )
    no_backbone.compile(optimizer="adam", loss="mse")
    x = np.zeros((4, 3), "float32")
    with pytest.raises(ValueError, match="no Backbone branch"):
        no_backbone.fit(
            x, x[:, :2], epochs=1, verbose=0, callbacks=[kf.ensemble.UnfreezeBackbone()]
        )
