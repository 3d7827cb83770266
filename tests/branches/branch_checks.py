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
