"""Missing modalities: presence inputs, learned missing embeddings, modality dropout."""

import os

import keras
import numpy as np
import pytest

import kfusion as kf
from tests import helpers
from tests.conftest import BACKEND

FUSIONS = ["concat", "weighted", "attention", "gated", "cross_attention", "low_rank", "film"]


def make(fusion="concat", modality_dropout=0.0, three=True, missing=True):
    """Two or three modalities: a float sequence, a vector, and token ids."""
    keras.utils.set_random_seed(0)
    inputs = {"seq": keras.Input((10, 3)), "tab": keras.Input((5,))}
    pooling = None if fusion == "cross_attention" else "mean"
    branches = {
        "seq": [kf.branches.CNN(filters=(8,), pooling=pooling, name="cnn")],
        "tab": [kf.branches.MLP(units=(8,), name="mlp")],
    }
    if three and fusion != "film":
        inputs["ids"] = keras.Input((7,), dtype="int32")
        branches["ids"] = [
            kf.branches.Transformer(vocab_size=20, dim=8, depth=1, num_heads=2, name="tfm")
        ]
    return kf.FusionModel(
        inputs=inputs,
        branches=branches,
        fusion=fusion,
        head=kf.heads.Classification(3, name="head"),
        missing_modalities=missing,
        modality_dropout=modality_dropout,
    )


def data(model, n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = {
        "seq": rng.normal(size=(n, 10, 3)).astype("float32"),
        "tab": rng.normal(size=(n, 5)).astype("float32"),
        "ids": rng.integers(1, 20, size=(n, 7)).astype("int32"),
    }
    names = [s["name"] for s in model.input_specs]
    return {k: v for k, v in x.items() if k in names}


def randomize_embeddings(model):
    layer = model.get_layer("missing_modalities")
    rng = np.random.default_rng(1)
    for v in layer.embeddings:
        v.assign(rng.normal(size=v.shape).astype("float32"))


@pytest.mark.parametrize("fusion", FUSIONS)
def test_an_absent_modality_changes_no_output(fusion):
    model = make(fusion)
    randomize_embeddings(model)
    x = data(model)
    names = list(x)
    for absent in names:
        flags = np.array([True, False, True, False, False, True])
        given = {**x, f"{absent}_present": flags}
        changed = dict(given)
        changed[absent] = (x[absent] * 7 + 3) if absent != "ids" else (x[absent] % 5 + 1)
        out = helpers.as_numpy(model.predict(given, verbose=0))
        out_changed = helpers.as_numpy(model.predict(changed, verbose=0))
        # Exactly equal where the modality is absent, different where it is present.
        np.testing.assert_array_equal(out[~flags], out_changed[~flags])
        assert not np.allclose(out[flags], out_changed[flags], atol=1e-6), (fusion, absent)
        # Leaving the input out of the dict is "absent for every sample".
        omitted = helpers.as_numpy(
            model.predict({k: v for k, v in x.items() if k != absent}, verbose=0)
        )
        np.testing.assert_allclose(omitted[~flags], out[~flags], atol=1e-6)


def test_weighting_fusions_renormalise_over_the_present_branches():
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=(4, d)).astype("float32") for d in (3, 5, 2))
    presence = np.array([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0]], "float32")
    for layer in (
        kf.layers.AttentionFusion(units=4),
        kf.layers.GatedFusion(units=4),
        kf.layers.WeightedSumFusion(units=4),
    ):
        _, full = layer([a, b, c], return_weights=True)
        _, weights = layer([a, b, c], return_weights=True, presence=presence)
        full, weights = helpers.as_numpy(full), helpers.as_numpy(weights)
        np.testing.assert_allclose(weights.sum(1), 1.0, atol=1e-6)
        assert np.all(weights[presence == 0][:3] == 0.0)  # absent: exactly 0 (rows 1-2)
        # Present branches keep their ratios; a row with none present is unchanged.
        kept = full[1, [0, 2]]  # GatedFusion: per unit
        np.testing.assert_allclose(weights[1, [0, 2]], kept / kept.sum(0), rtol=1e-5)
        np.testing.assert_allclose(weights[0], full[0], atol=1e-6)
        np.testing.assert_allclose(weights[3], full[3], atol=1e-6)


def test_every_modality_absent_gives_one_fixed_answer():
    model = make("attention")
    randomize_embeddings(model)
    x, other = data(model, seed=0), data(model, seed=1)
    none = {f"{k}_present": np.zeros(6, bool) for k in x}
    out = helpers.as_numpy(model.predict({**x, **none}, verbose=0))
    out_other = helpers.as_numpy(model.predict({**other, **none}, verbose=0))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out, np.repeat(out[:1], 6, axis=0), atol=1e-6)
    np.testing.assert_array_equal(out, out_other)


def test_modality_dropout_drops_whole_modalities_only_in_training():
    layer = kf.layers.MissingModalities(modalities=[0, 0, 1, 2], rates=[0.5, 0.3, 0.0], seed=3)
    n = 4000
    features = [np.ones((n, 2), "float32")] * 4
    present = [np.ones(n, bool), np.ones(n, bool), np.arange(n) % 2 == 0]
    _, branch = layer(features, present, training=True)
    branch = helpers.as_numpy(branch)
    # The two branches of modality 0 are dropped together.
    np.testing.assert_array_equal(branch[:, 0], branch[:, 1])
    # A modality that was absent stays absent; rate 0 never drops a present one.
    assert np.all(branch[1::2, 3] == 0) and np.all(branch[0::2, 3] == 1)
    # Never every present modality: each row keeps at least one.
    assert branch.max(axis=-1).min() == 1.0
    # Rates as asked (up to the rescues of samples that would lose everything).
    assert 0.40 < 1 - branch[:, 0].mean() < 0.5
    assert 0.22 < 1 - branch[:, 2].mean() < 0.3
    _, inference = layer(features, present)
    np.testing.assert_array_equal(
        helpers.as_numpy(inference), np.stack([present[0], present[0], present[1], present[2]], -1)
    )


def test_model_trains_with_modality_dropout_and_round_trips(tmp_path):
    model = make("gated", modality_dropout={"seq": 0.3, "tab": 0.2, "ids": 0.0})
    assert model.modality_dropout == {"seq": 0.3, "tab": 0.2, "ids": 0.0}
    x = data(model, n=32)
    y = np.arange(32) % 3
    model.compile(optimizer="adam")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    layer = model.get_layer("missing_modalities")
    # The missing embeddings were trained (they start at zero).
    assert any(np.abs(helpers.as_numpy(v)).max() > 0 for v in layer.embeddings)
    probe = {**x, "seq_present": np.arange(32) % 2 == 0}
    expected = helpers.as_numpy(model.predict(probe, verbose=0))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(
        helpers.as_numpy(loaded.predict(probe, verbose=0)), expected, atol=1e-6
    )
    spec = model.to_spec()
    assert spec["missing_modalities"] is True and spec["modality_dropout"]["seq"] == 0.3
    rebuilt = kf.FusionModel.from_spec(spec)
    assert rebuilt.missing_modalities and "seq_present" in rebuilt.input


def test_presence_under_mixed_precision(tmp_path):
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = make("attention", three=False)
        randomize_embeddings(model)
        x = data(model)
        flags = np.array([True, False] * 3)
        out = helpers.as_numpy(model.predict({**x, "seq_present": flags}, verbose=0))
        changed = helpers.as_numpy(
            model.predict({**x, "seq": x["seq"] + 5, "seq_present": flags}, verbose=0)
        )
        np.testing.assert_array_equal(out[~flags], changed[~flags])
        path = str(tmp_path / "m.keras")
        model.save(path)
    finally:
        keras.config.set_dtype_policy("float32")
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.get_layer("missing_modalities").dtype_policy.name == "mixed_float16"
    got = helpers.as_numpy(loaded.predict({**x, "seq_present": flags}, verbose=0))
    np.testing.assert_allclose(got, out, atol=1e-3)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="SavedModel export needs TensorFlow")
def test_saved_model_takes_the_presence_inputs(tmp_path):
    import tensorflow as tf

    model = make("cross_attention")
    randomize_embeddings(model)
    x = model.complete_inputs(data(model))
    x["tab_present"] = np.array([True, False] * 3)
    expected = helpers.as_numpy(model.predict(x, verbose=0))
    path = os.path.join(str(tmp_path), "saved")
    kf.export.export(model, path, format="saved_model")
    reloaded = tf.saved_model.load(path)
    signature = reloaded.signatures["serving_default"].structured_input_signature[1]
    assert signature["tab_present"].dtype == tf.bool
    got = helpers.as_numpy(reloaded.serve(x))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_bad_presence_and_arguments_are_refused():
    model = make("concat", three=False)
    x = data(model)
    with pytest.raises(ValueError, match=r"'seq_present' has shape \(6, 2\).*\(6,\)"):
        model.predict({**x, "seq_present": np.ones((6, 2), bool)}, verbose=0)
    with pytest.raises(ValueError, match="'seq_present' has dtype float32 with values other"):
        model.predict({**x, "seq_present": np.full(6, 0.5, "float32")}, verbose=0)
    with pytest.raises(ValueError, match="'tab_present' has dtype <U1"):
        model.predict({**x, "tab_present": np.array(list("abcdef"))}, verbose=0)
    with pytest.raises(ValueError, match="left out .* marks it present"):
        model.predict({"tab": x["tab"], "seq_present": np.ones(6, bool)}, verbose=0)
    # 0/1 numbers are flags too.
    ints = helpers.as_numpy(model.predict({**x, "seq_present": np.array([1, 0] * 3)}, verbose=0))
    bools = helpers.as_numpy(
        model.predict({**x, "seq_present": np.array([True, False] * 3)}, verbose=0)
    )
    np.testing.assert_array_equal(ints, bools)
    with pytest.raises(ValueError, match=r"`modality_dropout` must be a float in \[0, 1\)"):
        make(modality_dropout=1.0)
    with pytest.raises(ValueError, match=r"modality_dropout\['tab'\]"):
        make(modality_dropout={"tab": -0.1})
    with pytest.raises(ValueError, match="modality_dropout` names an input"):
        make(modality_dropout={"image": 0.1})
    with pytest.raises(ValueError, match="needs `missing_modalities=True`"):
        make(modality_dropout=0.2, missing=False)
    with pytest.raises(ValueError, match="need a model with several inputs"):
        kf.FusionModel(
            inputs=keras.Input((4,), name="x"),
            branches=[kf.branches.MLP(units=(4,)), kf.branches.MLP(units=(4,), name="m2")],
            missing_modalities=True,
        )
    with pytest.raises(ValueError, match="reserved for the presence flags"):
        kf.FusionModel(
            inputs={"x": keras.Input((4,)), "x_present": keras.Input((4,))},
            branches={
                "x": [kf.branches.MLP(units=(4,))],
                "x_present": [kf.branches.MLP(units=(4,), name="m2")],
            },
            missing_modalities=True,
        )
    with pytest.raises(ValueError, match="`modalities` must name every modality"):
        kf.layers.MissingModalities(modalities=[0, 2])
    with pytest.raises(ValueError, match="`rates` must be one rate or a list of 2"):
        kf.layers.MissingModalities(modalities=[0, 1], rates=[0.1])


def test_missing_modalities_layer_round_trips(tmp_path):
    layer = kf.layers.MissingModalities(modalities=[0, 1], rates=[0.2, 0.0], seed=1)
    helpers.check_config_roundtrip(layer)
    rebuilt = kf.layers.MissingModalities.from_config(layer.get_config())
    assert rebuilt.rates == [0.2, 0.0] and rebuilt.modalities == [0, 1]
