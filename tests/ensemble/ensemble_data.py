"""Data and small members shared by the ensemble tests.

The feature-subset setting: `y = [x0 + x1 + x2 > 0]` for standard normal features (three
more columns are noise). Each member sees only two of the three useful features (a frozen
selection layer picks them), so each alone is right about 80% of the time (the angle
between `x0 + x1` and `x0 + x1 + x2` gives 1 - arccos(sqrt(2/3)) / pi = 0.80), while the
members' errors differ: averaging or stacking their outputs recovers most of the missing
feature, which is why the ensembles beat their best member here.
"""

import keras
import numpy as np

from tests import helpers

SUBSETS = ((0, 1), (1, 2), (0, 2))
WIDTH = 6


def subset_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, WIDTH)).astype("float32")
    y = (x[:, 0] + x[:, 1] + x[:, 2] > 0).astype("int32")
    return x, y


def subset_member(features, name, from_logits=False):
    """Logistic regression on the chosen features of a (batch, 6) input named "x"."""
    inputs = keras.Input((WIDTH,), name="x")
    select = keras.layers.Dense(len(features), use_bias=False, trainable=False, name="select")
    out = keras.layers.Dense(1, activation=None if from_logits else "sigmoid", name="out")(
        select(inputs)
    )
    model = keras.Model(inputs, out, name=name)
    kernel = np.zeros((WIDTH, len(features)), "float32")
    for j, f in enumerate(features):
        kernel[f, j] = 1.0
    select.set_weights([kernel])
    return model


def trained_members(x, y, from_logits=False, epochs=12):
    members = []
    for i, features in enumerate(SUBSETS):
        model = subset_member(features, f"member_{i}", from_logits=from_logits)
        model.compile(
            optimizer=keras.optimizers.Adam(0.1),
            loss=keras.losses.BinaryCrossentropy(from_logits=from_logits),
        )
        model.fit(x, y, epochs=epochs, batch_size=32, verbose=0)
        members.append(model)
    return members


def binary_accuracy(model, x, y, threshold=0.5):
    pred = np.asarray(model.predict(x, verbose=0)).reshape(-1)
    return float(np.mean((pred > threshold) == y))


def multimodal_member(name, from_logits=False, num_classes=2):
    """A tiny FusionModel on image + text + tabular inputs (kfusion.datasets)."""
    return helpers.multimodal_model("concat", num_classes, from_logits, name=name)
