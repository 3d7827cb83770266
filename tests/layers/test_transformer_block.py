import math
import re
import warnings

import keras
import numpy as np
import pytest

from kfusion.layers import TransformerBlock, cross_attention_fusion, transformer_block
from tests import helpers
from tests.conftest import BACKEND, requires_tensorflow

B, T, D = 4, 6, 8


@pytest.fixture
def x(rng):
    return rng.normal(size=(B, T, D)).astype("float32")


def _lengths_mask(lengths, length):
    return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype("int32")


# --- a NumPy implementation of the block, on the layer's own weights -----------------


def _layer_norm(x, norm, eps):
    gamma, beta = (np.asarray(w) for w in norm.get_weights())
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def _activation(name, x):
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "gelu":
        return 0.5 * x * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    raise AssertionError(name)


def _attention(h, layer, padding_mask):
    wq, bq = layer.attention.query_dense.get_weights()  # (d, heads, k), (heads, k)
    wk, bk = layer.attention.key_dense.get_weights()
    wv, bv = layer.attention.value_dense.get_weights()
    wo, bo = layer.attention.output_dense.get_weights()  # (heads, k, d), (d,)
    q = np.einsum("btd,dhk->bthk", h, wq) + bq
    k = np.einsum("bsd,dhk->bshk", h, wk) + bk
    v = np.einsum("bsd,dhk->bshk", h, wv) + bv
    scores = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(q.shape[-1])
    if padding_mask is not None:
        keys = padding_mask.astype(bool)[:, None, None, :]
        scores = np.where(keys, scores, -np.inf)
    scores = scores - scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs = probs / probs.sum(-1, keepdims=True)
    context = np.einsum("bhts,bshk->bthk", probs, v)
    return np.einsum("bthk,hkd->btd", context, wo) + bo


def _feedforward(h, layer, activation):
    w1, b1 = layer.intermediate_dense.get_weights()
    w2, b2 = layer.output_dense.get_weights()
    return _activation(activation, h @ w1 + b1) @ w2 + b2


def numpy_block(x, layer, activation, norm_first, padding_mask=None, eps=1e-6):
    x = x.astype("float64")
    if norm_first:
        x = x + _attention(_layer_norm(x, layer.attention_norm, eps), layer, padding_mask)
        return x + _feedforward(_layer_norm(x, layer.feedforward_norm, eps), layer, activation)
    x = _layer_norm(x + _attention(x, layer, padding_mask), layer.attention_norm, eps)
    return _layer_norm(x + _feedforward(x, layer, activation), layer.feedforward_norm, eps)


# --- tests ---------------------------------------------------------------------------


def test_config_roundtrip():
    layer = TransformerBlock(
        num_heads=3,
        intermediate_dim=12,
        key_dim=5,
        dropout=0.2,
        activation="relu",
        norm_first=False,
        layer_norm_epsilon=1e-5,
    )
    clone = helpers.check_config_roundtrip(layer)
    assert (clone.num_heads, clone.key_dim, clone.norm_first) == (3, 5, False)
    default = helpers.check_config_roundtrip(TransformerBlock(2, 16))
    assert default.get_config()["key_dim"] is None


def test_symbolic_matches_eager(x):
    out = helpers.check_symbolic_matches_eager(TransformerBlock(2, 16), x)
    assert tuple(out.shape) == (B, T, D)


def test_unknown_length(x):
    inputs = keras.Input((None, D))
    out = TransformerBlock(2, 16)(inputs)
    assert tuple(out.shape) == (None, None, D)
    model = keras.Model(inputs, out)
    assert tuple(model(x).shape) == (B, T, D)
    assert tuple(model(x[:, :3]).shape) == (B, 3, D)


@pytest.mark.parametrize(
    "num_heads, key_dim, activation, norm_first",
    [
        (1, None, "gelu", True),
        (2, None, "relu", False),
        (2, 3, "gelu", False),
        (4, 5, "relu", True),
    ],
)
def test_matches_numpy_formula(x, num_heads, key_dim, activation, norm_first):
    layer = TransformerBlock(
        num_heads, 16, key_dim=key_dim, activation=activation, norm_first=norm_first
    )
    out = helpers.as_numpy(layer(x))
    assert layer.attention.key_dim == (key_dim or D // num_heads)
    expected = numpy_block(x, layer, activation, norm_first)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("norm_first", [True, False])
def test_matches_numpy_formula_with_padding_mask(x, norm_first):
    layer = TransformerBlock(2, 16, norm_first=norm_first)
    padding_mask = _lengths_mask([6, 4, 2, 1], T)
    out = helpers.as_numpy(layer(x, padding_mask=padding_mask))
    expected = numpy_block(x, layer, "gelu", norm_first, padding_mask)
    valid = padding_mask.astype(bool)
    np.testing.assert_allclose(out[valid], expected[valid], rtol=1e-4, atol=1e-4)
    assert np.all(np.isfinite(out))


def test_single_step_sequence(x):
    """T = 1 attends only itself (softmax over one key is 1), without keras' size-1 warning."""
    layer = TransformerBlock(2, 16)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="You are using a softmax")
        out = helpers.as_numpy(layer(x[:, :1]))
    np.testing.assert_allclose(out, numpy_block(x[:, :1], layer, "gelu", True), atol=1e-4)


def test_weight_count():
    d, heads, k, inter = D, 2, 3, 16
    layer = TransformerBlock(heads, inter, key_dim=k)
    layer.build((None, None, d))
    attention = 3 * (d * heads * k + heads * k) + heads * k * d + d
    norms = 2 * 2 * d
    feedforward = d * inter + inter + inter * d + d
    assert layer.count_params() == attention + norms + feedforward
    assert len(layer.weights) == 8 + 4 + 4


def test_fit_step(x):
    helpers.check_fit_step(TransformerBlock(2, 16, dropout=0.1), x)


def test_fit_step_with_padding_mask_input(x):
    """Post-norm, the padding mask as a model input, trained with XLA where offered."""
    tokens = keras.Input((None, D))
    padding = keras.Input((None,), dtype="int32")
    layer = TransformerBlock(2, 16, dropout=0.1, norm_first=False)
    h = layer(tokens, padding_mask=padding)
    out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(h))
    model = keras.Model([tokens, padding], out)
    model.compile(optimizer="adam", loss="mse", jit_compile=BACKEND != "torch")
    before = [np.array(w) for w in layer.get_weights()]
    y = np.ones((B, 1), "float32")
    history = model.fit([x, _lengths_mask([6, 5, 3, 1], T)], y, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.allclose(b, a) for b, a in zip(before, layer.get_weights()))


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision(x, policy):
    padding_mask = _lengths_mask([6, 4, 2, 1], T)
    layer, out = helpers.check_mixed_precision(
        lambda: TransformerBlock(2, 16, dropout=0.1), x, policy, padding_mask=padding_mask
    )
    # The returned attention probabilities are float32 (the softmax ran in float32).
    keras.config.set_dtype_policy(policy)
    h = layer.attention_norm(x)
    _, probs = layer.attention(h, h, return_attention_scores=True)
    assert keras.backend.standardize_dtype(probs.dtype) == "float32"
    np.testing.assert_allclose(helpers.as_numpy(probs).sum(-1), 1.0, atol=1e-5)


def test_layer_norm_statistics_in_float32_under_mixed_float16(rng):
    # Squares of values near 1e3 overflow float16 (max 65504); float32 statistics do not.
    big = (1e3 + 50.0 * rng.normal(size=(B, T, D))).astype("float32")
    keras.config.set_dtype_policy("mixed_float16")
    layer = TransformerBlock(2, 16)
    layer.build(big.shape)
    normed = helpers.as_numpy(layer.attention_norm(big)).astype("float32")
    assert normed.dtype == np.float32 and np.all(np.isfinite(normed))
    expected = _layer_norm(big.astype("float64"), layer.attention_norm, 1e-6)
    np.testing.assert_allclose(normed, expected, atol=0.05)


@pytest.mark.parametrize("norm_first", [True, False])
def test_padding_invariance_with_padding_mask(rng, x, norm_first):
    """Extra right padding (with garbage values) never changes the real positions."""
    layer = TransformerBlock(2, 16, norm_first=norm_first)
    unpadded = helpers.as_numpy(layer(x))
    garbage = 100.0 * rng.normal(size=(B, 3, D)).astype("float32")
    padded = np.concatenate([x, garbage], axis=1)
    padding_mask = _lengths_mask([T] * B, T + 3)
    out = helpers.as_numpy(layer(padded, padding_mask=padding_mask))
    np.testing.assert_allclose(out[:, :T], unpadded, rtol=1e-5, atol=1e-5)


def test_padding_invariance_per_sample_lengths(x):
    layer = TransformerBlock(2, 16)
    lengths = [6, 4, 2, 1]
    out = helpers.as_numpy(layer(x, padding_mask=_lengths_mask(lengths, T)))
    for i, n in enumerate(lengths):
        alone = helpers.as_numpy(layer(x[i : i + 1, :n]))
        np.testing.assert_allclose(out[i, :n], alone[0], rtol=1e-5, atol=1e-5)
    # Without the mask the padded steps do change the output.
    unmasked = helpers.as_numpy(layer(x))
    assert not np.allclose(unmasked[1, :4], out[1, :4], atol=1e-3)


def test_keras_mask_is_used_and_passed_through(rng, x):
    layer = TransformerBlock(2, 16)
    padded = np.concatenate([x, np.zeros((B, 2, D), "float32")], axis=1)
    inputs = keras.Input((None, D))
    masked = keras.layers.Masking(0.0)(inputs)
    out = layer(masked)
    model = keras.Model(inputs, out)
    np.testing.assert_allclose(
        helpers.as_numpy(model(padded))[:, :T], helpers.as_numpy(layer(x)), rtol=1e-5, atol=1e-5
    )
    keras_mask = np.ones((B, T + 2), bool)
    keras_mask[:, T:] = False
    eager = helpers.as_numpy(layer(padded, mask=keras_mask))
    np.testing.assert_allclose(eager[:, :T], helpers.as_numpy(layer(x)), rtol=1e-5, atol=1e-5)
    assert layer.compute_mask(padded, keras_mask) is keras_mask
    assert layer.compute_mask(padded, None) is None
    assert out._keras_mask is not None  # the functional graph carries the mask on


def test_padding_mask_takes_precedence_over_keras_mask(x):
    layer = TransformerBlock(2, 16)
    padding_mask = _lengths_mask([3] * B, T)
    everything = np.ones((B, T), bool)
    with_both = helpers.as_numpy(layer(x, padding_mask=padding_mask, mask=everything))
    only_padding = helpers.as_numpy(layer(x, padding_mask=padding_mask))
    np.testing.assert_allclose(with_both, only_padding, rtol=1e-6, atol=1e-6)


def test_save_and_load(x, tmp_path):
    helpers.check_saving(TransformerBlock(2, 16, key_dim=3, norm_first=False), x, tmp_path)


def test_save_and_load_with_padding_mask_input(x, tmp_path):
    tokens = keras.Input((None, D))
    padding = keras.Input((None,), dtype="int32")
    out = TransformerBlock(2, 16)(tokens, padding_mask=padding)
    model = keras.Model([tokens, padding], out)
    data = [x, _lengths_mask([6, 5, 3, 1], T)]
    expected = helpers.as_numpy(model.predict(data, verbose=0))
    path = str(tmp_path / "block.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        helpers.as_numpy(loaded.predict(data, verbose=0)), expected, rtol=1e-5, atol=1e-5
    )


@requires_tensorflow
def test_saved_model_export(x, tmp_path):
    helpers.check_saved_model(TransformerBlock(2, 16), x, tmp_path)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_heads": 0}, "num_heads"),
        ({"num_heads": 1.5}, "num_heads"),
        ({"intermediate_dim": 0}, "intermediate_dim"),
        ({"intermediate_dim": None}, "intermediate_dim"),
        ({"key_dim": 0}, "key_dim"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"activation": "no_such_activation"}, "activation"),
        ({"norm_first": "yes"}, "norm_first"),
        ({"layer_norm_epsilon": 0.0}, "layer_norm_epsilon"),
        ({"layer_norm_epsilon": -1e-6}, "layer_norm_epsilon"),
        ({"layer_norm_epsilon": "small"}, "layer_norm_epsilon"),
    ],
)
def test_bad_arguments(kwargs, name):
    arguments = {"num_heads": 2, "intermediate_dim": 16, **kwargs}
    with pytest.raises(ValueError, match=re.escape(f"{name}={kwargs[name]!r}")):
        TransformerBlock(**arguments)


def test_bad_inputs(x):
    with pytest.raises(ValueError, match="rank 3"):
        TransformerBlock(2, 16)(x[:, 0])
    with pytest.raises(ValueError, match="rank 3"):
        TransformerBlock(2, 16)(x[:, :, :, None])
    with pytest.raises(ValueError, match=re.escape("d=2, num_heads=4")):
        TransformerBlock(4, 16)(x[:, :, :2])


def test_built_layer_rejects_another_width(x):
    layer = TransformerBlock(2, 16)
    layer(x)
    with pytest.raises(ValueError, match=f"expected axis -1 of input shape to have value {D}"):
        layer(x[..., :6])


def test_save_and_load_mixed_float16(x, tmp_path):
    keras.config.set_dtype_policy("mixed_float16")  # reset by the autouse fixture
    helpers.check_saving_mixed_float16(
        TransformerBlock(2, 16, norm_first=False), x, tmp_path, atol=1e-3
    )


# --- fused (ops.dot_product_attention) and explicit attention paths -------------------


def _both_paths(monkeypatch, fn, expect_fused=True):
    """`fn()` on the explicit path, then on the fused one (counting the fused calls)."""
    calls = []
    fused = transformer_block._fused_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(transformer_block, "_fused_attention", counting)
    monkeypatch.setattr(cross_attention_fusion, "_fused_attention", counting)
    monkeypatch.setattr(transformer_block, "_ATTENTION_PATH", "explicit")
    explicit = helpers.as_numpy(fn()).astype("float32")
    assert not calls
    monkeypatch.setattr(transformer_block, "_ATTENTION_PATH", "fused")
    out = helpers.as_numpy(fn()).astype("float32")
    assert bool(calls) == expect_fused, calls
    return explicit, out


def test_fused_attention_matches_explicit_path(monkeypatch, x):
    """Padded keys, a fully padded sample (zero rows, no NaN), rotary positions, odd scale."""
    layer = TransformerBlock(2, 16, key_dim=6, rotary=True)
    layer(x)
    padding = _lengths_mask([6, 4, 1, 0], T).astype(bool)
    h = helpers.as_numpy(layer.attention_norm(x))
    explicit, fused = _both_paths(
        monkeypatch, lambda: layer.attention(h, h, attention_mask=padding[:, None, :])
    )
    np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(fused))
    # No key to attend: zero context, so the output is the output projection's bias.
    bias = layer.attention.output_dense.get_weights()[1]
    np.testing.assert_array_equal(fused[3], np.broadcast_to(bias, fused[3].shape))
    explicit, fused = _both_paths(
        monkeypatch, lambda: layer(x, padding_mask=padding.astype("int32"))
    )
    np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-5)

    # Cross-attention's mask has fully masked rows for padded queries: zero rows there too.
    attention = cross_attention_fusion._Float32SoftmaxAttention(num_heads=2, key_dim=3)
    keys = x[:, :4]
    mask = padding[:, :, None] & np.array([True, True, True, False])[None, None, :]
    explicit, fused = _both_paths(monkeypatch, lambda: attention(x, keys, attention_mask=mask))
    np.testing.assert_allclose(fused, explicit, rtol=1e-5, atol=1e-5)
    bias = attention.output_dense.get_weights()[1]
    np.testing.assert_array_equal(fused[~padding], np.broadcast_to(bias, fused[~padding].shape))


def test_fused_attention_only_without_active_dropout(monkeypatch, x):
    calls = []
    fused = transformer_block._fused_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(transformer_block, "_fused_attention", counting)
    monkeypatch.setattr(transformer_block, "_ATTENTION_PATH", "fused")
    layer = TransformerBlock(2, 16, dropout=0.5)
    layer(x, training=True)
    assert not calls  # dropout on the attention weights needs them explicitly
    layer(x, training=False)
    assert len(calls) == 1
    h = layer.attention_norm(x)
    _, scores = layer.attention(h, h, return_attention_scores=True)
    assert len(calls) == 1 and tuple(scores.shape) == (B, 2, T, T)


def test_default_attention_path_per_backend(monkeypatch, x):
    """Fused where the backend has a fused kernel (PyTorch; JAX off CPU), else explicit."""
    calls = []
    fused = transformer_block._fused_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return fused(*args, **kwargs)

    monkeypatch.setattr(transformer_block, "_fused_attention", counting)
    TransformerBlock(2, 16)(x)
    jax_off_cpu = BACKEND == "jax" and not keras.distribution.list_devices()[0].startswith("cpu")
    assert bool(calls) == (BACKEND == "torch" or jax_off_cpu)


def test_fused_attention_training_step_matches_explicit_path(monkeypatch, x):
    """One SGD step through the fused path gives the explicit path's gradients."""
    y = np.ones((B, 1), "float32")
    padding = _lengths_mask([6, 4, 2, 1], T)

    def step():
        keras.utils.set_random_seed(7)
        tokens = keras.Input((T, D))
        mask = keras.Input((T,), dtype="int32")
        h = TransformerBlock(2, 16, rotary=True)(tokens, padding_mask=mask)
        out = keras.layers.Dense(1)(keras.layers.Flatten()(h))
        model = keras.Model([tokens, mask], out)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit([x, padding], y, batch_size=B, epochs=1, verbose=0)
        return keras.ops.concatenate([keras.ops.reshape(w, (-1,)) for w in model.weights])

    explicit, fused = _both_paths(monkeypatch, step)
    np.testing.assert_allclose(fused, explicit, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("policy, atol", [("mixed_float16", 1e-2), ("mixed_bfloat16", 3e-2)])
def test_fused_attention_precision_under_mixed_policy(monkeypatch, rng, policy, atol):
    """The fused path stays as close to the float32 result as the compute dtype allows.

    JAX on CPU keeps the explicit path for float16 (XLA:CPU has no float16 x float16 ->
    float32 product, which its dot_product_attention asks for under jit).
    """
    x = rng.normal(size=(2, 32, D)).astype("float32")
    padding = _lengths_mask([32, 20], 32).astype(bool)[:, None, :]
    reference = TransformerBlock(2, 16, key_dim=3)
    reference(x)
    monkeypatch.setattr(transformer_block, "_ATTENTION_PATH", "explicit")
    expected = helpers.as_numpy(reference.attention(x, x, attention_mask=padding))
    layer = TransformerBlock(2, 16, key_dim=3, dtype=policy)
    layer(x)
    layer.set_weights(reference.get_weights())
    expect_fused = not (BACKEND == "jax" and policy == "mixed_float16")
    explicit, fused = _both_paths(
        monkeypatch, lambda: layer.attention(x, x, attention_mask=padding), expect_fused
    )
    explicit_error = np.abs(explicit - expected).max()
    fused_error = np.abs(fused - expected).max()
    assert np.all(np.isfinite(fused))
    assert fused_error <= atol, (fused_error, explicit_error)
