"""MinGRU and MinLSTM: the formulas, masks, directions, shapes, dtypes and saving."""

import re

import keras
import numpy as np
import pytest

from kfusion.layers import MinGRU, MinLSTM, _min_rnn
from tests import helpers
from tests.conftest import requires_tensorflow

CELLS = [MinGRU, MinLSTM]
B, T, F, U = 3, 11, 4, 5


@pytest.fixture
def x(rng):
    return (2.0 * rng.normal(size=(B, T, F))).astype("float32")


def lengths_mask(lengths, total):
    return np.arange(total)[None, :] < np.asarray(lengths)[:, None]


def randomize(layer, seed=0, scale=0.7):
    rng = np.random.default_rng(seed)
    for w in layer.trainable_weights:
        w.assign(scale * rng.normal(size=tuple(w.shape)).astype("float32"))


# ----------------------------------------------------------------------------- NumPy reference
def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _g(v):
    return np.where(v >= 0, v + 0.5, _sigmoid(v))


def numpy_cell(layer, x, mask=None, h0=None):
    """The paper's sequential recurrence, step by step in float64; every step's state."""
    x = x.astype("float64")
    k = [x @ w.get_weights()[0] + w.get_weights()[1] for w in layer.projection_layers]
    h = np.zeros((x.shape[0], layer.units)) if h0 is None else h0.astype("float64")
    steps = range(x.shape[1])
    if layer.go_backwards:
        steps = reversed(steps)
    states = []
    for t in steps:
        if isinstance(layer, MinGRU):
            z = _sigmoid(k[0][:, t])
            new = (1.0 - z) * h + z * _g(k[1][:, t])
        else:
            f, i = _sigmoid(k[0][:, t]), _sigmoid(k[1][:, t])
            new = f / (f + i) * h + i / (f + i) * _g(k[2][:, t])
        h = new if mask is None else np.where(mask[:, t : t + 1], new, h)
        states.append(h)
    return np.stack(states, axis=1)


# ----------------------------------------------------------------------------- config
@pytest.mark.parametrize("cls", CELLS)
def test_config_roundtrip(cls):
    layer = cls(
        7,
        return_sequences=True,
        go_backwards=True,
        dropout=0.2,
        kernel_initializer="he_normal",
        bias_initializer="ones",
        chrono_init=False,
    )
    clone = helpers.check_config_roundtrip(layer)
    assert clone.units == 7 and clone.return_sequences and clone.go_backwards
    assert clone.dropout == 0.2 and not clone.chrono_init


@pytest.mark.parametrize("length", [40, None])
def test_chrono_initialisation_spreads_the_memory_up_to_the_length(length):
    """The gates start with memories of 2..T_max steps (T_max = 40, or 1000 unknown)."""
    t_max = length or 1000
    gru, lstm = MinGRU(64), MinLSTM(64)
    gru.build((None, length, 3))
    lstm.build((None, length, 3))
    update = 1.0 / (1.0 + np.exp(-helpers.as_numpy(gru.projection_layers[0].bias)))
    memory = 1.0 / update  # steps over which a unit keeps 1/e of its state, about
    assert memory.min() >= 2.0 - 1e-4 and memory.max() <= t_max + 1e-3
    assert memory.max() > t_max / 2  # spread, not all short
    forget, inputs = (helpers.as_numpy(p.bias) for p in lstm.projection_layers[:2])
    np.testing.assert_allclose(forget, -inputs)
    np.testing.assert_allclose(helpers.as_numpy(lstm.projection_layers[2].bias), 0.0)
    off = MinGRU(4, chrono_init=False)
    off.build((None, length, 3))
    np.testing.assert_allclose(helpers.as_numpy(off.projection_layers[0].bias), 0.0)


# ----------------------------------------------------------------------------- formula
@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("go_backwards", [False, True])
def test_matches_the_sequential_recurrence_with_and_without_a_mask(cls, go_backwards, x):
    """Every step (the chunked scan) and the final state (the log-sum-exp) match the
    recurrence run step by step, and masked steps leave the state unchanged."""
    steps = cls(U, return_sequences=True, go_backwards=go_backwards)
    final = cls(U, go_backwards=go_backwards)
    steps(x), final(x)
    randomize(steps)
    final.set_weights(steps.get_weights())
    mask = lengths_mask([T, 6, 1], T)
    for m in (None, mask):
        expected = numpy_cell(steps, x, m)
        np.testing.assert_allclose(
            helpers.as_numpy(steps(x, mask=m)), expected, rtol=1e-4, atol=1e-5
        )
        np.testing.assert_allclose(
            helpers.as_numpy(final(x, mask=m)), expected[:, -1], rtol=1e-4, atol=1e-5
        )


@pytest.mark.parametrize("cls", CELLS)
def test_long_sequences_and_lengths_known_only_at_run_time(cls, rng):
    """600 steps (chunks of chunks, a partial last chunk), eagerly and in a model whose
    length is None (the run-time path): the same states as the recurrence."""
    x = rng.normal(size=(2, 600, 2)).astype("float32")
    layer = cls(3, return_sequences=True)
    layer(x)
    randomize(layer, scale=1.0)
    expected = numpy_cell(layer, x)
    np.testing.assert_allclose(helpers.as_numpy(layer(x)), expected, rtol=1e-4, atol=1e-5)
    inputs = keras.Input((None, 2))
    model = keras.Model(inputs, layer(inputs))
    got = model.predict(x, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_scan_pieces_match_a_float64_reference(rng):
    """The private scan and final state, on pairs with strong decay, at lengths around the
    chunk boundaries."""

    def reference(la, lb):
        h, out = np.full(la[:, 0].shape, -np.inf), []
        for t in range(la.shape[1]):
            h = np.logaddexp(la[:, t] + h, lb[:, t])
            out.append(h)
        return np.stack(out, axis=1)

    for length in (1, 2, 16, 17, 257):
        la = -3.0 * rng.random((2, length, 3))
        lb = rng.normal(size=(2, length, 3))
        expected = reference(la, lb)
        a = keras.ops.convert_to_tensor(la.astype("float32"))
        b = keras.ops.convert_to_tensor(lb.astype("float32"))
        got = helpers.as_numpy(_min_rnn.log_states(a, b))
        np.testing.assert_allclose(got, expected, atol=2e-5, err_msg=f"T={length}")
        last = helpers.as_numpy(_min_rnn.log_final_state(a, b))
        np.testing.assert_allclose(last, expected[:, -1], atol=2e-5, err_msg=f"T={length}")


@pytest.mark.parametrize("cls", CELLS)
def test_initial_state(cls, x, rng):
    h0 = rng.uniform(-1.0, 1.0, size=(B, U)).astype("float32")
    layer = cls(U, return_sequences=True)
    layer(x)
    randomize(layer)
    expected = numpy_cell(layer, x, h0=h0)
    got = helpers.as_numpy(layer(x, initial_state=[h0]))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    final = cls(U)
    final(x)
    final.set_weights(layer.get_weights())
    got = helpers.as_numpy(final(x, initial_state=h0))
    np.testing.assert_allclose(got, expected[:, -1], rtol=1e-4, atol=1e-5)


def test_weight_count():
    gru, lstm = MinGRU(U), MinLSTM(U)
    gru.build((None, None, F))
    lstm.build((None, None, F))
    assert gru.count_params() == 2 * (F * U + U)
    assert lstm.count_params() == 3 * (F * U + U)


# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("cls", CELLS)
def test_padding_with_garbage_changes_nothing(cls, x, rng):
    lengths = [T, 7, 2]
    padded = np.concatenate([x, 1e3 * rng.normal(size=(B, 5, F)).astype("float32")], axis=1)
    mask = lengths_mask(lengths, T + 5)
    for return_sequences in (True, False):
        layer = cls(U, return_sequences=return_sequences)
        layer(x)
        randomize(layer)
        out = helpers.as_numpy(layer(padded, mask=mask))
        for i, n in enumerate(lengths):
            alone = helpers.as_numpy(layer(x[i : i + 1, :n]))[0]
            got = out[i, :n] if return_sequences else out[i]
            np.testing.assert_allclose(got, alone, rtol=1e-5, atol=1e-6, err_msg=f"row {i}")


@pytest.mark.parametrize("cls", CELLS)
def test_bidirectional_wrapper(cls, x, tmp_path):
    """keras.layers.Bidirectional runs a go_backwards copy; masks and saving work."""
    layer = keras.layers.Bidirectional(cls(U, return_sequences=True))
    mask = lengths_mask([T, 6, 3], T)
    out = helpers.as_numpy(layer(x, mask=mask))
    assert out.shape == (B, T, 2 * U)
    forward = numpy_cell(layer.forward_layer, x, mask)
    backward = numpy_cell(layer.backward_layer, x, mask)[:, ::-1]
    for i, n in enumerate([T, 6, 3]):
        np.testing.assert_allclose(out[i, :n, :U], forward[i, :n], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(out[i, :n, U:], backward[i, :n], rtol=1e-4, atol=1e-5)
    helpers.check_saving(keras.layers.Bidirectional(cls(U)), x, tmp_path)


# ----------------------------------------------------------------------------- training, dtypes
@pytest.mark.parametrize("cls", CELLS)
def test_fit_step_with_dropout_and_masked_garbage(cls, x, rng):
    """Gradients stay finite with huge values at masked steps; dropout follows training."""
    x = x.copy()
    x[1, 6:] = 1e4
    inputs = keras.Input((T, F))
    masked = keras.layers.Masking(1e4)(inputs)
    layer = cls(U, dropout=0.3)
    model = keras.Model(inputs, keras.layers.Dense(1)(layer(masked)))
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    before = [np.array(w) for w in layer.get_weights()]
    history = model.fit(x, np.ones((B, 1), "float32"), epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert any(not np.allclose(b, a) for b, a in zip(before, layer.get_weights()))
    inference = helpers.as_numpy(layer(x[:1, :6], training=False))
    np.testing.assert_allclose(helpers.as_numpy(layer(x[:1, :6])), inference)
    assert not np.allclose(helpers.as_numpy(layer(x[:1, :6], training=True)), inference)


@pytest.mark.parametrize("cls, policy", [(MinGRU, "mixed_float16"), (MinLSTM, "mixed_bfloat16")])
def test_mixed_precision(cls, policy, x):
    layer, out = helpers.check_mixed_precision(lambda: cls(U, return_sequences=True), x, policy)
    reference = cls(U, return_sequences=True)
    reference(x)
    reference.set_weights(layer.get_weights())
    got = helpers.as_numpy(keras.ops.cast(out, "float32"))
    atol = 0.05 if "bfloat16" in policy else 0.01
    np.testing.assert_allclose(got, helpers.as_numpy(reference(x)), atol=atol)


@pytest.mark.parametrize("cls", CELLS)
def test_save_and_load(cls, x, tmp_path):
    helpers.check_saving(cls(U, return_sequences=True, go_backwards=True), x, tmp_path)


@requires_tensorflow
def test_saved_model_export(x, tmp_path):
    helpers.check_saved_model(MinLSTM(U, return_sequences=True), x, tmp_path)


def test_save_and_load_mixed_float16(x, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(MinGRU(U), x, tmp_path, atol=1e-2)


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"units": 0}, "units"),
        ({"units": 2.5}, "units"),
        ({"return_sequences": 1}, "return_sequences"),
        ({"go_backwards": "yes"}, "go_backwards"),
        ({"dropout": 1.0}, "dropout"),
        ({"kernel_initializer": "nope"}, "kernel_initializer"),
        ({"bias_initializer": None}, "bias_initializer"),
        ({"chrono_init": 1}, "chrono_init"),
    ],
)
@pytest.mark.parametrize("cls", CELLS)
def test_bad_arguments(cls, kwargs, name):
    kwargs = {"units": 4, **kwargs}
    with pytest.raises(ValueError, match=re.escape(name)):
        cls(**kwargs)


def test_bad_inputs(x):
    with pytest.raises(ValueError, match=r"\(batch, T, features\)"):
        MinGRU(4)(np.ones((2, 5), "float32"))
    with pytest.raises(ValueError, match="known number of features"):
        MinLSTM(4)(keras.Input((5, None)))
    layer = MinGRU(4)
    layer(x)
    with pytest.raises(ValueError, match=f"expected axis -1 of input shape to have value {F}"):
        layer(x[..., :2])
    with pytest.raises(ValueError, match="one state"):
        MinGRU(U)(x, initial_state=[np.zeros((B, U), "float32")] * 2)
