import itertools
import os

import keras
import numpy as np
import pytest

import kfusion as kf
from tests import helpers
from tests.conftest import requires_tensorflow
from tests.ensemble import ensemble_data as data


def _base():
    return kf.FusionModel(
        inputs=keras.Input((data.WIDTH,), name="x"),
        branches=[kf.branches.MLP(units=(16,))],
        head=kf.heads.Classification(2),
    )


def _accuracy(model, x, y):
    return data.binary_accuracy(model, x, y)


@pytest.fixture(scope="module")
def ingredients():
    """Fine-tuned copies of one base model (as in Wortsman et al. 2022), plus a bad one."""
    keras.utils.set_random_seed(11)
    x, y = data.subset_data(700, seed=5)
    train, val = (x[:400], y[:400]), (x[400:], y[400:])
    base = _base()
    base.compile(optimizer=keras.optimizers.Adam(0.01))
    base.fit(*train, epochs=2, batch_size=32, verbose=0)
    models = []
    for i, rate in enumerate([3e-3, 1e-2, 2e-2]):
        keras.utils.set_random_seed(100 + i)
        model = kf.ensemble.soup([base])  # a copy of the base
        model.compile(optimizer=keras.optimizers.Adam(rate))
        model.fit(*train, epochs=2, batch_size=32, verbose=0)
        models.append(model)
    bad = kf.ensemble.soup([base])
    bad.compile(optimizer=keras.optimizers.Adam(0.05))
    bad.fit(train[0], 1 - train[1], epochs=2, batch_size=32, verbose=0)  # flipped labels
    models.append(bad)
    return models, val


def _mean(weight_lists):
    return [np.mean(ws, axis=0) for ws in zip(*weight_lists)]


def test_uniform_soup_is_the_weight_mean(ingredients):
    models, (x, y) = ingredients
    souped = kf.ensemble.soup(models[:3])
    expected = _mean([m.get_weights() for m in models[:3]])
    for got, want in zip(souped.get_weights(), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert type(souped) is type(models[0])
    assert souped is not models[0]
    # Fine-tuned from one start, the uniform soup stays a good model (~0.8 here).
    assert _accuracy(souped, x, y) >= min(_accuracy(m, x, y) for m in models[:3]) - 0.05


def test_greedy_soup_never_below_best_ingredient(ingredients):
    models, (x, y) = ingredients
    scores = [_accuracy(m, x, y) for m in models]
    assert scores[3] < 0.5 < max(scores)  # the flipped-label model is bad
    souped = kf.ensemble.soup(models, x, y, method="greedy")
    assert _accuracy(souped, x, y) >= max(scores)
    # The result is the mean of a subset of the ingredients that holds the best one.
    got = souped.get_weights()
    best = int(np.argmax(scores))
    matches = []
    for r in range(1, len(models) + 1):
        for subset in itertools.combinations(range(len(models)), r):
            mean = _mean([models[i].get_weights() for i in subset])
            if all(np.allclose(g, w, atol=1e-6) for g, w in zip(got, mean)):
                matches.append(subset)
    assert matches and all(best in s for s in matches), (matches, scores)


def test_greedy_soup_with_callable_and_error_metrics(ingredients):
    models, (x, y) = ingredients
    calls = []

    def balanced(y_true, y_pred):
        calls.append(1)
        labels = (y_pred[:, 0] > 0.5).astype(int)
        return np.mean([np.mean(labels[y_true == c] == c) for c in (0, 1)])

    souped = kf.ensemble.soup(models, x, y, method="greedy", metric=balanced)
    assert len(calls) >= len(models)
    best = max(balanced(y, m.predict(x, verbose=0)) for m in models)
    assert balanced(y, souped.predict(x, verbose=0)) >= best
    by_mse = kf.ensemble.soup(models, x, y.astype("float32"), method="greedy", metric="mse")

    def mse(model):
        return float(np.mean((model.predict(x, verbose=0)[:, 0] - y) ** 2))

    assert mse(by_mse) <= min(mse(m) for m in models) + 1e-6


def test_soup_of_a_compiled_model_is_compiled(ingredients):
    models, (x, y) = ingredients
    souped = kf.ensemble.soup(models[:2])
    assert souped.compiled
    assert np.isfinite(souped.evaluate(x, y, verbose=0, return_dict=True)["loss"])


def test_save_and_load(tmp_path, ingredients):
    models, (x, _) = ingredients
    souped = kf.ensemble.soup(models[:3])
    path = os.path.join(str(tmp_path), "soup.keras")
    souped.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        loaded.predict(x[:16], verbose=0), souped.predict(x[:16], verbose=0), atol=1e-6
    )


@requires_tensorflow
def test_saved_model_export(tmp_path, ingredients):
    import tensorflow as tf

    models, (x, _) = ingredients
    souped = kf.ensemble.soup(models[:3])
    path = kf.export.export(souped, tmp_path / "saved", format="saved_model", probe=x[:8])
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(
        helpers.as_numpy(reloaded.serve(x[:8])), souped.predict(x[:8], verbose=0), atol=1e-5
    )


# ---------------------------------------------------------------------------- bad input
def _dense(width, name):
    i = keras.Input((4,))
    return keras.Model(i, keras.layers.Dense(width)(i), name=name)


def test_different_architectures():
    with pytest.raises(ValueError, match="same architecture.*'a'.*'b'.*\\(4, 2\\) vs \\(4, 3\\)"):
        kf.ensemble.soup([_dense(2, "a"), _dense(3, "b")])
    i = keras.Input((4,))
    deeper = keras.Model(i, keras.layers.Dense(2)(keras.layers.Dense(2)(i)), name="c")
    with pytest.raises(ValueError, match="same architecture.*2 weights vs 4"):
        kf.ensemble.soup([_dense(2, "a"), deeper])


def test_bad_arguments():
    models = [_dense(2, "a"), _dense(2, "b")]
    x, y = np.zeros((4, 4), "float32"), np.zeros(4)
    with pytest.raises(ValueError, match="method='best'"):
        kf.ensemble.soup(models, method="best")
    with pytest.raises(ValueError, match="metric='auc'"):
        kf.ensemble.soup(models, x, y, method="greedy", metric="auc")
    with pytest.raises(ValueError, match="x_val=None"):
        kf.ensemble.soup(models, method="greedy")
    with pytest.raises(ValueError, match="y_val=None"):
        kf.ensemble.soup(models, x_val=x, method="greedy")
    with pytest.raises(ValueError, match="\\[4\\] row\\(s\\) in x_val and 3 in y_val"):
        kf.ensemble.soup(models, x, y[:3], method="greedy")
    with pytest.raises(ValueError, match="models=\\[\\]"):
        kf.ensemble.soup([])
    with pytest.raises(ValueError, match="models=<Functional"):
        kf.ensemble.soup(models[0])
