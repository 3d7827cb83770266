import keras
import numpy as np
import pytest

import kfusion as kf


def _classifier(num_classes=3, width=4):
    return kf.FusionModel(
        inputs=keras.Input((width,), name="x"),
        branches=[kf.branches.MLP(units=(16,))],
        head=kf.heads.Classification(num_classes),
    )


def _three_classes(n=150, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = np.digitize(x[:, 0] + 0.5 * x[:, 1], [-0.6, 0.6]).astype("int32")
    return x, y


def test_classification_scores_per_fold_and_summary():
    from sklearn.metrics import f1_score, precision_score, recall_score
    from sklearn.model_selection import StratifiedKFold

    x, y = _three_classes()
    models = []

    def build():
        models.append(_classifier())
        models[-1].compile(optimizer=keras.optimizers.Adam(0.03))
        return models[-1]

    result = kf.ensemble.cross_validate(
        build, x, y, folds=3, epochs=6, seed=4, fit_kwargs={"batch_size": 16}
    )
    assert len({id(m) for m in models}) == 3  # a fresh model per fold
    folds = result["folds"]
    assert [f["fold"] for f in folds] == [0, 1, 2]
    assert sum(f["test_size"] for f in folds) == len(y)
    assert all(f["train_size"] + f["test_size"] == len(y) for f in folds)
    names = ["accuracy", "precision", "recall", "f1"]
    assert sorted(result["summary"]) == sorted(names)
    for name in names:
        values = [f[name] for f in folds]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert result["summary"][name]["mean"] == pytest.approx(np.mean(values))
        assert result["summary"][name]["std"] == pytest.approx(np.std(values))
    # The label is a linear rule of two features: well above the 1/3 of chance.
    assert result["summary"]["accuracy"]["mean"] >= 0.7
    # Each fold's scores are those of its model's predictions on its own test rows.
    splits = list(StratifiedKFold(3, shuffle=True, random_state=4).split(x, y))
    for fold, model, (_, test) in zip(folds, models, splits):
        pred = np.argmax(model.predict(x[test], verbose=0), -1)
        assert fold["accuracy"] == pytest.approx(np.mean(pred == y[test]))
        kwargs = {"average": "macro", "labels": [0, 1, 2], "zero_division": 0}
        assert fold["precision"] == pytest.approx(precision_score(y[test], pred, **kwargs))
        assert fold["recall"] == pytest.approx(recall_score(y[test], pred, **kwargs))
        assert fold["f1"] == pytest.approx(f1_score(y[test], pred, **kwargs))
        # Stratified: every fold holds each class in about its overall share.
        counts = np.bincount(y[test], minlength=3) / len(test)
        np.testing.assert_allclose(counts, np.bincount(y, minlength=3) / len(y), atol=0.06)


def test_regression_mae_rmse_with_dict_inputs():
    rng = np.random.default_rng(2)
    x = {
        "a": rng.normal(size=(60, 3)).astype("float32"),
        "b": rng.normal(size=(60, 2)).astype("float32"),
    }
    y = (2 * x["a"][:, 0] - x["b"][:, 1]).astype("float32")
    models = []

    def build():
        models.append(
            kf.FusionModel(
                inputs={"a": keras.Input((3,)), "b": keras.Input((2,))},
                branches={"a": [kf.branches.MLP(units=(8,))], "b": [kf.branches.MLP(units=(8,))]},
                head=kf.heads.Regression(),
            )
        )
        return models[-1]  # uncompiled FusionModel: compiled with its head's loss

    result = kf.ensemble.cross_validate(build, x, y, folds=2, epochs=2, task="regression")
    assert [f["test_size"] for f in result["folds"]] == [30, 30]
    assert sorted(result["summary"]) == ["mae", "rmse"]
    assert all(m.compiled for m in models)
    for fold in result["folds"]:
        assert 0 <= fold["mae"] <= fold["rmse"]
    # Recompute the last fold's scores from its model (KFold, shuffled with the seed).
    from sklearn.model_selection import KFold

    _, test = list(KFold(2, shuffle=True, random_state=0).split(y))[-1]
    pred = models[-1].predict({k: v[test] for k, v in x.items()}, verbose=0)[:, 0]
    error = pred - y[test]
    assert result["folds"][-1]["mae"] == pytest.approx(np.mean(np.abs(error)), rel=1e-5)
    assert result["folds"][-1]["rmse"] == pytest.approx(np.sqrt(np.mean(error**2)), rel=1e-5)


# ---------------------------------------------------------------------------- bad input
BAD_ARGUMENTS = [
    ({"folds": 1}, "folds=1"),
    ({"folds": 2.5}, "folds=2.5"),
    ({"epochs": 0}, "epochs=0"),
    ({"task": "ranking"}, "task='ranking'"),
    ({"seed": -1}, "seed=-1"),
    ({"fit_kwargs": [1]}, r"fit_kwargs=\[1\]"),
    ({"fit_kwargs": {"epochs": 3}}, "fit_kwargs=.*'epochs'"),
    ({"folds": 30}, "folds=30"),  # more folds than the smallest class has samples
    ({"folds": 200}, "folds=200"),  # more folds than samples
]


def test_bad_arguments():
    x, y = _three_classes(n=60)
    for kwargs, pattern in BAD_ARGUMENTS:
        with pytest.raises(ValueError, match=pattern):
            kf.ensemble.cross_validate(_classifier, x, y, **kwargs)


def test_bad_data_and_build_fn():
    x, y = _three_classes(n=60)
    with pytest.raises(ValueError, match="build_fn='model'"):
        kf.ensemble.cross_validate("model", x, y)
    with pytest.raises(ValueError, match="60 rows in x and 59 in y"):
        kf.ensemble.cross_validate(_classifier, x, y[:59])
    with pytest.raises(ValueError, match="build_fn\\(\\) -> None"):
        kf.ensemble.cross_validate(lambda: None, x, y, folds=2, epochs=1)

    def plain():
        i = keras.Input((4,))
        return keras.Model(i, keras.layers.Dense(3)(i), name="plain")

    with pytest.raises(ValueError, match="uncompiled 'plain'"):
        kf.ensemble.cross_validate(plain, x, y, folds=2, epochs=1)
    with pytest.raises(ValueError, match="one integer label per sample"):
        kf.ensemble.cross_validate(_classifier, x, np.eye(3)[y], folds=2, epochs=1)


def test_plain_logit_classifier_is_thresholded_at_zero_with_from_logits():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(120, 3)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    models = []

    def build():
        i = keras.Input((3,))
        models.append(keras.Model(i, keras.layers.Dense(1)(i)))  # one logit, no sigmoid
        models[-1].compile(
            optimizer=keras.optimizers.Adam(0.1),
            loss=keras.losses.BinaryCrossentropy(from_logits=True),
        )
        return models[-1]

    result = kf.ensemble.cross_validate(build, x, y, folds=2, epochs=3, from_logits=True)
    from sklearn.model_selection import StratifiedKFold

    splits = StratifiedKFold(2, shuffle=True, random_state=0).split(x, y)
    for fold, model, (_, test) in zip(result["folds"], models, splits):
        logits = model.predict(x[test], verbose=0)[:, 0]
        assert fold["accuracy"] == pytest.approx(np.mean((logits > 0) == y[test]))
    with pytest.raises(ValueError, match="from_logits='yes'"):
        kf.ensemble.cross_validate(build, x, y, folds=2, epochs=1, from_logits="yes")


def test_build_fn_returning_an_earlier_model_is_refused():
    # A model trained in fold 0 has seen fold 1's test rows: its score would leak.
    x, y = _three_classes(n=60)
    model = _classifier()
    with pytest.raises(ValueError, match="new model for every fold.*in fold 1"):
        kf.ensemble.cross_validate(lambda: model, x, y, folds=2, epochs=1)
