"""Checks every kfusion layer goes through (shared by the layer and branch tests), and the
small multimodal FusionModel several test modules build."""

import os

import keras
import numpy as np
import pytest

BACKEND = keras.config.backend()


def to_inputs(arrays):
    """Symbolic `keras.Input`s matching a structure of NumPy arrays (batch dim None)."""
    return keras.tree.map_structure(
        lambda a: keras.Input(shape=a.shape[1:], dtype=str(a.dtype)), arrays
    )


def as_numpy(x):
    return keras.tree.map_structure(lambda t: np.asarray(keras.ops.convert_to_numpy(t)), x)


def wrap(layer, arrays, head_units=None, **call_kwargs):
    """A functional model: Inputs -> layer (-> Dense head) for saving and fitting."""
    inputs = to_inputs(arrays)
    out = layer(inputs, **call_kwargs)
    if head_units:
        if len(out.shape) > 2:
            out = keras.layers.GlobalAveragePooling1D()(out)
        out = keras.layers.Dense(head_units, dtype="float32")(out)
    return keras.Model(inputs, out)


def _shapes_of(arrays):
    """The batch-free shapes of a list/dict/single array, as `build` receives them."""
    if isinstance(arrays, dict):
        return {k: (None,) + tuple(v.shape[1:]) for k, v in arrays.items()}
    if isinstance(arrays, (list, tuple)):
        return [(None,) + tuple(a.shape[1:]) for a in arrays]
    return (None,) + tuple(arrays.shape[1:])


def check_config_roundtrip(layer):
    config = layer.get_config()
    clone = layer.__class__.from_config(config)
    assert clone.get_config() == config
    return clone


def check_symbolic_matches_eager(layer, arrays, **call_kwargs):
    """compute_output_shape, the symbolic output and the eager output agree."""
    symbolic = layer(to_inputs(arrays), **call_kwargs)
    eager = layer(arrays, **call_kwargs)
    flat_sym = [tuple(t.shape) for t in keras.tree.flatten(symbolic)]
    flat_eager = [tuple(t.shape) for t in keras.tree.flatten(eager)]
    assert len(flat_sym) == len(flat_eager)
    for s, e in zip(flat_sym, flat_eager):
        assert len(s) == len(e), (flat_sym, flat_eager)
        for ds, de in zip(s, e):
            assert ds is None or ds == de, (flat_sym, flat_eager)
    if not call_kwargs:
        computed = layer.compute_output_shape(_shapes_of(arrays))
        assert tuple(computed)[1:] == flat_sym[0][1:], (computed, flat_sym)
    return eager


def check_fit_step(layer, arrays, targets_units=1, jit_compile=None):
    """One `fit` step trains the layer's weights (and compiles with XLA where offered)."""
    model = wrap(layer, arrays, head_units=targets_units)
    if jit_compile is None:
        jit_compile = BACKEND != "torch"
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse", jit_compile=jit_compile)
    n = len(keras.tree.flatten(arrays)[0])
    y = np.random.default_rng(1).normal(size=(n, targets_units)).astype("float32")
    before = [np.array(w) for w in layer.get_weights()]
    history = model.fit(arrays, y, epochs=2, batch_size=n, verbose=0)
    losses = history.history["loss"]
    assert all(np.isfinite(losses))
    after = layer.get_weights()
    assert before, "layer has no weights to train"
    assert any(not np.allclose(b, a) for b, a in zip(before, after)), "weights did not move"
    return model


def check_saving(layer, arrays, tmp_path, atol=1e-5, **call_kwargs):
    """`.keras` save and load with safe_mode=True gives equal outputs."""
    model = wrap(layer, arrays, **call_kwargs)
    expected = as_numpy(model.predict(arrays, verbose=0))
    path = os.path.join(str(tmp_path), "layer.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    got = as_numpy(loaded.predict(arrays, verbose=0))
    for e, g in zip(keras.tree.flatten(expected), keras.tree.flatten(got)):
        np.testing.assert_allclose(e, g, atol=atol, rtol=1e-5)
    return loaded


def check_saved_model(layer, arrays, tmp_path, atol=1e-5):
    """TensorFlow SavedModel export reloads with `tf.saved_model.load`, equal outputs."""
    import tensorflow as tf

    model = wrap(layer, arrays)
    expected = as_numpy(model(arrays))
    path = os.path.join(str(tmp_path), "saved")
    model.export(path, format="tf_saved_model", verbose=False)
    reloaded = tf.saved_model.load(path)
    got = as_numpy(reloaded.serve(arrays))
    for e, g in zip(keras.tree.flatten(expected), keras.tree.flatten(got)):
        np.testing.assert_allclose(e, g, atol=atol, rtol=1e-5)


def check_saving_mixed_float16(layer, arrays, tmp_path, atol=1e-3, **call_kwargs):
    """A layer made under `mixed_float16` round-trips with its policy and equal outputs.

    The model is saved under the mixed global policy and loaded under float32, so the
    loaded layer's policy can only come from its saved config. On TensorFlow the model is
    exported as a SavedModel too and served with equal outputs.
    """
    assert layer.dtype_policy.name == "mixed_float16", "make the layer under mixed_float16"
    model = wrap(layer, arrays, **call_kwargs)
    expected = as_numpy(model.predict(arrays, verbose=0))
    path = os.path.join(str(tmp_path), "layer.keras")
    model.save(path)
    keras.config.set_dtype_policy("float32")
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.get_layer(layer.name).dtype_policy.name == "mixed_float16"
    got = as_numpy(loaded.predict(arrays, verbose=0))
    for e, g in zip(keras.tree.flatten(expected), keras.tree.flatten(got), strict=True):
        np.testing.assert_allclose(e, g, atol=atol, rtol=1e-3)
    if BACKEND == "tensorflow":
        import tensorflow as tf

        export = os.path.join(str(tmp_path), "saved")
        model.export(export, format="tf_saved_model", verbose=False)
        reloaded = tf.saved_model.load(export)  # held: its variables live as long as it
        served = as_numpy(reloaded.serve(arrays))
        for e, g in zip(keras.tree.flatten(expected), keras.tree.flatten(served), strict=True):
            np.testing.assert_allclose(e, g, atol=atol, rtol=1e-3)
    return loaded


def check_mixed_precision(make_layer, arrays, policy, **call_kwargs):
    """Under a mixed policy: float32 variables, outputs in the compute dtype, finite."""
    keras.config.set_dtype_policy(policy)
    try:
        layer = make_layer()
        out = layer(arrays, **call_kwargs)
        compute = keras.DTypePolicy(policy).compute_dtype
        first = keras.tree.flatten(out)[0]
        assert keras.backend.standardize_dtype(first.dtype) == compute
        for v in layer.weights:
            assert keras.backend.standardize_dtype(v.dtype) == "float32", v.path
        for t in keras.tree.flatten(out):
            assert np.all(
                np.isfinite(np.asarray(keras.ops.convert_to_numpy(keras.ops.cast(t, "float32"))))
            )
        return layer, out
    finally:
        keras.config.set_dtype_policy("float32")


def multimodal_model(fusion="concat", num_classes=2, from_logits=False, name=None, text=None):
    """A tiny FusionModel on the image + text + tabular inputs of `kfusion.datasets`.

    `text` is the text branch (default: a small embedding + LSTM).
    """
    import kfusion as kf

    text = text or kf.branches.RNN(units=4, vocab_size=20, embedding_dim=4)

    return kf.FusionModel(
        inputs={
            "image": keras.Input((8, 8, 1)),
            "text": keras.Input((10,), dtype="int32"),
            "tabular": keras.Input((5,)),
        },
        branches={
            "image": [kf.branches.CNN(filters=(4,))],
            "text": [text],
            "tabular": [kf.branches.MLP(units=(4,))],
        },
        fusion=fusion,
        head=kf.heads.Classification(num_classes, from_logits=from_logits),
        name=name,
    )


def check_built_fusion_rejects_other_inputs(layer, arrays):
    """A fusion layer built on `arrays` (widths 3, 5, 2) refuses other inputs afterwards.

    It never silently drops, adds or mixes up branches: keras' input-spec check names the
    count or the width it expected.
    """
    layer(arrays)
    with pytest.raises(ValueError, match="expects 3 input"):
        layer(arrays[:2])
    with pytest.raises(ValueError, match="expects 3 input"):
        layer(arrays + arrays[:1])
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 5"):
        layer([arrays[0], arrays[2], arrays[1]])
