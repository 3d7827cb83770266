"""Checks shared by the branch tests (names, padding invariance, input kinds)."""

import keras
import numpy as np

from tests import helpers

VOCAB = 20  # vocabulary of the token-id inputs
LENGTHS = [5, 3, 6, 1]  # their uneven rows, every one padded (T = 8)


def padded_token_ids(rng, lengths, total, vocab_size):
    """Right-padded int32 token ids (0 is padding), one row per entry of `lengths`."""
    ids = np.zeros((len(lengths), total), "int32")
    for i, length in enumerate(lengths):
        ids[i, :length] = rng.integers(1, vocab_size, size=length)
    return ids


def padded_sequences(rng, lengths, total, features, garbage=True):
    """Right-padded float32 sequences and their boolean mask.

    With `garbage=True` the padded steps hold large random values (a masked branch must
    ignore them); otherwise they are zero (what `keras.layers.Masking` expects).
    """
    x = rng.normal(size=(len(lengths), total, features)).astype("float32")
    mask = np.arange(total)[None, :] < np.asarray(lengths)[:, None]
    fill = 100.0 * rng.normal(size=x.shape).astype("float32") if garbage else 0.0
    x = np.where(mask[..., None], x, fill).astype("float32")
    return x, mask


def check_default_names(make_branch, prefix):
    """Two branches made without a name are `prefix` and `prefix_1`; a given name is kept."""
    keras.backend.clear_session()
    first, second = make_branch(), make_branch()
    assert first.name == prefix
    assert second.name == f"{prefix}_1"
    assert make_branch(name="custom").name == "custom"
    assert make_branch().name == f"{prefix}_2"


def randomize_weights(branch, seed=0, scale=0.5):
    """Gives every trainable weight (biases included) random values.

    Fresh layers have zero biases, and zero inputs then often leave a state or a step at
    zero: padding would look harmless even where it is not masked. Random weights expose it.
    """
    rng = np.random.default_rng(seed)
    for w in branch.trainable_weights:
        w.assign(scale * rng.normal(size=tuple(w.shape)).astype("float32"))


def _compare_rows(branch, padded_out, lengths, unpadded_rows, atol, call_kwargs=None):
    padded_out = helpers.as_numpy(padded_out)
    for i, (length, row) in enumerate(zip(lengths, unpadded_rows)):
        alone = helpers.as_numpy(branch(row, training=False, **(call_kwargs or {})))
        if padded_out.ndim == 3:  # pooling=None: the valid steps line up
            got = padded_out[i, :length]
            alone = alone[0, :length]
        else:
            got = padded_out[i]
            alone = alone[0]
        np.testing.assert_allclose(got, alone, atol=atol, rtol=1e-4, err_msg=f"row {i}")


def check_token_padding_invariance(branch, ids, atol=1e-5):
    """Each row's output equals the output on its unpadded version (right-padding with 0).

    With `pooling=None` the valid steps must match and the output mask must be `ids != 0`.
    """
    lengths = [int(n) for n in (ids != 0).sum(axis=1)]
    assert len(set(lengths)) > 1 and max(lengths) < ids.shape[1], "need uneven padded rows"
    branch(ids)
    randomize_weights(branch)
    out = branch(ids, training=False)
    rows = [ids[i : i + 1, :length] for i, length in enumerate(lengths)]
    _compare_rows(branch, out, lengths, rows, atol)
    if len(out.shape) == 3:
        mask = helpers.as_numpy(branch.compute_mask(ids))
        np.testing.assert_array_equal(mask, ids != 0)
    return out


def check_sequence_padding_invariance(branch, x, mask, atol=1e-5):
    """A float sequence with a mask gives, per row, the output of the unpadded row.

    `x` holds arbitrary values at the padded steps: they must never matter.
    """
    lengths = [int(n) for n in mask.sum(axis=1)]
    assert len(set(lengths)) > 1 and max(lengths) < x.shape[1], "need uneven padded rows"
    branch(x, mask=mask)
    randomize_weights(branch)
    out = branch(x, mask=mask, training=False)
    rows = [x[i : i + 1, :length] for i, length in enumerate(lengths)]
    _compare_rows(branch, out, lengths, rows, atol)
    if len(out.shape) == 3:
        got_mask = helpers.as_numpy(branch.compute_mask(x, mask))
        np.testing.assert_array_equal(got_mask, mask)
    return out


def check_masking_layer_invariance(branch, x, mask, atol=1e-5):
    """`keras.layers.Masking` -> branch in a functional model: padding never changes rows.

    `x` must be zero at the padded steps (what Masking detects).
    """
    inputs = keras.Input(shape=x.shape[1:], dtype="float32")
    model = keras.Model(inputs, branch(keras.layers.Masking(0.0)(inputs)))
    randomize_weights(branch)
    out = helpers.as_numpy(model.predict(x, verbose=0))
    for i, length in enumerate(mask.sum(axis=1)):
        alone = helpers.as_numpy(branch(x[i : i + 1, :length], training=False))
        if out.ndim == 3:
            np.testing.assert_allclose(out[i, :length], alone[0], atol=atol, rtol=1e-4)
        else:
            np.testing.assert_allclose(out[i], alone[0], atol=atol, rtol=1e-4)
    return out


# --- the convolutional time-series branches (FCN, ResNet, InceptionTime)
def randomize(branch, seed=0):
    """Random weights and batch-norm statistics (fresh ones are an identity map)."""
    randomize_weights(branch, seed=seed, scale=0.4)
    rng = np.random.default_rng(seed + 1)
    for layer in branch._flatten_layers():
        if isinstance(layer, keras.layers.BatchNormalization):
            size = tuple(layer.moving_mean.shape)
            layer.moving_mean.assign(0.3 * rng.normal(size=size))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, size=size))


def np_conv1d_same(x, kernel, bias):
    k, steps = kernel.shape[0], x.shape[1]
    left = (k - 1) // 2  # keras "same": the extra step of an even window on the right
    padded = np.pad(x, ((0, 0), (left, k - 1 - left), (0, 0)))
    return sum(padded[:, j : j + steps] @ kernel[j] for j in range(k)) + bias


def np_batch_norm(x, layer):
    gamma, beta, mean, variance = layer.get_weights()
    return (x - mean) / np.sqrt(variance + layer.epsilon) * gamma + beta


def check_right_padding_under_a_mask(branch, rng, features=3, atol=1e-5):
    """Masking -> branch: 16 zero steps after every row, or rows of uneven lengths in one
    batch, change no output in inference mode (max abs difference <= atol).
    """
    inputs = keras.Input((None, features))
    model = keras.Model(inputs, branch(keras.layers.Masking(0.0)(inputs)))
    randomize(branch)
    x = rng.normal(size=(4, 12, features)).astype("float32")
    padded = np.concatenate([x, np.zeros((4, 16, features), "float32")], axis=1)
    expected = helpers.as_numpy(model(x, training=False))
    got = helpers.as_numpy(model(padded, training=False))
    if branch.pooling is None:
        assert np.all(got[:, 12:] == 0.0)
        got = got[:, :12]
    assert np.max(np.abs(got - expected)) <= atol
    lengths = [12, 7, 3, 1]
    uneven = np.where(np.arange(28)[None, :, None] < np.array(lengths)[:, None, None], padded, 0)
    got = helpers.as_numpy(model(uneven.astype("float32"), training=False))
    for i, length in enumerate(lengths):
        alone = helpers.as_numpy(model(x[i : i + 1, :length], training=False))[0]
        row = got[i, :length] if branch.pooling is None else got[i]
        assert np.max(np.abs(row - alone)) <= atol, (i, length)
