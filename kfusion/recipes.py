"""Training recipes: one call that trains a model well on a kind of data.

A recipe turns the size of the training data into a whole training setup (validation
split, batch size, epoch budget, learning-rate schedule, early stopping) so the same call
works on every dataset of its kind, with every choice made on a validation split of the
training data, never on test data. `small_data` suits the few hundred to few thousand
samples of the UCR/UEA time-series archive, tabular studies and most notebooks.

From Python:

    history = kf.recipes.small_data(model, x_train, y_train)

From a spec (`kfusion train`): `recipe: small_data`, or a mapping with the recipe's
options, `recipe: {name: small_data, max_epochs: 200}`.
"""

import keras
import numpy as np

from kfusion import _checks

__all__ = ["small_data", "small_data_settings"]

RECIPES = ("small_data",)


def small_data_settings(
    num_train,
    max_epochs=300,
    patience=40,
    min_batch_size=8,
    max_batch_size=16,
    lr_patience=None,
):
    """The `small_data` recipe's settings for `num_train` training rows.

    The batch is a tenth of the rows, between `min_batch_size` and `max_batch_size`
    (as in Ismail Fawaz et al. 2019, *Deep learning for time series classification: a
    review*: `min(n / 10, 16)`), so even 40 rows make several steps an epoch. The
    learning rate halves when the validation loss has not improved for `lr_patience`
    epochs (by default `patience // 4`, at least 2; down to 1e-5; Wang et al. 2017 and
    Fawaz et al. use ReduceLROnPlateau), and
    training stops after `patience` epochs without a better epoch, restoring the best
    epoch's weights (`kf.callbacks.BestEpoch`: the highest validation accuracy, ties
    broken by the lowest validation loss, each by more than 1e-3; models without an
    accuracy metric, by loss alone). On a validation split of 10-40 series the loss
    alone can rank an untrained first epoch above a trained, over-confident model.
    `max_epochs` bounds it all.

    Args:
        num_train: int >= 1, the rows the model trains on (after the validation split).
        max_epochs: int >= 1, the most epochs. Defaults to 300.
        patience: int >= 4, epochs without a better epoch before stopping. Defaults to
            40.
        min_batch_size: int >= 1. Defaults to 8.
        max_batch_size: int >= `min_batch_size`. Defaults to 16.
        lr_patience: None, or int >= 1: epochs of flat validation loss before the
            learning rate halves. Defaults to None: `max(2, patience // 4)`.

    Returns:
        A dict: `batch_size`, `epochs`, and `callbacks` (fresh keras callback objects:
        `kf.callbacks.StopOnNaN`, `ReduceLROnPlateau`, `kf.callbacks.BestEpoch`).

    Example:

    >>> from kfusion.recipes import small_data_settings
    >>> settings = small_data_settings(40)
    >>> settings["batch_size"], settings["epochs"]
    (8, 300)
    >>> [type(c).__name__ for c in settings["callbacks"]]
    ['StopOnNaN', 'ReduceLROnPlateau', 'BestEpoch']
    """
    from kfusion.callbacks import BestEpoch, StopOnNaN

    num_train = _checks.check_int("num_train", num_train)
    max_epochs = _checks.check_int("max_epochs", max_epochs)
    patience = _checks.check_int("patience", patience, minimum=4)
    min_batch_size = _checks.check_int("min_batch_size", min_batch_size)
    max_batch_size = _checks.check_int("max_batch_size", max_batch_size, minimum=min_batch_size)
    if lr_patience is None:
        lr_patience = max(2, patience // 4)
    lr_patience = _checks.check_int("lr_patience", lr_patience)
    batch_size = int(np.clip(num_train // 10, min_batch_size, max_batch_size))
    callbacks = [
        StopOnNaN(),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.5, patience=lr_patience, min_lr=1e-5
        ),
        BestEpoch(patience=patience, min_delta=1e-3),
    ]
    return {"batch_size": batch_size, "epochs": max_epochs, "callbacks": callbacks}


def small_data(
    model,
    x,
    y,
    validation_data=None,
    validation_split=0.2,
    seed=0,
    learning_rate=1e-3,
    max_epochs=300,
    patience=40,
    lr_patience=None,
    compile=True,
    callbacks=None,
    verbose=0,
):
    """Trains `model` on small data with the `small_data` recipe; returns the History.

    1. Holds out a seeded validation split of `(x, y)`, stratified by class for class
       labels (`kf.datasets.train_validation_split`), unless `validation_data` is given.
    2. Compiles the model with Adam at `learning_rate` and the head's loss and metrics
       (unless `compile=False`, which keeps the user's compile).
    3. Fits with `small_data_settings` (batch size by data size, learning rate halved on
       a validation-loss plateau, early stopping restoring the best epoch's weights:
       best validation accuracy, then lowest validation loss). Inputs
       with `normalize="adapt"` are adapted on the training part only.

    Args:
        model: a `keras.Model` (a FusionModel, or one of `kf.ensemble`'s).
        x: training inputs (an array, or a dict input name -> array).
        y: training labels.
        validation_data: None, or `(x_val, y_val)` to validate on instead of a split.
        validation_split: float in (0, 1), the share of `(x, y)` held out. Defaults to
            0.2.
        seed: int >= 0, the seed of the split and of `keras.utils.set_random_seed`.
        learning_rate: float > 0, Adam's starting learning rate. Defaults to 1e-3.
        max_epochs: int >= 1. Defaults to 300.
        patience: int >= 4, epochs without a better epoch before stopping.
        lr_patience: None, or int >= 1, epochs of flat validation loss before the
            learning rate halves. Defaults to None: `max(2, patience // 4)`.
        compile: bool, whether to compile the model as above. Defaults to True.
        callbacks: more keras callbacks, run after the recipe's own.
        verbose: `fit`'s verbosity. Defaults to 0.

    Returns:
        The `keras.callbacks.History` of the fit; the model holds the best weights.

    Example:

    >>> import keras
    >>> import kfusion as kf
    >>> x, y = kf.datasets.sequence_classification(n=96, length=16, features=2)
    >>> model = kf.FusionModel(
    ...     inputs=keras.Input((16, 2), name="signal"),
    ...     branches=[kf.branches.CNN(filters=(8,))],
    ...     head=kf.heads.Classification(3),
    ... )
    >>> history = kf.recipes.small_data(model, x, y, max_epochs=3)
    >>> len(history.history["val_loss"])
    3
    """
    from kfusion.datasets import train_validation_split

    seed = _checks.check_int("seed", seed, minimum=0)
    learning_rate = _checks.check_positive_float("learning_rate", learning_rate)
    compile = _checks.check_bool("compile", compile)
    if callbacks is not None and not isinstance(callbacks, (list, tuple)):
        raise ValueError(f"`callbacks` must be a list of callbacks. Received: {callbacks!r}")
    keras.utils.set_random_seed(seed)
    if validation_data is None:
        if (
            isinstance(validation_split, bool)
            or not isinstance(validation_split, (int, float))
            or not 0.0 < validation_split < 1.0
        ):
            raise ValueError(
                "`validation_split` must be a float in (0, 1) (the recipe selects on a "
                f"validation split). Received: validation_split={validation_split!r}"
            )
        y = _encode(model, y)
        stratify = _is_classifier(model)
        (x, y), validation_data = train_validation_split(
            x, y, validation_split=validation_split, seed=seed, stratify=stratify
        )
    elif not isinstance(validation_data, tuple) or len(validation_data) != 2:
        raise ValueError(
            "`validation_data` must be a tuple (x_val, y_val). Received: "
            f"validation_data={type(validation_data).__name__}"
        )
    num_train = len(next(iter(x.values())) if isinstance(x, dict) else x)
    settings = small_data_settings(
        num_train, max_epochs=max_epochs, patience=patience, lr_patience=lr_patience
    )
    if compile:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate))
    return model.fit(
        x,
        y,
        validation_data=validation_data,
        batch_size=settings["batch_size"],
        epochs=settings["epochs"],
        callbacks=settings["callbacks"] + list(callbacks or []),
        shuffle=True,
        verbose=verbose,
    )


def _is_classifier(model):
    head = getattr(model, "head", None)
    return head is not None and callable(getattr(head, "class_ids", None))


def _encode(model, y):
    encode = getattr(model, "encode_labels", None)
    return encode(y) if callable(encode) else y
