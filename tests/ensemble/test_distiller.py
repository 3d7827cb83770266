import os

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion.datasets import digits
from tests import helpers
from tests.conftest import BACKEND, requires_tensorflow

JIT = BACKEND != "torch"
# Small models compile faster than XLA pays back on TensorFlow; JAX needs jit to be fast.
SMALL_JIT = BACKEND == "jax"


def _mlp(units, from_logits=False, name=None, num_classes=10, width=64):
    return kf.FusionModel(
        inputs=keras.Input((width,), name="pixels"),
        branches=[kf.branches.MLP(units=units)],
        head=kf.heads.Classification(num_classes, from_logits=from_logits),
        name=name,
    )


@pytest.fixture(scope="module")
def digit_data():
    x, y = digits(image=False)
    x = x.reshape(len(x), -1)
    return (x[:1300], y[:1300]), (x[1300:], y[1300:])


@pytest.fixture(scope="module")
def teacher(digit_data):
    keras.utils.set_random_seed(3)
    (x, y), _ = digit_data
    model = _mlp((128, 128), name="teacher")
    model.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=JIT)
    model.fit(x, y, epochs=10, batch_size=64, verbose=0)
    return model


def _accuracy(model, x, y):
    return float(np.mean(np.argmax(model.predict(x, verbose=0), -1) == y))


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_student_keeps_most_of_teacher_accuracy(digit_data, teacher):
    (x, y), (x_test, y_test) = digit_data
    teacher_weights = [np.array(w) for w in teacher.get_weights()]
    student = _mlp((16,), name="student")
    assert 4 * student.count_params() <= teacher.count_params()
    distiller = kf.ensemble.Distiller(teacher, student)  # the defaults, T=2 and alpha=0.5
    assert (distiller.temperature, distiller.alpha) == (2.0, 0.5)
    distiller.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=JIT)
    history = distiller.fit(x, y, epochs=10, batch_size=64, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    teacher_accuracy = _accuracy(teacher, x_test, y_test)
    # Chance is 0.1; the teacher reaches ~0.95 on held-out digits, the student ~0.93.
    assert teacher_accuracy >= 0.85
    assert _accuracy(distiller.student, x_test, y_test) >= 0.9 * teacher_accuracy
    assert "accuracy" in history.history  # the student head's default metric
    for before, after in zip(teacher_weights, teacher.get_weights()):
        np.testing.assert_array_equal(before, after)  # the teacher stays frozen


def test_distilled_student_beats_the_student_alone_on_noisy_labels(digit_data):
    """The defaults give a measured gain where the soft targets know more than the labels.

    A third of the 1,000 training labels are replaced at random. Trained alone for 30
    epochs, the student fits that noise (~0.89 held-out accuracy); the teacher, an average
    of three briefly trained MLPs (~0.94), is less swayed by it, and its soft targets carry
    the student to ~0.93 (Hinton et al. 2015; distillation under label noise: Li et al.
    2017, *Learning from Noisy Labels with Distillation*). Two seeds each way.
    """
    (x, y), (x_test, y_test) = digit_data
    x, y = x[:1000], y[:1000].copy()
    rng = np.random.default_rng(0)
    noisy = rng.random(len(y)) < 0.3
    y[noisy] = rng.integers(0, 10, int(noisy.sum()))
    keras.utils.set_random_seed(3)
    members = []
    for i in range(3):
        member = _mlp((64,), name=f"noisy_member_{i}")
        member.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=SMALL_JIT)
        member.fit(x, y, epochs=6, batch_size=64, verbose=0)
        members.append(member)
    teacher = kf.ensemble.average(members)
    alone, distilled = [], []
    for seed in (0, 1):
        for scores, distil in ((alone, False), (distilled, True)):
            keras.utils.set_random_seed(seed)
            student = _mlp((32,), name=f"student_{seed}_{int(distil)}")
            trained = kf.ensemble.Distiller(teacher, student) if distil else student
            trained.compile(optimizer=keras.optimizers.Adam(1e-2), jit_compile=SMALL_JIT)
            trained.fit(x, y, epochs=30, batch_size=64, verbose=0)
            scores.append(_accuracy(student, x_test, y_test))
    # Measured: alone 0.891 / 0.883, distilled 0.926 / 0.938 (497 test digits).
    assert np.mean(distilled) >= np.mean(alone) + 0.02, (distilled, alone)
    assert min(distilled) > max(alone) - 0.01, (distilled, alone)


def test_only_the_student_trains(teacher):
    student = _mlp((8,), name="small")
    distiller = kf.ensemble.Distiller(teacher, student)
    assert not teacher.trainable
    paths = {v.path for v in distiller.trainable_variables}
    assert paths == {v.path for v in student.trainable_variables}


def test_loss_matches_numpy_softmax(digit_data, teacher):
    (x, y), _ = digit_data
    x, y = x[:16], y[:16]
    student = _mlp((8,), from_logits=True, name="logit_student")  # logits vs probabilities
    t, alpha = 2.5, 0.3
    distiller = kf.ensemble.Distiller(teacher, student, temperature=t, alpha=alpha)
    distiller.compile(optimizer="adam")
    z_student = helpers.as_numpy(student(x))
    loss = helpers.as_numpy(distiller.compute_loss(x=x, y=y, y_pred=student(x)))

    p_teacher = helpers.as_numpy(teacher(x))
    log_t = _log_softmax(np.log(np.clip(p_teacher, 1e-7, 1.0)) / t)
    log_s = _log_softmax(z_student / t)
    kl = np.sum(np.exp(log_t) * (log_t - log_s), axis=-1).mean()
    hard = -_log_softmax(z_student)[np.arange(16), y].mean()
    expected = alpha * hard + (1 - alpha) * t**2 * kl
    np.testing.assert_allclose(loss, expected, rtol=1e-4)


def test_loss_matches_numpy_sigmoid():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 5)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    teacher = _mlp((8,), from_logits=True, name="t2", num_classes=2, width=5)
    student = _mlp((4,), name="s2", num_classes=2, width=5)
    distiller = kf.ensemble.Distiller(teacher, student, temperature=2.0, alpha=0.5)
    distiller.compile(optimizer="adam")
    p = helpers.as_numpy(student(x))[:, 0]
    z_t = helpers.as_numpy(teacher(x))[:, 0]
    loss = helpers.as_numpy(distiller.compute_loss(x=x, y=y, y_pred=student(x)))

    def two_class(z):
        return _log_softmax(np.stack([np.zeros_like(z), z], -1) / 2.0)

    log_t = two_class(z_t)
    log_s = two_class(np.log(np.clip(p, 1e-7, 1)) - np.log(np.clip(1 - p, 1e-7, 1)))
    kl = np.sum(np.exp(log_t) * (log_t - log_s), -1).mean()
    hard = -np.mean(y * np.log(np.clip(p, 1e-7, 1)) + (1 - y) * np.log(np.clip(1 - p, 1e-7, 1)))
    np.testing.assert_allclose(loss, 0.5 * hard + 0.5 * 4.0 * kl, rtol=1e-4)


def test_alpha_one_is_the_hard_loss_and_kl_of_equal_models_is_zero(digit_data, teacher):
    (x, y), _ = digit_data
    copy = kf.ensemble.soup([teacher])  # same weights as the teacher
    distiller = kf.ensemble.Distiller(teacher, copy, alpha=0.0)
    distiller.compile(optimizer="adam")
    soft = helpers.as_numpy(distiller.compute_loss(x=x[:8], y=y[:8], y_pred=copy(x[:8])))
    assert abs(float(soft)) < 1e-5
    hard_only = kf.ensemble.Distiller(teacher, _mlp((4,), name="s3"), alpha=1.0)
    hard_only.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    pred = hard_only.student(x[:8])
    expected = keras.losses.SparseCategoricalCrossentropy()(y[:8], pred)
    np.testing.assert_allclose(
        helpers.as_numpy(hard_only.compute_loss(x=x[:8], y=y[:8], y_pred=pred)),
        helpers.as_numpy(expected),
        rtol=1e-5,
    )


def test_student_saves_and_distiller_round_trips(tmp_path, digit_data, teacher):
    (x, y), _ = digit_data
    student = _mlp((8,), name="saved_student")
    distiller = kf.ensemble.Distiller(teacher, student, temperature=2.0, alpha=0.2)
    distiller.compile(optimizer="adam")
    distiller.fit(x[:128], y[:128], epochs=1, verbose=0)
    path = os.path.join(str(tmp_path), "student.keras")
    distiller.student.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        loaded.predict(x[:8], verbose=0), student.predict(x[:8], verbose=0), atol=1e-6
    )
    # The Distiller itself also saves and reloads (to resume distilling).
    whole = os.path.join(str(tmp_path), "distiller.keras")
    distiller.save(whole)
    reloaded = keras.saving.load_model(whole, safe_mode=True)
    assert isinstance(reloaded, kf.ensemble.Distiller)
    assert (reloaded.temperature, reloaded.alpha) == (2.0, 0.2)
    np.testing.assert_allclose(
        reloaded.predict(x[:8], verbose=0), distiller.predict(x[:8], verbose=0), atol=1e-6
    )
    reloaded.fit(x[:64], y[:64], epochs=1, verbose=0)


@requires_tensorflow
def test_student_saved_model_export(tmp_path, digit_data, teacher):
    import tensorflow as tf

    (x, _), _ = digit_data
    distiller = kf.ensemble.Distiller(teacher, _mlp((8,), name="exported"))
    path = kf.export.export(distiller.student, tmp_path / "saved", probe=x[:4])
    reloaded = tf.saved_model.load(path)
    np.testing.assert_allclose(
        helpers.as_numpy(reloaded.serve(x[:4])),
        distiller.student.predict(x[:4], verbose=0),
        atol=1e-5,
    )


# ---------------------------------------------------------------------------- bad input
BAD_ARGUMENTS = [
    ({"temperature": 0}, "temperature=0"),
    ({"temperature": -1.0}, "temperature=-1.0"),
    ({"alpha": 1.5}, "alpha=1.5"),
    ({"alpha": -0.1}, "alpha=-0.1"),
    ({"alpha": True}, "alpha=True"),
    ({"from_logits": "no"}, "from_logits='no'"),
]


def test_bad_arguments():
    teacher, student = _mlp((4,), name="t"), _mlp((2,), name="s")
    for kwargs, pattern in BAD_ARGUMENTS:
        with pytest.raises(ValueError, match=pattern.replace(".", r"\.")):
            kf.ensemble.Distiller(teacher, student, **kwargs)


def test_bad_models():
    teacher = _mlp((4,), name="t")
    with pytest.raises(ValueError, match="teacher='t'"):
        kf.ensemble.Distiller("t", _mlp((2,)))
    with pytest.raises(ValueError, match="student=.*'s'"):
        kf.ensemble.Distiller(teacher, _mlp((2,), name="s", num_classes=3))
    with pytest.raises(ValueError, match="same inputs"):
        kf.ensemble.Distiller(teacher, _mlp((2,), name="s", width=32))
    with pytest.raises(ValueError, match="teacher='t', student='t'"):
        kf.ensemble.Distiller(teacher, teacher)  # a frozen teacher as its own student
    regression = kf.FusionModel(
        inputs=keras.Input((64,), name="pixels"),
        branches=[kf.branches.MLP(units=(2,))],
        head=kf.heads.Regression(10),
        name="reg",
    )
    with pytest.raises(ValueError, match="student='reg'"):
        kf.ensemble.Distiller(teacher, regression)
    i = keras.Input((64,), name="pixels")
    plain = keras.Model(i, keras.layers.Dense(10, activation="softmax")(i), name="plain")
    distiller = kf.ensemble.Distiller(teacher, plain)
    with pytest.raises(ValueError, match="loss=None"):
        distiller.compile(optimizer="adam")
    with pytest.raises(ValueError, match="loss='no_such_loss'"):
        distiller.compile(optimizer="adam", loss="no_such_loss")
