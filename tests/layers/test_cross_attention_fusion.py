import keras
import numpy as np
import pytest

from kfusion.layers import CrossAttentionFusion
from tests import helpers
from tests.conftest import requires_tensorflow

JIT = helpers.BACKEND != "torch"


@pytest.fixture
def arrays(rng):
    # Two sequences of different lengths and widths, and one vector (one token).
    return [
        rng.normal(size=(6, 5, 3)).astype("float32"),
        rng.normal(size=(6, 4, 6)).astype("float32"),
        rng.normal(size=(6, 4)).astype("float32"),
    ]


def _valid_masks(arrays, rng, lengths=None):
    """Right-padding masks (True = real step) for the sequence inputs; None for vectors."""
    masks = []
    for i, a in enumerate(arrays):
        if a.ndim != 3:
            masks.append(None)
            continue
        steps = a.shape[1]
        n = (
            np.full(a.shape[0], lengths[i])
            if lengths
            else rng.integers(1, steps + 1, size=a.shape[0])
        )
        masks.append(np.arange(steps)[None, :] < np.reshape(n, (-1, 1)))
    return masks


def _layer_norm(x, gamma, beta, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_cross_attention(layer, arrays, masks):
    """The docstring formula on the layer's own weights, in NumPy (float64)."""
    tokens, valid = [], []
    for i, x in enumerate(arrays):
        x = x.astype("float64")
        if x.ndim == 2:
            x = x[:, None, :]
        kernel, bias = layer.projections[i].get_weights()
        tokens.append(x @ kernel + bias)
        m = masks[i] if masks[i] is not None and arrays[i].ndim == 3 else None
        valid.append(np.ones(x.shape[:2], bool) if m is None else np.asarray(m, bool))
    pooled = []
    for i, query in enumerate(tokens):
        others = [j for j in range(len(tokens)) if j != i]
        keys = np.concatenate([tokens[j] for j in others], axis=1)
        key_valid = np.concatenate([valid[j] for j in others], axis=1)
        attn = layer.attention_layers[i]
        wq, bq = attn._query_dense.get_weights()
        wk, bk = attn._key_dense.get_weights()
        wv, bv = attn._value_dense.get_weights()
        wo, bo = attn._output_dense.get_weights()
        q = np.einsum("btd,dnh->btnh", query, wq) + bq
        k = np.einsum("bsd,dnh->bsnh", keys, wk) + bk
        v = np.einsum("bsd,dnh->bsnh", keys, wv) + bv
        logits = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(q.shape[-1])
        logits = np.where(key_valid[:, None, None, :], logits, -np.inf)
        weights = _softmax(logits)
        heads = np.einsum("bnts,bsnh->btnh", weights, v)
        attended = np.einsum("btnh,nhd->btd", heads, wo) + bo
        gamma, beta = layer.layer_norms[i].get_weights()
        fused = _layer_norm(query + attended, gamma, beta)
        m = valid[i][..., None].astype("float64")
        pooled.append((fused * m).sum(1) / m.sum(1))
    return np.concatenate(pooled, axis=-1)


def _pad(array, extra, rng):
    """Right-pads a sequence with `extra` random (non-zero) steps."""
    noise = rng.normal(size=(array.shape[0], extra, array.shape[2])).astype(array.dtype)
    return np.concatenate([array, 10.0 * noise], axis=1)


def test_config_roundtrip():
    layer = CrossAttentionFusion(dim=8, num_heads=2, key_dim=3, dropout=0.1, name="xattn")
    clone = helpers.check_config_roundtrip(layer)
    assert (clone.dim, clone.num_heads, clone.key_dim, clone.dropout) == (8, 2, 3, 0.1)


@pytest.mark.parametrize("key_dim", [None, 3])
def test_symbolic_matches_eager(arrays, key_dim):
    out = helpers.check_symbolic_matches_eager(
        CrossAttentionFusion(dim=8, num_heads=2, key_dim=key_dim), arrays
    )
    assert tuple(out.shape) == (6, 3 * 8)


def test_unknown_sequence_lengths(arrays):
    inputs = [keras.Input((None, 3)), keras.Input((None, 6)), keras.Input((4,))]
    layer = CrossAttentionFusion(dim=8, num_heads=2)
    out = layer(inputs)
    assert tuple(out.shape) == (None, 24)
    model = keras.Model(inputs, out)
    assert model.predict(arrays, verbose=0).shape == (6, 24)
    # The same weights serve any sequence length.
    longer = [np.concatenate([arrays[0]] * 2, axis=1), arrays[1][:, :2], arrays[2]]
    assert model.predict(longer, verbose=0).shape == (6, 24)


def test_matches_numpy_formula(arrays, rng):
    layer = CrossAttentionFusion(dim=8, num_heads=2)
    out = helpers.as_numpy(layer(arrays))
    expected = numpy_cross_attention(layer, arrays, [None, None, None])
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_matches_numpy_formula_with_masks(arrays, rng):
    layer = CrossAttentionFusion(dim=8, num_heads=2, key_dim=5)
    masks = _valid_masks(arrays, rng)
    assert not all(np.all(m) for m in masks if m is not None)
    out = helpers.as_numpy(layer(arrays, mask=masks))
    expected = numpy_cross_attention(layer, arrays, masks)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    # The masks really matter: without them the output is different.
    unmasked = helpers.as_numpy(layer(arrays))
    assert not np.allclose(unmasked, out, atol=1e-3)


def test_dict_inputs_read_in_sorted_key_order(arrays, rng):
    layer = CrossAttentionFusion(dim=8, num_heads=2)
    masks = _valid_masks(arrays, rng)
    as_list = helpers.as_numpy(layer(arrays, mask=masks))
    as_dict = {"c": arrays[2], "a": arrays[0], "b": arrays[1]}
    mask_dict = {"c": masks[2], "a": masks[0], "b": masks[1]}
    np.testing.assert_allclose(
        helpers.as_numpy(layer(as_dict, mask=mask_dict)), as_list, rtol=1e-5, atol=1e-6
    )


def test_weight_count():
    layer = CrossAttentionFusion(dim=8, num_heads=2)  # head size 4
    layer.build([(None, 5, 3), (None, 4, 6), (None, 4)])
    attention = 3 * (8 * 2 * 4 + 2 * 4) + (2 * 4 * 8 + 8)  # q, k, v + output
    per_branch = attention + 2 * 8  # + layer norm gamma, beta
    projections = (3 * 8 + 8) + (6 * 8 + 8) + (4 * 8 + 8)
    assert layer.count_params() == 3 * per_branch + projections
    assert len(layer.weights) == 3 * (2 + 8 + 2)

    wide = CrossAttentionFusion(dim=4, num_heads=2, key_dim=6)
    wide.build([(None, 2, 3), (None, 3)])
    attention = 3 * (4 * 2 * 6 + 2 * 6) + (2 * 6 * 4 + 4)
    assert wide.count_params() == 2 * (attention + 2 * 4) + (3 * 4 + 4) * 2


def test_fit_step(arrays):
    # Two sequence branches keep the XLA compile short.
    helpers.check_fit_step(CrossAttentionFusion(dim=8, num_heads=2, dropout=0.1), arrays[:2])


def test_dropout_follows_training(arrays):
    layer = CrossAttentionFusion(dim=8, num_heads=2, dropout=0.5)
    inference = helpers.as_numpy(layer(arrays, training=False))
    np.testing.assert_allclose(helpers.as_numpy(layer(arrays)), inference, rtol=1e-6)
    training = helpers.as_numpy(layer(arrays, training=True))
    assert not np.allclose(training, inference, atol=1e-4)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(arrays, rng, policy):
    masks = _valid_masks(arrays, rng)
    layer, out = helpers.check_mixed_precision(
        lambda: CrossAttentionFusion(dim=8, num_heads=2), arrays, policy, mask=masks
    )
    # The attention softmax runs in float32 even under the mixed policy.
    keras.config.set_dtype_policy(policy)
    try:
        compute = keras.DTypePolicy(policy).compute_dtype
        query = layer.projections[0](arrays[0])
        keys = layer.projections[1](arrays[1])
        assert keras.backend.standardize_dtype(query.dtype) == compute
        attended, scores = layer.attention_layers[0](query, keys, return_attention_scores=True)
        assert keras.backend.standardize_dtype(scores.dtype) == "float32"
        assert keras.backend.standardize_dtype(attended.dtype) == compute
    finally:
        keras.config.set_dtype_policy("float32")
    # Same weights in float32: the mixed result is close to it.
    reference = CrossAttentionFusion(dim=8, num_heads=2)
    reference(arrays)
    reference.set_weights(layer.get_weights())
    expected = helpers.as_numpy(reference(arrays, mask=masks))
    got = helpers.as_numpy(keras.ops.cast(out, "float32"))
    np.testing.assert_allclose(got, expected, atol=0.1 if "bfloat16" in policy else 0.02)


@pytest.mark.parametrize("branch", [0, 1])
def test_padding_never_changes_the_output(arrays, rng, branch):
    layer = CrossAttentionFusion(dim=8, num_heads=2)
    masks = _valid_masks(arrays, rng, lengths={0: 5, 1: 4})  # all steps real
    plain = helpers.as_numpy(layer(arrays, mask=masks))
    padded = list(arrays)
    padded[branch] = _pad(arrays[branch], 3, rng)
    padded_masks = list(masks)
    padded_masks[branch] = np.concatenate([masks[branch], np.zeros((6, 3), bool)], axis=1)
    got = helpers.as_numpy(layer(padded, mask=padded_masks))
    np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-6)
    # Without the mask the padded steps do change it (the test can fail).
    unmasked = helpers.as_numpy(layer(padded))
    assert not np.allclose(unmasked, plain, atol=1e-3)


def test_padding_invariance_with_ragged_lengths_under_jit(arrays, rng):
    """Per-sample lengths, padded and masked, compiled: each sample equals its unpadded self."""
    layer = CrossAttentionFusion(dim=8, num_heads=2)
    masks = _valid_masks(arrays, rng)
    assert len({int(m.sum()) for m in masks[0]}) > 1  # the lengths really differ
    x = {"a": _pad(arrays[0], 2, rng), "b": _pad(arrays[1], 3, rng), "c": arrays[2]}
    pad_masks = [
        np.concatenate([masks[0], np.zeros((6, 2), bool)], axis=1),
        np.concatenate([masks[1], np.zeros((6, 3), bool)], axis=1),
    ]
    inputs = helpers.to_inputs(x)
    mask_inputs = [keras.Input((7,), dtype="bool"), keras.Input((7,), dtype="bool")]
    out = layer(inputs, mask={"a": mask_inputs[0], "b": mask_inputs[1], "c": None})
    model = keras.Model([inputs, mask_inputs], out)
    model.compile(jit_compile=JIT)
    got = model.predict([x, pad_masks], verbose=0, batch_size=6)
    for i in range(6):
        la, lb = int(masks[0][i].sum()), int(masks[1][i].sum())
        alone = layer([arrays[0][i : i + 1, :la], arrays[1][i : i + 1, :lb], arrays[2][i : i + 1]])
        np.testing.assert_allclose(got[i : i + 1], helpers.as_numpy(alone), rtol=1e-5, atol=1e-5)


def test_keras_masks_are_picked_up(rng):
    """Masks from `Embedding(mask_zero=True)` reach the layer without `mask=`."""
    ids = rng.integers(1, 20, size=(6, 5)).astype("int32")
    ids_padded = np.concatenate([ids, np.zeros((6, 3), "int32")], axis=1)
    vec = rng.normal(size=(6, 4)).astype("float32")
    embedding = keras.layers.Embedding(20, 6, mask_zero=True)
    layer = CrossAttentionFusion(dim=8, num_heads=2)

    def build(steps):
        token_input, vec_input = keras.Input((steps,), dtype="int32"), keras.Input((4,))
        return keras.Model([token_input, vec_input], layer([embedding(token_input), vec_input]))

    plain = build(5).predict([ids, vec], verbose=0)
    padded = build(8).predict([ids_padded, vec], verbose=0)
    np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-6)
    assert layer.compute_mask([ids, vec], [ids > 0, None]) is None


def test_fully_padded_rows_stay_finite(arrays):
    layer = CrossAttentionFusion(dim=8, num_heads=2)
    masks = [np.zeros((6, 5), bool), np.zeros((6, 4), bool), None]
    out = helpers.as_numpy(layer(arrays, mask=masks))
    assert np.all(np.isfinite(out))


def test_save_and_load(arrays, tmp_path):
    helpers.check_saving(CrossAttentionFusion(dim=8, num_heads=2, dropout=0.1), arrays, tmp_path)


def test_save_and_load_dict_inputs(arrays, tmp_path):
    x = {"text": arrays[0], "audio": arrays[1], "image": arrays[2]}
    helpers.check_saving(CrossAttentionFusion(dim=8, num_heads=2), x, tmp_path)


@requires_tensorflow
def test_saved_model_export(arrays, tmp_path):
    helpers.check_saved_model(CrossAttentionFusion(dim=8, num_heads=2), arrays, tmp_path)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"dim": 0}, "dim"),
        ({"dim": 2.5}, "dim"),
        ({"dim": None}, "dim"),
        ({"dim": 8, "num_heads": 0}, "num_heads"),
        ({"dim": 8, "num_heads": "2"}, "num_heads"),
        ({"dim": 8, "key_dim": 0}, "key_dim"),
        ({"dim": 8, "key_dim": 1.5}, "key_dim"),
        ({"dim": 8, "dropout": 1.0}, "dropout"),
        ({"dim": 8, "dropout": -0.1}, "dropout"),
        ({"dim": 2, "num_heads": 4}, "num_heads"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=f"{name}={kwargs[name]!r}".replace(".", r"\.")):
        CrossAttentionFusion(**kwargs)


def test_small_dim_with_explicit_key_dim_is_fine(arrays):
    out = CrossAttentionFusion(dim=2, num_heads=4, key_dim=3)(arrays)
    assert tuple(out.shape) == (6, 6)


def test_bad_inputs(arrays):
    with pytest.raises(ValueError, match="single input"):
        CrossAttentionFusion(dim=8)(arrays[0])
    with pytest.raises(ValueError, match="at least 2"):
        CrossAttentionFusion(dim=8)([arrays[0]])
    with pytest.raises(ValueError, match="rank 2 or 3"):
        CrossAttentionFusion(dim=8)([arrays[0], np.ones((6, 2, 2, 3), "float32")])
    with pytest.raises(ValueError, match="known feature size"):
        CrossAttentionFusion(dim=8)([keras.Input((4, None)), keras.Input((3,))])
    keras.backend.clear_session()


def test_built_layer_rejects_other_inputs(arrays):
    """A built layer never silently drops a branch or takes another width."""
    layer = CrossAttentionFusion(dim=8, num_heads=2)
    layer(arrays)
    with pytest.raises(ValueError, match="expects 3 input"):
        layer(arrays[:2])
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        layer([arrays[1], arrays[0], arrays[2]])


def test_save_and_load_mixed_float16(arrays, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(
        CrossAttentionFusion(dim=8, num_heads=2), arrays, tmp_path, atol=1e-3
    )
