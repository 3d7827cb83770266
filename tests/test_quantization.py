"""`model.quantize(mode)` on FusionModels and ensembles: `.keras` and SavedModel round trips.

keras quantizes the leaf layers that have its quantization hooks (Dense, EinsumDense,
Embedding), including those that kfusion layers make themselves; the quantized model must
save, load with `safe_mode=True` and export with equal outputs.
"""

import os
import warnings

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion import _quantization
from kfusion import export as kexport
from tests.conftest import requires_tensorflow

FUSIONS = ["concat", "weighted", "attention", "gated", "cross_attention", "low_rank", "film"]


def _member(fusion, seed):
    keras.utils.set_random_seed(seed)
    pooling = None if fusion == "cross_attention" else "mean"
    branches = [
        kf.branches.CNN(filters=(4,), pooling=pooling),
        kf.branches.Transformer(dim=8, depth=1, num_heads=2, pooling=pooling),
    ]
    if fusion not in ("film", "cross_attention"):
        branches.append(kf.branches.RNN(units=4))
    return kf.FusionModel(
        inputs=keras.Input((6, 3), name="signal"),
        branches=branches,
        fusion=fusion,
        head=kf.heads.Classification(3, hidden_units=(4,)),
        name=f"member_{fusion}",
    )


def _quantized_layers(model):
    return {
        layer.path: layer.quantization_mode
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if layer.quantization_mode is not None
    }


def _save_load(model, tmp_path, x):
    path = os.path.join(str(tmp_path), "q.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-6
    )
    return loaded


@requires_tensorflow
def test_an_int8_ensemble_of_every_fusion_kind_saves_loads_and_serves(tmp_path):
    # Seven FusionModels, one per fusion kind, averaged: one int8 model holding every
    # fusion layer, Transformer blocks (attention EinsumDense, feed-forward Dense), heads
    # with a hidden layer and an ensemble layer.
    import tensorflow as tf

    x = np.random.default_rng(0).normal(size=(4, 6, 3)).astype("float32")
    ensemble = kf.ensemble.average([_member(f, i) for i, f in enumerate(FUSIONS)])
    before = keras.ops.convert_to_numpy(ensemble(x))
    with _quantization.one_garbage_collection():  # as FusionModel.quantize does
        ensemble.quantize("int8")
    after = keras.ops.convert_to_numpy(ensemble(x))
    quantized = _quantized_layers(ensemble)
    for name in ("gate", "attention_score", "key", "intermediate_dense", "output", "hidden_0"):
        assert any(p.endswith("/" + name) for p in quantized), (name, sorted(quantized))
    assert set(quantized.values()) == {"int8"}
    np.testing.assert_allclose(after, before, atol=0.05)  # int8 weights: close, not equal
    loaded = _save_load(ensemble, tmp_path, x)
    assert _quantized_layers(loaded) == quantized  # quantized again, layer for layer
    # SavedModel of one loaded member (the whole ensemble traces ~30k ops: too slow here).
    member = loaded.get_layer("member_gated")
    expected = keras.ops.convert_to_numpy(member(x))
    path = kexport.export(member, tmp_path / "saved", format="saved_model", probe=x)
    reloaded = tf.saved_model.load(path)  # held: its variables live as long as it
    np.testing.assert_allclose(np.asarray(reloaded.serve(x)), expected, atol=1e-6)


@pytest.mark.parametrize("mode", ["int4", "float8"])
def test_int4_and_float8_models_round_trip(tmp_path, mode):
    model = kf.FusionModel(
        inputs={"signal": keras.Input((6, 3)), "text": keras.Input((5,), dtype="int32")},
        branches={
            "signal": [kf.branches.Transformer(dim=8, depth=1, num_heads=2)],
            "text": [kf.branches.RNN(units=4, vocab_size=12, embedding_dim=4)],
        },
        fusion="gated",
        head=kf.heads.Regression(),
    )
    rng = np.random.default_rng(1)
    x = {
        "signal": rng.normal(size=(3, 6, 3)).astype("float32"),
        "text": rng.integers(1, 12, size=(3, 5)).astype("int32"),
    }
    model.quantize(mode)
    assert set(_quantized_layers(model).values()) == {mode}
    _save_load(model, tmp_path, x)


def test_fusion_model_quantize_names_no_layer_it_leaves_float():
    # keras warns once per layer it has no quantization for (InputLayer, Conv1D,
    # Dropout...), a dozen lines on a small model; those layers simply stay float.
    model = _member("gated", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.quantize("int8")
    assert not [w for w in caught if "quantize" in str(w.message)]
    assert _quantized_layers(model)
