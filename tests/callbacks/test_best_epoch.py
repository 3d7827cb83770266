"""`kf.callbacks.BestEpoch`: early stopping on several values compared in order."""

import keras
import numpy as np
import pytest

import kfusion as kf


class Model:
    """Stands in for a keras model: a weight that records the epoch it was saved at."""

    def __init__(self):
        self.weights_value = -1
        self.stop_training = False

    def get_weights(self):
        return [np.array(self.weights_value)]

    def set_weights(self, weights):
        self.weights_value = int(weights[0])


def replay(callback, logs):
    model = Model()
    callback.set_model(model)
    callback.on_train_begin()
    for epoch, entry in enumerate(logs):
        model.weights_value = epoch
        callback.on_epoch_end(epoch, entry)
        if model.stop_training:
            break
    callback.on_train_end()
    return model, epoch


def test_accuracy_first_then_loss_and_it_restores_that_epoch():
    # Epoch 0 is the untrained model: chance accuracy, but the lowest loss. A
    # loss-only rule would restore it; the best epoch is 3 (best accuracy, and among
    # the epochs with that accuracy, the lowest loss).
    logs = [
        {"val_accuracy": 0.46, "val_loss": 0.59},
        {"val_accuracy": 0.85, "val_loss": 1.01},
        {"val_accuracy": 0.92, "val_loss": 0.73},
        {"val_accuracy": 0.92, "val_loss": 0.60},
        {"val_accuracy": 0.92, "val_loss": 0.63},
        {"val_accuracy": 0.85, "val_loss": 0.55},
        {"val_accuracy": 0.92, "val_loss": 0.61},
        {"val_accuracy": 0.92, "val_loss": 0.64},
    ]
    callback = kf.callbacks.BestEpoch(patience=3)
    model, last = replay(callback, logs)
    assert callback.best_epoch == 3
    assert callback.best == {"val_accuracy": 0.92, "val_loss": 0.60}
    assert last == 6 and callback.stopped_epoch == 6 and model.stop_training
    assert model.weights_value == 3  # the best epoch's weights are back
    # keras' EarlyStopping on the loss alone keeps the untrained epoch 0 here.
    loss_only, _ = replay(kf.callbacks.BestEpoch(monitor="val_loss", patience=3), logs)
    assert loss_only.weights_value == 0


def test_values_missing_from_the_logs_are_skipped_and_nan_ranks_last():
    logs = [{"val_loss": 0.9}, {"val_loss": float("nan")}, {"val_loss": 0.4}, {"val_loss": 0.5}]
    callback = kf.callbacks.BestEpoch(patience=5)  # a regression model logs no accuracy
    model, _ = replay(callback, logs)
    assert callback.best_epoch == 2 and model.weights_value == 2
    assert callback.stopped_epoch == 0  # ran to the end


def test_a_clear_error_when_nothing_monitored_is_logged():
    with pytest.raises(ValueError, match="val_accuracy.*Pass validation data"):
        replay(kf.callbacks.BestEpoch(), [{"loss": 0.3, "accuracy": 0.9}])


@pytest.mark.parametrize(
    "kwargs, name",
    [({"monitor": []}, "monitor"), ({"monitor": 3}, "monitor"), ({"patience": 0}, "patience")],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}="):
        kf.callbacks.BestEpoch(**kwargs)


def test_in_fit_it_restores_the_weights_of_the_best_epoch():
    x, y = kf.datasets.sequence_classification(n=96, length=16, features=2, seed=2)
    keras.utils.set_random_seed(0)
    model = kf.FusionModel(
        inputs=keras.Input((16, 2), name="signal"),
        branches=[kf.branches.CNN(filters=(8,))],
        head=kf.heads.Classification(3),
    )
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    best = kf.callbacks.BestEpoch(patience=4)
    history = model.fit(
        x[:72], y[:72], validation_data=(x[72:], y[72:]), epochs=12, callbacks=[best], verbose=0
    )
    acc, loss = history.history["val_accuracy"], history.history["val_loss"]
    expected = min(range(len(acc)), key=lambda i: (-acc[i], loss[i]))
    assert best.best_epoch == expected
    restored = model.evaluate(x[72:], y[72:], verbose=0, return_dict=True)
    assert restored["loss"] == pytest.approx(loss[expected], rel=1e-4)
    assert restored["accuracy"] == pytest.approx(acc[expected])


def test_changes_within_min_delta_are_ties_and_do_not_reset_patience():
    # A loss creeping down by 1e-4 an epoch at full accuracy is no real progress.
    logs = [{"val_accuracy": 1.0, "val_loss": 0.01 - 1e-4 * i} for i in range(10)]
    creeping = kf.callbacks.BestEpoch(patience=3, min_delta=1e-3)
    model, last = replay(creeping, logs)
    assert creeping.best_epoch == 0 and last == 3 and model.weights_value == 0
    every_step, _ = replay(kf.callbacks.BestEpoch(patience=3), logs)  # min_delta=0
    assert every_step.weights_value == 9
    with pytest.raises(ValueError, match="min_delta="):
        kf.callbacks.BestEpoch(min_delta=-1.0)
