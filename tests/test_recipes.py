import keras
import numpy as np
import pytest

import kfusion as kf


def small_model(num_classes=3, length=16, **kwargs):
    return kf.FusionModel(
        inputs=keras.Input((length, 2), name="signal"),
        branches=[kf.branches.CNN(filters=(8,), kernel_size=5)],
        head=kf.heads.Classification(num_classes),
        **kwargs,
    )


def test_settings_follow_the_data_size():
    assert small_data_settings_batch(40) == 8
    assert small_data_settings_batch(120) == 12
    assert small_data_settings_batch(5000) == 16
    settings = kf.recipes.small_data_settings(100, max_epochs=50, patience=8)
    plateau, stop = settings["callbacks"][1:]
    assert settings["epochs"] == 50
    assert (plateau.monitor, plateau.patience, plateau.factor) == ("val_loss", 2, 0.5)
    assert isinstance(stop, kf.callbacks.BestEpoch)
    assert (stop.monitor, stop.patience, stop.restore_best_weights) == (
        ("val_accuracy", "val_loss"),
        8,
        True,
    )
    # the learning-rate patience: patience // 4 (at least 2) unless set
    for kwargs, expected in (
        ({"patience": 40}, 10),
        ({"patience": 20}, 5),
        ({"patience": 20, "lr_patience": 10}, 10),
        ({"patience": 4, "lr_patience": 1}, 1),
    ):
        plateau = kf.recipes.small_data_settings(100, **kwargs)["callbacks"][1]
        assert plateau.patience == expected, kwargs


def small_data_settings_batch(n):
    return kf.recipes.small_data_settings(n)["batch_size"]


def test_recipe_learns_and_keeps_the_best_validation_weights():
    x, y = kf.datasets.sequence_classification(n=160, length=16, features=2, seed=3)
    order = np.argsort(y, kind="stable")  # class-sorted, as UCR training files are
    x, y = x[order], y[order]
    model = small_model()
    seen = {}

    class Spy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))

    history = kf.recipes.small_data(
        model, x, y, seed=0, learning_rate=3e-3, max_epochs=40, patience=6, callbacks=[Spy()]
    )
    val_loss, val_acc = history.history["val_loss"], history.history["val_accuracy"]
    assert seen["lr"] == pytest.approx(3e-3)
    # The split held out a stratified fifth: 32 rows, every class in it.
    (_, _), (x_val, y_val) = kf.datasets.train_validation_split(x, y, 0.2, seed=0)
    assert len(y_val) == 32 and set(y_val) == {0, 1, 2}
    # The best epoch: highest validation accuracy, then lowest validation loss.
    epoch = min(range(len(val_loss)), key=lambda i: (-val_acc[i], val_loss[i]))
    best = model.evaluate(x_val, y_val, verbose=0, return_dict=True)
    assert best["loss"] == pytest.approx(val_loss[epoch], rel=1e-4)
    assert best["accuracy"] == pytest.approx(max(val_acc))
    x_test, y_test = kf.datasets.sequence_classification(n=96, length=16, features=2, seed=9)
    assert np.mean(model.predict_classes(x_test) == y_test) > 0.85


def test_recipe_takes_string_labels_and_explicit_validation_data():
    x, y = kf.datasets.sequence_classification(n=64, length=16, features=2, seed=1)
    names = np.array(["a", "b", "c"])
    model = kf.FusionModel(
        inputs=keras.Input((16, 2), name="signal"),
        branches=[kf.branches.CNN(filters=(8,))],
        head=kf.heads.Classification(labels=list(names)),
    )
    history = kf.recipes.small_data(model, x, names[y], max_epochs=2)
    assert len(history.history["val_loss"]) == 2
    history = kf.recipes.small_data(
        model, x[:48], names[y[:48]], validation_data=(x[48:], names[y[48:]]), max_epochs=1
    )
    assert len(history.history["val_loss"]) == 1


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"validation_split": 0.0}, "validation_split"),
        ({"validation_split": 1.5}, "validation_split"),
        ({"seed": -1}, "seed"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"patience": 1}, "patience"),
        ({"lr_patience": 0}, "lr_patience"),
        ({"lr_patience": 2.5}, "lr_patience"),
        ({"compile": "yes"}, "compile"),
        ({"callbacks": "EarlyStopping"}, "callbacks"),
        ({"validation_data": [1, 2]}, "validation_data"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    x, y = kf.datasets.sequence_classification(n=20, length=16, features=2)
    with pytest.raises(ValueError, match=name):
        kf.recipes.small_data(small_model(), x, y, **kwargs)


def test_bad_settings_name_the_argument():
    with pytest.raises(ValueError, match="max_batch_size"):
        kf.recipes.small_data_settings(10, min_batch_size=8, max_batch_size=4)
    with pytest.raises(ValueError, match="num_train"):
        kf.recipes.small_data_settings(0)
