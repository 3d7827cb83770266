import keras

from kfusion import _checks
from kfusion.ensemble import _common
from kfusion.ensemble._layers import START_POINTS, FrozenMember, MetaLearner
from kfusion.ensemble.average import fresh_inputs

TASKS = ("classification", "regression")


def stack(models, meta=None, task=None, from_logits=None, start="average", name=None):
    """Stacks frozen base models under a meta learner trained on their outputs (one graph).

    Stacked generalisation (Wolpert 1992, *Stacked generalization*; Breiman 1996,
    *Stacked regressions*): the bases' outputs `f_1(x)..f_M(x)` become the features of
    a second-level model,

        y_hat = g([f_1(x); ...; f_M(x)])

    By default `g` is one Dense layer that starts at the ensemble average: for
    classification, multinomial logistic regression on the members' log-probabilities
    `l_m` (`log p_m`; the logit of each unit for sigmoid outputs),

        start="average":    y_hat = softmax(log(mean_m p_m) + [l_1; ...; l_M] W + b),  W = 0
        start="geometric":  y_hat = softmax([l_1; ...; l_M] W + b),       W = [I; ...; I] / M

    (a sigmoid per unit for one output unit or sigmoid heads), and for regression linear
    regression `y_hat = [f_1; ...; f_M] W + b` with `W = [I; ...; I] / M`; `b = 0`. So
    before any fitting the stacked model outputs exactly `kf.ensemble.average(models)`
    (or, with `start="geometric"`, the softmax of `average(models, mode="logits")`,
    the normalised geometric mean of the probabilities), and `fit` can only move it
    from there. A meta learner started from random weights on raw probabilities has to
    rediscover the average first: on digits with three members of 0.92-0.93 test
    accuracy it reached 0.83 after 20 epochs of Adam at its default step, where this
    one starts at the average's 0.960 and reaches 0.97 in 1-5 epochs
    (benchmarks/accuracy_ensembles.py measures both starts). The two starts differ
    little in accuracy; `"average"` is the default because it begins exactly where
    `average`, the usual baseline, is.

    Why the meta learner needs held-out data: on the examples a base model trained on,
    its outputs are better than they will ever be on new data (it has fit, partly
    memorised, those labels). A meta learner fit there learns to trust whichever base
    overfits most, and that trust does not carry over to new data. Fit the stacked model
    on a split the bases never saw (a held-out set, or out-of-fold predictions), then
    evaluate it on yet another split. The returned model makes that a plain `fit`: the
    bases are frozen (`trainable=False`, and always run in inference mode), so `fit`
    trains only the meta learner. The bases' own `trainable` flags are changed in place.
    With `M K^2` weights the meta learner can overfit a small held-out set: a few epochs
    (choose them on a validation split, or with `keras.callbacks.EarlyStopping`) keep it
    near the average it started from.

    Args:
        models: list of at least two built `keras.Model`s with the same inputs, each
            returning one tensor `(batch, K_m)` (the same K when `meta` is None).
        meta: None for the default learner (a `MetaLearner` layer named
            `"meta_learner"`), or a keras layer / model taking the concatenated outputs
            `(batch, sum_m K_m)` (no `Lambda`: it must load with `safe_mode=True`).
        task: `"classification"`, `"regression"`, or None: regression when every base is
            a FusionModel with a `Regression` head, classification otherwise. Chooses
            the default meta learner.
        from_logits: None or bool, what the bases output (see `kf.ensemble.average`);
            decides between softmax and sigmoid for the default classifier.
        start: `"average"` (default) or `"geometric"`: where the default classifier
            starts (above). Regression always starts at the mean.
        name: the stacked model's name. Defaults to `"stacked_ensemble"`.

    Returns:
        An uncompiled `keras.Model`; its only trainable weights are the meta learner's.
        The default classifier returns probabilities (compile with a loss taking
        probabilities, e.g. `"sparse_categorical_crossentropy"`).

    Raises:
        ValueError: for fewer than two models, different inputs, outputs that are not
            one `(batch, K)` tensor, an unknown `task` or `start`, a `meta` that is not
            a layer.

    Example:

    >>> import keras, numpy as np
    >>> import kfusion as kf
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(300, 4)).astype("float32")
    >>> y = (x[:, 0] + x[:, 1] > 0).astype("int32")
    >>> def base():
    ...     return kf.FusionModel(
    ...         inputs=keras.Input((4,), name="x"),
    ...         branches=[kf.branches.MLP(units=(8,))],
    ...         head=kf.heads.Classification(2),
    ...     )
    >>> bases = [base(), base()]
    >>> for model in bases:  # the bases train on the first 200 rows
    ...     model.compile(optimizer="adam")
    ...     _ = model.fit(x[:200], y[:200], epochs=1, verbose=0)
    >>> stacked = kf.ensemble.stack(bases)
    >>> averaged = kf.ensemble.average(bases)
    >>> bool(np.allclose(stacked.predict(x, verbose=0), averaged.predict(x, verbose=0)))
    True
    >>> stacked.compile(optimizer="adam", loss="binary_crossentropy")
    >>> _ = stacked.fit(x[200:], y[200:], epochs=2, verbose=0)  # held-out rows only
    >>> [w.path for w in stacked.trainable_weights]
    ['meta_learner/kernel', 'meta_learner/bias']
    >>> stacked.predict(x[:3], verbose=0).shape
    (3, 1)
    """
    models = _common.check_models(models)
    if task is not None:
        _checks.check_choice("task", task, TASKS)
    from_logits = _common.check_from_logits(from_logits)
    start = _checks.check_choice("start", start, START_POINTS)
    if meta is not None:
        if not isinstance(meta, keras.layers.Layer) or isinstance(meta, keras.layers.Lambda):
            raise ValueError(
                "`meta` must be None or a keras layer or model (not a Lambda layer: the "
                f"stacked model must load with safe_mode=True). Received: meta={meta!r}"
            )
    _common.check_unique_names(models)
    _common.check_same_inputs(models)
    if meta is None:
        _common.check_same_outputs(models)
    else:
        for model in models:
            _common.single_output(model)
    kinds = [_common.output_kind(m, from_logits) for m in models]
    if task is None:
        task = "regression" if all(k[0] == "values" for k in kinds) else "classification"

    inputs = fresh_inputs(models[0])
    outputs = [FrozenMember(m, name=f"frozen_{m.name}")(inputs) for m in models]
    features = keras.layers.Concatenate(dtype="float32", name="stacked_outputs")(outputs)
    if meta is None:
        if task == "regression":
            spaces, activation = ["values"] * len(models), "softmax"
        else:
            spaces = [space if space != "values" else "logits" for space, _ in kinds]
            width = int(models[0].outputs[0].shape[-1])
            activation = kinds[0][1] or ("sigmoid" if width == 1 else "softmax")
        meta = MetaLearner(
            len(models),
            input_spaces=spaces,
            activation=activation,
            start=start,
            dtype="float32",
            name="meta_learner",
        )
    return keras.Model(inputs, meta(features), name=name or "stacked_ensemble")
