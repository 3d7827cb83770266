import weakref

import keras
import numpy as np

from kfusion import _checks
from kfusion.ensemble import _common

TASKS = ("classification", "regression")
CLASSIFICATION_METRICS = ("accuracy", "precision", "recall", "f1")
REGRESSION_METRICS = ("mae", "rmse")
_RESERVED_FIT_KWARGS = ("x", "y", "epochs", "validation_data", "validation_split")


def cross_validate(
    build_fn,
    x,
    y,
    folds=5,
    epochs=10,
    task="classification",
    seed=0,
    fit_kwargs=None,
    from_logits=None,
):
    """K-fold cross-validation with a fresh model per fold.

    The data is split into `folds` parts (Stone 1974, *Cross-validatory choice and
    assessment of statistical predictions*; Kohavi 1995): for each fold `k` a new model
    from `build_fn()` trains on the other parts and is scored on part `k`. Classification
    uses stratified folds (scikit-learn's `StratifiedKFold`: every fold keeps the class
    proportions), regression plain shuffled folds (`KFold`). Scores per fold:

        classification: accuracy, and macro-averaged precision, recall and F1
                        (each class counts the same, whatever its size)
        regression:     MAE = mean |y - y_hat|,  RMSE = sqrt(mean (y - y_hat)^2)

    and the summary is the mean and (population) standard deviation over the folds.
    Fold `k` seeds keras with `seed + k` (`keras.utils.set_random_seed`) before building
    its model, so a run is repeatable.

    Args:
        build_fn: a callable with no arguments returning a new compiled `keras.Model`
            (an uncompiled `FusionModel` is compiled with `optimizer="adam"` and its
            head's loss). Classifiers return probabilities or logits `(batch, K)` (one
            unit: binary, threshold 0.5 on probabilities, 0 on logits; see
            `from_logits`). Each call must return a new model, never one returned before.
        x: a NumPy array, or a dict of arrays with one row per sample.
        y: NumPy array of targets (integer labels for classification).
        folds: int >= 2, the number of folds.
        epochs: int >= 1, epochs per fold.
        task: `"classification"` or `"regression"`.
        seed: int >= 0, seed of the split and of each fold's model.
        fit_kwargs: dict of extra `fit` arguments (`batch_size`, `callbacks`, ...).
        from_logits: None (a FusionModel's head says whether it outputs logits; any other
            model is taken to output probabilities), or a bool for every model. Decides
            the threshold of a one-unit classifier.

    Returns:
        A dict: `"folds"`, a list with one dict per fold (`"fold"`, `"train_size"`,
        `"test_size"` and the scores), and `"summary"`, a dict score name ->
        `{"mean": ..., "std": ...}`.

    Raises:
        ValueError: for a bad argument (named with its value), `x` and `y` of different
            lengths, fewer samples of a class than folds, or a `build_fn` that returns a
            model it returned for an earlier fold.

    Example:

    >>> import keras, numpy as np
    >>> import kfusion as kf
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(60, 4)).astype("float32")
    >>> y = (x[:, 0] > 0).astype("int32")
    >>> def build():
    ...     return kf.FusionModel(
    ...         inputs=keras.Input((4,)),
    ...         branches=[kf.branches.MLP(units=(8,))],
    ...         head=kf.heads.Classification(2),
    ...     )
    >>> result = kf.ensemble.cross_validate(build, x, y, folds=3, epochs=1)
    >>> len(result["folds"]), sorted(result["summary"])
    (3, ['accuracy', 'f1', 'precision', 'recall'])
    """
    if not callable(build_fn):
        raise ValueError(
            f"`build_fn` must be a callable returning a new keras.Model. "
            f"Received: build_fn={build_fn!r}"
        )
    folds = _checks.check_int("folds", folds, minimum=2)
    epochs = _checks.check_int("epochs", epochs)
    task = _checks.check_choice("task", task, TASKS)
    seed = _checks.check_int("seed", seed, minimum=0)
    fit_kwargs = _check_fit_kwargs(fit_kwargs)
    from_logits = _common.check_from_logits(from_logits)
    n = _num_samples(x)
    y = np.asarray(y)
    if len(y) != n:
        raise ValueError(
            f"`x` and `y` must have one row per sample. Received: {n} rows in x and {len(y)} in y"
        )
    if folds > n:
        raise ValueError(
            f"`folds` cannot exceed the number of samples ({n}). Received: folds={folds}"
        )
    splits = _splits(y, n, folds, task, seed)
    classes = np.unique(y) if task == "classification" else None

    results = []
    built = []  # weak references: earlier folds' models may still be freed
    for k, (train, test) in enumerate(splits):
        keras.utils.set_random_seed(seed + k)
        model = build_fn()
        if not isinstance(model, keras.Model):
            raise ValueError(
                f"`build_fn` must return a keras.Model. Received: build_fn() -> {model!r}"
            )
        if any(ref() is model for ref in built):
            # A model trained in an earlier fold has seen this fold's test rows.
            raise ValueError(
                "`build_fn` must return a new model for every fold; it returned the model "
                f"of an earlier fold again. Received: build_fn() -> {model.name!r} in fold {k}"
            )
        built.append(weakref.ref(model))
        if not model.compiled:
            if hasattr(model, "head") and getattr(model, "head", None) is not None:
                model.compile(optimizer="adam")
            else:
                raise ValueError(
                    "`build_fn` must return a compiled model (or a FusionModel with a "
                    f"head). Received: build_fn() -> uncompiled {model.name!r}"
                )
        model.fit(_rows(x, train), y[train], epochs=epochs, **{"verbose": 0, **fit_kwargs})
        pred = model.predict(_rows(x, test), verbose=0)
        scores = _scores(model, y[test], pred, task, classes, from_logits)
        results.append({"fold": k, "train_size": len(train), "test_size": len(test), **scores})

    names = CLASSIFICATION_METRICS if task == "classification" else REGRESSION_METRICS
    summary = {
        name: {
            "mean": float(np.mean([r[name] for r in results])),
            "std": float(np.std([r[name] for r in results])),
        }
        for name in names
    }
    return {"folds": results, "summary": summary}


def _check_fit_kwargs(fit_kwargs):
    if fit_kwargs is None:
        return {}
    if not isinstance(fit_kwargs, dict):
        raise ValueError(
            f"`fit_kwargs` must be a dict of fit() arguments or None. "
            f"Received: fit_kwargs={fit_kwargs!r}"
        )
    clash = [k for k in _RESERVED_FIT_KWARGS if k in fit_kwargs]
    if clash:
        raise ValueError(
            f"`fit_kwargs` must not set {clash}: cross_validate chooses the data and the "
            f"epochs. Received: fit_kwargs={fit_kwargs!r}"
        )
    return dict(fit_kwargs)


def _num_samples(x):
    if isinstance(x, dict):
        if not x:
            raise ValueError("`x` must be an array or a non-empty dict of arrays. Received: x={}")
        lengths = {k: len(v) for k, v in x.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"Every array in `x` must have one row per sample. Received row counts {lengths}"
            )
        return next(iter(lengths.values()))
    try:
        return len(x)
    except TypeError as e:
        raise ValueError(
            f"`x` must be a NumPy array or a dict of them. Received: x={type(x).__name__}"
        ) from e


def _rows(x, index):
    if isinstance(x, dict):
        return {k: np.asarray(v)[index] for k, v in x.items()}
    return np.asarray(x)[index]


def _splits(y, n, folds, task, seed):
    from sklearn.model_selection import KFold, StratifiedKFold

    if task == "regression":
        return list(KFold(folds, shuffle=True, random_state=seed).split(np.zeros(n)))
    labels = y.reshape(n, -1)
    if labels.shape[1] != 1:
        raise ValueError(
            "task='classification' needs one integer label per sample (not one-hot or "
            f"multi-label). Received: y of shape {y.shape}"
        )
    labels = labels[:, 0]
    _, counts = np.unique(labels, return_counts=True)
    if counts.min() < folds:
        raise ValueError(
            f"Every class needs at least `folds` samples for stratified folds; the "
            f"smallest class has {counts.min()}. Received: folds={folds}"
        )
    return list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(n), labels))


def _scores(model, y_true, pred, task, classes, from_logits=None):
    flat = keras.tree.flatten(pred)
    if len(flat) != 1:
        raise ValueError(
            "cross_validate scores models with one output. Received: build_fn() -> a "
            f"model with {len(flat)} outputs"
        )
    pred = np.asarray(flat[0], dtype="float64")
    if task == "regression":
        error = pred.reshape(len(pred), -1) - np.asarray(y_true, "float64").reshape(len(pred), -1)
        return {
            "mae": float(np.mean(np.abs(error))),
            "rmse": float(np.sqrt(np.mean(error**2))),
        }
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if pred.ndim != 2:
        pred = pred.reshape(len(pred), -1)
    if len(model.outputs) == 1:
        space, _ = _common.output_kind(model, from_logits)
    else:
        space = "logits" if from_logits else "probabilities"
    labels_pred = _common.predicted_labels(pred, space)
    labels_true = np.asarray(y_true).reshape(-1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels_true, labels_pred, labels=classes, average="macro", zero_division=0
    )
    return {
        "accuracy": float(accuracy_score(labels_true, labels_pred)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
    }
