import re

import keras
import numpy as np
import pytest

from kfusion.branches import RNN
from tests import helpers
from tests.branches import branch_checks
from tests.branches.branch_checks import LENGTHS, VOCAB
from tests.conftest import requires_tensorflow


@pytest.fixture
def image_shape():
    return (6, 5, 2)


def make(kind, **kwargs):
    kwargs.setdefault("units", 4)
    if kind == "tokens":
        kwargs.setdefault("vocab_size", VOCAB)
        kwargs.setdefault("embedding_dim", 5)
    return RNN(**kwargs)


# ----------------------------------------------------------------------------- NumPy reference
def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_lstm(x, kernel, recurrent_kernel, bias):
    """Keras LSTM (gates i, f, c, o); returns every step's output (batch, T, units)."""
    units = recurrent_kernel.shape[0]
    h = np.zeros((x.shape[0], units), "float32")
    c = np.zeros_like(h)
    outputs = []
    for t in range(x.shape[1]):
        z = x[:, t] @ kernel + h @ recurrent_kernel + bias
        i, f, g, o = (z[:, k * units : (k + 1) * units] for k in range(4))
        c = sigmoid(f) * c + sigmoid(i) * np.tanh(g)
        h = sigmoid(o) * np.tanh(c)
        outputs.append(h)
    return np.stack(outputs, axis=1)


def np_gru(x, kernel, recurrent_kernel, bias):
    """Keras GRU with reset_after=True (gates z, r, h); every step's output."""
    units = recurrent_kernel.shape[0]
    input_bias, recurrent_bias = bias
    h = np.zeros((x.shape[0], units), "float32")
    outputs = []
    for t in range(x.shape[1]):
        xz = x[:, t] @ kernel + input_bias
        hz = h @ recurrent_kernel + recurrent_bias
        z = sigmoid(xz[:, :units] + hz[:, :units])
        r = sigmoid(xz[:, units : 2 * units] + hz[:, units : 2 * units])
        candidate = np.tanh(xz[:, 2 * units :] + r * hz[:, 2 * units :])
        h = z * h + (1.0 - z) * candidate
        outputs.append(h)
    return np.stack(outputs, axis=1)


# ----------------------------------------------------------------------------- config, names
def test_config_roundtrip():
    branch = RNN(
        units=6,
        cell="gru",
        bidirectional=True,
        num_layers=2,
        dropout=0.1,
        recurrent_dropout=0.2,
        pooling="max",
        output_dim=3,
        vocab_size=50,
        embedding_dim=4,
    )
    clone = helpers.check_config_roundtrip(branch)
    assert clone.cell == "gru" and clone.bidirectional and clone.num_layers == 2
    assert clone.recurrent_dropout == 0.2
    parallel = helpers.check_config_roundtrip(RNN(units=3, cell="minlstm", dropout=0.1))
    assert parallel.cell == "minlstm" and parallel.dropout == 0.1
    assert parallel.conv_kernel_size == 4  # "auto": a causal convolution for min cells


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"cell": "mingru"}, 4),
        ({"cell": "minlstm", "conv_kernel_size": "auto"}, 4),
        ({"cell": "mingru", "conv_kernel_size": None}, None),
        ({"cell": "lstm"}, None),
        ({"cell": "gru", "conv_kernel_size": 3}, 3),
    ],
)
def test_conv_kernel_size_resolves_and_roundtrips(kwargs, expected):
    branch = RNN(units=3, **kwargs)
    assert branch.conv_kernel_size == expected
    assert branch.get_config()["conv_kernel_size"] == expected
    assert (branch.conv is None) == (expected is None)
    assert helpers.check_config_roundtrip(branch).conv_kernel_size == expected


def test_config_saved_before_the_convolution_loads_without_one(seq):
    """A minGRU branch saved before `conv_kernel_size` existed had no convolution."""
    branch = RNN(units=4, cell="mingru", conv_kernel_size=None)
    branch(seq)
    config = branch.get_config()
    del config["conv_kernel_size"]
    clone = RNN.from_config(config)
    assert clone.conv is None
    clone(seq)
    clone.set_weights(branch.get_weights())
    np.testing.assert_allclose(helpers.as_numpy(clone(seq)), helpers.as_numpy(branch(seq)))


def test_default_names_are_unique():
    branch_checks.check_default_names(lambda **kw: RNN(units=4, **kw), "rnn_branch")


# ----------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("kind", ["tokens", "sequence", "image"])
@pytest.mark.parametrize("pooling", ["last", None])
def test_symbolic_matches_eager(inputs_by_kind, kind, pooling):
    branch = make(kind, pooling=pooling, bidirectional=True, num_layers=2)
    out = helpers.check_symbolic_matches_eager(branch, inputs_by_kind[kind])
    steps = {"tokens": 8, "sequence": 7, "image": 6}[kind]
    assert tuple(out.shape) == ((4, steps, 8) if pooling is None else (4, 8))


def test_unknown_lengths(rng):
    branch = make("tokens", pooling="mean")
    assert tuple(branch(keras.Input((None,), dtype="int32")).shape) == (None, 4)
    ids = branch_checks.padded_token_ids(rng, [3, 2], total=4, vocab_size=VOCAB)
    assert tuple(branch(ids).shape) == (2, 4)
    rows = RNN(units=3, pooling=None)
    assert tuple(rows(keras.Input((None, 5, 2))).shape) == (None, None, 3)
    assert tuple(rows(rng.normal(size=(2, 4, 5, 2)).astype("float32")).shape) == (2, 4, 3)


# ----------------------------------------------------------------------------- formula
def test_stacked_lstm_matches_numpy(seq):
    branch = RNN(units=4, num_layers=2, pooling="mean")
    branch(seq)
    branch_checks.randomize_weights(branch)  # non-zero biases
    out = helpers.as_numpy(branch(seq))
    h = np_lstm(seq, *branch.rnn_layers[0].get_weights())
    h = np_lstm(h, *branch.rnn_layers[1].get_weights())
    np.testing.assert_allclose(out, h.mean(axis=1), rtol=1e-4, atol=1e-5)


def test_bidirectional_gru_last_matches_numpy(seq):
    branch = RNN(units=4, cell="gru", bidirectional=True, pooling="last")
    branch(seq)
    branch_checks.randomize_weights(branch)  # non-zero biases
    out = helpers.as_numpy(branch(seq))
    layer = branch.rnn_layers[0]
    forward = np_gru(seq, *layer.forward_layer.get_weights())[:, -1]
    backward = np_gru(seq[:, ::-1], *layer.backward_layer.get_weights())[:, -1]
    np.testing.assert_allclose(out, np.concatenate([forward, backward], -1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_stacked_bidirectional_parallel_cells_match_numpy(seq, cell):
    from tests.layers.test_min_rnn import numpy_cell

    branch = RNN(
        units=4,
        cell=cell,
        bidirectional=True,
        num_layers=2,
        pooling="mean",
        conv_kernel_size=None,
    )
    branch(seq)
    branch_checks.randomize_weights(branch)
    out = helpers.as_numpy(branch(seq))
    h = seq
    for forward, backward in zip(branch.rnn_layers, branch.backward_layers):
        h = np.concatenate([numpy_cell(forward, h), numpy_cell(backward, h)[:, ::-1]], -1)
    np.testing.assert_allclose(out, h.mean(axis=1), rtol=1e-4, atol=1e-5)


def np_gelu(x):
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf)(x / np.sqrt(2.0)))


@pytest.mark.parametrize("cell", ["mingru", "minlstm"])
def test_causal_convolution_front_matches_numpy(seq, cell):
    """out = cell(LayerNorm(gelu(causal_conv(x)))): step t reads steps t-3..t only."""
    from tests.layers.test_min_rnn import numpy_cell

    branch = RNN(units=4, cell=cell, pooling=None)
    branch(seq)
    branch_checks.randomize_weights(branch)
    out = helpers.as_numpy(branch(seq))
    kernel, bias = branch.conv.get_weights()  # (4, features, units), (units,)
    x = np.pad(seq.astype("float64"), ((0, 0), (3, 0), (0, 0)))  # zeros before the start
    steps = seq.shape[1]
    conv = sum(x[:, j : j + steps] @ kernel[j] for j in range(4)) + bias
    h = np_gelu(conv)
    gamma, beta = branch.conv_norm.get_weights()
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    h = (h - mean) / np.sqrt(var + branch.conv_norm.epsilon) * gamma + beta
    expected = numpy_cell(branch.rnn_layers[0], h)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # Causal: changing the last step changes no earlier output.
    later = seq.copy()
    later[:, -1] += 5.0
    np.testing.assert_allclose(helpers.as_numpy(branch(later))[:, :-1], out[:, :-1], atol=1e-6)


def test_images_are_read_row_by_row(images):
    branch = RNN(units=4, pooling=None)
    branch(images)
    branch_checks.randomize_weights(branch)  # non-zero biases
    out = helpers.as_numpy(branch(images))
    rows = images.reshape(4, 6, 5 * 2)
    expected = np_lstm(rows, *branch.rnn_layers[0].get_weights())
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    assert branch.compute_mask(images) is None


def test_weight_count():
    branch = RNN(
        units=3, bidirectional=True, num_layers=2, vocab_size=10, embedding_dim=4, output_dim=2
    )
    branch.build((None, 7))
    lstm_0 = 4 * (4 * 3 + 3 * 3 + 3)  # 4 gates: kernel, recurrent kernel, bias
    lstm_1 = 4 * (6 * 3 + 3 * 3 + 3)  # reads [forward; backward] = 6 features
    expected = 10 * 4 + 2 * lstm_0 + 2 * lstm_1 + (6 * 2 + 2)
    assert branch.count_params() == expected

    gru = RNN(units=5, cell="gru")
    gru.build((None, 6, 2, 3))  # rows of 2 * 3 = 6 features
    assert gru.count_params() == 3 * (6 * 5 + 5 * 5 + 2 * 5)  # reset_after: two biases
    assert len(gru.trainable_weights) == 3


# ----------------------------------------------------------------------------- padding, masks
@pytest.mark.parametrize(
    "pooling, kwargs",
    [
        ("last", {"cell": "gru", "bidirectional": True}),
        ("mean", {"cell": "gru", "bidirectional": True}),
        ("max", {"cell": "gru", "bidirectional": True}),
        (None, {"cell": "gru", "bidirectional": True}),
        ("last", {"cell": "lstm", "bidirectional": True, "num_layers": 2}),
        (None, {"cell": "lstm", "bidirectional": True, "num_layers": 2}),
        ("last", {"cell": "mingru", "bidirectional": True}),
        (None, {"cell": "minlstm", "bidirectional": True, "num_layers": 2}),
    ],
)
def test_token_padding_never_changes_the_output(ids, pooling, kwargs):
    branch = make("tokens", pooling=pooling, **kwargs)
    branch_checks.check_token_padding_invariance(branch, ids)


@pytest.mark.parametrize(
    "pooling, cell", [("last", "lstm"), ("mean", "lstm"), ("max", "minlstm"), (None, "mingru")]
)
def test_masked_sequence_padding_never_changes_the_output(rng, pooling, cell):
    x, mask = branch_checks.padded_sequences(rng, LENGTHS, total=8, features=3)
    branch = make("sequence", pooling=pooling, cell=cell, num_layers=2)
    branch_checks.check_sequence_padding_invariance(branch, x, mask)


def test_masking_layer_padding_never_changes_the_output(rng):
    x, mask = branch_checks.padded_sequences(rng, LENGTHS, total=8, features=3, garbage=False)
    branch = make("sequence", cell="gru", bidirectional=True, pooling="last")
    branch_checks.check_masking_layer_invariance(branch, x, mask)


def test_pooling_none_returns_steps_and_mask(ids, rng):
    branch = make("tokens", pooling=None, bidirectional=True, output_dim=3)
    assert tuple(branch(ids).shape) == (4, 8, 3)
    np.testing.assert_array_equal(helpers.as_numpy(branch.compute_mask(ids)), ids != 0)
    symbolic = branch(keras.Input((8,), dtype="int32"))
    assert tuple(symbolic.shape) == (None, 8, 3)
    assert tuple(symbolic._keras_mask.shape) == (None, 8)

    x, mask = branch_checks.padded_sequences(rng, LENGTHS, total=8, features=3)
    seq_branch = make("sequence", pooling=None)
    assert tuple(seq_branch(x, mask=mask).shape) == (4, 8, 4)
    np.testing.assert_array_equal(helpers.as_numpy(seq_branch.compute_mask(x, mask)), mask)


def test_pooled_output_has_no_mask(ids):
    branch = make("tokens", pooling="last")
    branch(ids)
    assert branch.compute_mask(ids) is None


# ----------------------------------------------------------------------------- training, dtypes
@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("tokens", {"dropout": 0.1, "recurrent_dropout": 0.1}),
        ("sequence", {"cell": "gru", "bidirectional": True, "pooling": "mean"}),
        ("image", {"output_dim": 3}),
        ("sequence", {"cell": "minlstm", "bidirectional": True, "dropout": 0.1}),
    ],
)
def test_fit_step(inputs_by_kind, kind, kwargs):
    helpers.check_fit_step(make(kind, **kwargs), inputs_by_kind[kind])


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
@pytest.mark.parametrize(
    "kind, kwargs",
    [
        ("tokens", {"bidirectional": True, "pooling": "last"}),
        ("image", {"cell": "gru", "pooling": "max", "output_dim": 3}),
        ("tokens", {"cell": "mingru", "bidirectional": True, "num_layers": 2}),
    ],
)
def test_mixed_precision(inputs_by_kind, kind, kwargs, policy):
    branch, _ = helpers.check_mixed_precision(
        lambda: make(kind, **kwargs), inputs_by_kind[kind], policy
    )
    # LSTM/GRU gates and state run in float32; minGRU projects in the compute dtype (its
    # scan is float32 inside the layer); the output follows the policy.
    expected = keras.DTypePolicy(policy).compute_dtype if "min" in branch.cell else "float32"
    assert all(layer.compute_dtype == expected for layer in branch.rnn_layers)


@pytest.mark.parametrize(
    "kind, cell", [("tokens", "lstm"), ("image", "lstm"), ("tokens", "mingru")]
)
def test_save_and_load(inputs_by_kind, kind, cell, tmp_path):
    branch = make(kind, cell=cell, bidirectional=True, num_layers=2, output_dim=3)
    loaded = helpers.check_saving(branch, inputs_by_kind[kind], tmp_path)
    assert isinstance(loaded.layers[-1], RNN)


@requires_tensorflow
@pytest.mark.parametrize("cell", ["lstm", "minlstm"])
def test_saved_model_export(ids, cell, tmp_path):
    helpers.check_saved_model(make("tokens", cell=cell, bidirectional=True), ids, tmp_path)


# ----------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"units": 0}, "units"),
        ({"units": 2.5}, "units"),
        ({"cell": "rnn"}, "cell"),
        ({"bidirectional": 1}, "bidirectional"),
        ({"num_layers": 0}, "num_layers"),
        ({"dropout": 1.0}, "dropout"),
        ({"recurrent_dropout": -0.1}, "recurrent_dropout"),
        ({"cell": "mingru", "recurrent_dropout": 0.2}, "recurrent_dropout"),
        ({"pooling": "first"}, "pooling"),
        ({"output_dim": 0}, "output_dim"),
        ({"vocab_size": 1}, "vocab_size"),
        ({"embedding_dim": 0}, "embedding_dim"),
        ({"conv_kernel_size": 0}, "conv_kernel_size"),
        ({"conv_kernel_size": "wide"}, "conv_kernel_size"),
        ({"conv_kernel_size": 2.0}, "conv_kernel_size"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=re.escape(f"{name}={kwargs[name]!r}")):
        RNN(**kwargs)


def test_bad_inputs(seq):
    with pytest.raises(ValueError, match="cannot take input"):
        RNN(units=4)(np.ones((2, 3, 4, 5, 2), "float32"))  # rank 5
    with pytest.raises(ValueError, match="cannot take input"):
        RNN(units=4)(np.ones((2, 5), "float32"))  # float vectors
    with pytest.raises(ValueError, match="vocab_size"):
        RNN(units=4)(np.ones((2, 5), "int32"))  # token ids without vocab_size
    with pytest.raises(ValueError, match="cannot take input.*int32"):
        RNN(units=4)(np.ones((2, 5, 3), "int32"))  # an integer sequence
    with pytest.raises(ValueError, match="expects integer token ids"):
        RNN(units=4, vocab_size=VOCAB)(np.ones((2, 5), "float32"))
    with pytest.raises(ValueError, match="not a \\(batch, T\\) array of token ids"):
        RNN(units=4, vocab_size=VOCAB)(seq)
    with pytest.raises(ValueError, match="known image width"):
        RNN(units=4)(keras.Input((6, None, 3)))
    with pytest.raises(ValueError, match="known feature"):
        RNN(units=4)(keras.Input((5, None)))


def test_built_branch_rejects_another_image_width(images):
    branch = RNN(units=4)
    branch(images)  # rows of 5 * 2 features
    with pytest.raises(ValueError, match="expected axis -2 of input shape to have value 5"):
        branch(images[:, :, :4])


@pytest.mark.parametrize("cell, pooling", [("gru", "last"), ("lstm", "mean"), ("minlstm", "last")])
def test_save_and_load_mixed_float16(ids, cell, pooling, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    branch = make("tokens", cell=cell, bidirectional=True, pooling=pooling)
    helpers.check_saving_mixed_float16(branch, ids, tmp_path, atol=1e-3)


# ----------------------------------------------------------------------------- long sequences
@requires_tensorflow  # the learning is the backends' same math; one backend keeps CI short
def test_mingru_learns_a_marked_value_among_many_steps(rng, tmp_path):
    """150 steps, one marked: predict the sign of the marked value (chance 0.5).

    A minGRU branch learns to update its state at the marker only and carry it to the
    end; the trained model exports to ONNX and LiteRT with equal outputs (the final state
    is one log-sum-exp: no loop for the converters)."""
    from kfusion.export import export

    n, length = 384, 150
    values = rng.normal(size=(n, length)).astype("float32")
    marker = np.zeros((n, length), "float32")
    marker[np.arange(n), rng.integers(0, length, size=n)] = 1.0
    x = np.stack([values, marker], axis=-1)
    y = (np.sum(values * marker, axis=1) > 0).astype("int32")
    import kfusion as kf

    model = kf.FusionModel(
        inputs=keras.Input((length, 2), name="signal"),
        branches=[RNN(units=8, cell="mingru")],
        head=kf.heads.Classification(2),
    )
    model.compile(optimizer=keras.optimizers.Adam(0.02), metrics=["accuracy"])
    model.fit(x[:256], y[:256], epochs=20, batch_size=32, verbose=0)
    accuracy = model.evaluate(x[256:], y[256:], verbose=0, return_dict=True)["accuracy"]
    assert accuracy >= 0.9, accuracy
    for fmt, name in (("onnx", "m.onnx"), ("litert", "m.tflite")):
        export(model, str(tmp_path / name), format=fmt, probe=x[:4])
