import json

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion.datasets import multimodal_classification, sequence_classification
from tests import helpers

FUSIONS = ["concat", "weighted", "attention", "gated", "cross_attention", "low_rank", "film"]


def _sequence_branches(fusion):
    pooling = None if fusion == "cross_attention" else "mean"
    branches = [
        kf.branches.CNN(filters=(16,), kernel_size=3, pooling=pooling),
        kf.branches.RNN(units=16, pooling=pooling if pooling else None),
        kf.branches.Transformer(dim=16, depth=1, num_heads=2, pooling=pooling),
    ]
    if fusion == "film":
        # FiLM: one branch conditions another (the Transformer conditions the CNN).
        return [branches[0], branches[2]]
    return branches


def _sequence_model(fusion):
    return kf.FusionModel(
        inputs=keras.Input((16, 4), name="signal"),
        branches=_sequence_branches(fusion),
        fusion=fusion,
        head=kf.heads.Classification(3),
    )


def _multimodal_branches(fusion):
    pooling = None if fusion == "cross_attention" else "mean"
    branches = {
        "image": [kf.branches.CNN(filters=(8, 8), image_pooling=2, pooling=pooling)],
        "text": [
            kf.branches.Transformer(
                dim=16, depth=1, num_heads=2, vocab_size=20, embedding_dim=16, pooling=pooling
            )
        ],
        "tabular": [kf.branches.MLP(units=(16,))],
    }
    if fusion == "film":
        # FiLM takes two inputs: the table conditions the image features.
        branches["image"][0] = kf.branches.CNN(filters=(8, 8), output_dim=16)
        branches["text"] = [kf.branches.RNN(units=8, vocab_size=20, embedding_dim=8)]
        return branches, ["image", "tabular"]
    return branches, ["image", "text", "tabular"]


def _multimodal_model(fusion):
    branches, used = _multimodal_branches(fusion)
    inputs = {
        "image": keras.Input((8, 8, 1), name="image"),
        "text": keras.Input((None,), dtype="int32", name="text"),
        "tabular": keras.Input((5,), name="tabular"),
    }
    if fusion == "film":
        inputs = {k: inputs[k] for k in used}
        branches = {k: branches[k] for k in used}
    return (
        kf.FusionModel(
            inputs=inputs, branches=branches, fusion=fusion, head=kf.heads.Classification(2)
        ),
        used,
    )


def _accuracy(model, x, y):
    # One batch: on JAX every distinct batch shape is another XLA compile.
    pred = model.predict(x, batch_size=len(y), verbose=0)
    if pred.shape[-1] == 1:
        return float(np.mean((pred[:, 0] > 0.5) == y))
    return float(np.mean(np.argmax(pred, -1) == y))


# TensorFlow trains every fusion kind in both settings. JAX and PyTorch train every fusion
# kind once (split between the two settings) to keep CI within its time budget.
OTHER_BACKEND_SHARED = ("concat", "gated", "cross_attention", "weighted")


def _in_budget(fusion, shared):
    if helpers.BACKEND == "tensorflow":
        return
    if (fusion in OTHER_BACKEND_SHARED) != shared:
        pytest.skip(f"{fusion} is trained in the other setting on {helpers.BACKEND} (CI budget)")


@pytest.mark.parametrize("fusion", FUSIONS)
def test_shared_input_trains_above_chance(fusion):
    _in_budget(fusion, shared=True)
    x, y = sequence_classification(n=320, length=16, features=4, seed=1)
    model = _sequence_model(fusion)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    # 256 = 8 full batches: no ragged last batch (another XLA compile on JAX).
    model.fit(x[:256], y[:256], epochs=8, batch_size=32, verbose=0)
    # Chance is 1/3 on three balanced classes; fused models reach 0.8-1.0 here.
    assert _accuracy(model, x[256:], y[256:]) >= 0.7


@pytest.mark.parametrize("fusion", FUSIONS)
def test_several_inputs_train_above_chance(fusion):
    _in_budget(fusion, shared=False)
    model, used = _multimodal_model(fusion)
    x, y = multimodal_classification(n=400, seed=2, label_from=used)
    x = {k: x[k] for k in used}
    train = {k: v[:320] for k, v in x.items()}
    test = {k: v[320:] for k, v in x.items()}
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    model.fit(train, y[:320], epochs=12, batch_size=32, verbose=0)
    # Chance is 1/2. The label sums one score per modality used: reading one modality
    # alone gives at most ~0.70 (three modalities) or ~0.75 (FiLM's two), so passing
    # needs information from several branches.
    assert _accuracy(model, test, y[320:]) >= (0.85 if fusion == "film" else 0.75)


def test_config_round_trip_and_save_load(tmp_path):
    model, used = _multimodal_model("gated")
    x, _ = multimodal_classification(n=8)
    config = json.loads(json.dumps(model.get_config()))
    clone = kf.FusionModel.from_config(config)
    assert json.loads(json.dumps(clone.get_config())) == config
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, kf.FusionModel)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


def test_compiled_model_reloads_compiled(tmp_path):
    x, y = sequence_classification(n=32)
    model = _sequence_model("attention")
    model.compile(optimizer="adam")
    model.fit(x, y, epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert loaded.compiled
    loaded.fit(x, y, epochs=1, verbose=0)  # trains on without compile()


def _scan_model(cell):
    return kf.FusionModel(
        inputs=keras.Input((16, 4), name="signal"),
        branches=[kf.branches.RNN(units=8, cell=cell)],
        head=kf.heads.Classification(3),
    )


@pytest.mark.parametrize("cell", ["mingru", "minlstm", "lstm"])
def test_default_compile_uses_xla_for_parallel_scan_cells(cell):
    """jit_compile="auto": XLA for minGRU/minLSTM on TensorFlow even on a CPU."""
    model = _scan_model(cell)
    model.compile()
    probe = keras.Model(model.inputs, model.outputs)  # a plain model: Keras' own "auto"
    probe.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    if keras.backend.backend() == "tensorflow" and cell != "lstm":
        assert model.jit_compile is True
    else:
        assert model.jit_compile == probe.jit_compile
    off = _scan_model(cell)
    off.compile(jit_compile=False)
    assert off.jit_compile is False
    eager = _scan_model(cell)
    eager.compile(run_eagerly=True)
    assert eager.jit_compile is False


def test_xla_compiled_scan_trains_as_without_xla():
    """One step of the XLA-compiled minGRU model equals the step without XLA."""
    x, y = sequence_classification(n=32)
    models = []
    for jit in ("auto", False):
        keras.utils.set_random_seed(0)
        model = _scan_model("mingru")
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
        models.append(model)
    models[1].set_weights(models[0].get_weights())
    losses = [m.train_on_batch(x, y) for m in models]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    for a, b in zip(models[0].get_weights(), models[1].get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_branch_names_unique_and_readable():
    a, b = kf.branches.CNN(filters=(4,)), kf.branches.CNN(filters=(4,))
    model = kf.FusionModel(
        inputs={"left": keras.Input((8, 8, 3)), "right": keras.Input((8, 8, 3))},
        branches={"left": a, "right": b},
        fusion="concat",
    )
    names = [layer.name for layer in model.branch_layers]
    assert len(set(names)) == 2
    assert all(n.startswith("cnn_branch") for n in names)
    assert model.fusion_layer.name.startswith("concat_fusion")


def test_shared_branch_is_one_set_of_weights():
    tied = kf.branches.MLP(units=(8,), name="tied")
    model = kf.FusionModel(
        inputs={"a": keras.Input((6,)), "b": keras.Input((6,))},
        branches={"a": tied, "b": tied},
        fusion="concat",
    )
    assert [layer for layer in model.layers if layer.name == "tied"] == [tied]
    assert model.count_params() == tied.count_params()
    lines = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    assert sum("tied (MLP)" in line for line in "\n".join(lines).splitlines()) == 1
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    out = model.predict({"a": x, "b": x}, verbose=0)
    np.testing.assert_allclose(out[:, :8], out[:, 8:], atol=1e-6)


def test_summary_shows_input_branches_fusion_head():
    model = _sequence_model("gated")
    lines = []
    model.summary(print_fn=lambda line, **_: lines.append(line))
    text = "\n".join(lines)
    for part in ("signal", "cnn_branch", "rnn_branch", "transformer_branch", "gated_fusion"):
        assert part in text
    assert "classification" in text


def test_single_branch_needs_no_fusion():
    x, y = sequence_classification(n=64)
    model = kf.FusionModel(
        inputs=keras.Input((16, 4)),
        branches=[kf.branches.RNN(units=8)],
        head=kf.heads.Classification(3),
    )
    assert model.fusion_layer is None
    model.compile(optimizer="adam")
    model.fit(x, y, epochs=1, verbose=0)


def test_fusion_layer_instance_and_units():
    model = kf.FusionModel(
        inputs=keras.Input((16, 4)),
        branches=[kf.branches.CNN(filters=(8,)), kf.branches.RNN(units=8)],
        fusion=kf.layers.GatedFusion(units=12),
    )
    assert model.output_shape == (None, 12)
    model = kf.FusionModel(
        inputs=keras.Input((16, 4)),
        branches=[kf.branches.CNN(filters=(8,)), kf.branches.RNN(units=8)],
        fusion="attention",
        fusion_units=24,
    )
    assert model.output_shape == (None, 24)


def test_multitask_head_dict_outputs():
    x, y = sequence_classification(n=64)
    model = kf.FusionModel(
        inputs=keras.Input((16, 4)),
        branches=[kf.branches.CNN(filters=(8,)), kf.branches.RNN(units=8)],
        fusion="concat",
        head=kf.heads.MultiTask(
            {"label": kf.heads.Classification(3), "level": kf.heads.Regression()}
        ),
    )
    model.compile(optimizer="adam")
    history = model.fit(x, {"label": y, "level": x[:, :, 0].mean(1)}, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    out = model.predict(x, verbose=0)
    assert set(out) == {"label", "level"}


@pytest.mark.parametrize("fusion", ["cross_attention", "concat"])
def test_padding_invariance_every_branch(fusion):
    pooling = None if fusion == "cross_attention" else "mean"
    kw = {"vocab_size": 30, "embedding_dim": 8}
    model = kf.FusionModel(
        inputs=keras.Input((None,), dtype="int32", name="tokens"),
        branches=[
            kf.branches.CNN(filters=(8, 8), pooling=pooling, **kw),
            kf.branches.RNN(units=8, pooling=pooling or None, **kw),
            kf.branches.Transformer(dim=8, depth=1, num_heads=2, pooling=pooling, **kw),
        ],
        fusion=fusion,
        head=kf.heads.Classification(3),
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 30, size=(4, 6)).astype("int32")
    padded = np.concatenate([tokens, np.zeros((4, 5), "int32")], axis=1)
    np.testing.assert_allclose(
        model.predict(tokens, verbose=0), model.predict(padded, verbose=0), atol=1e-5
    )


def test_spec_round_trips(tmp_path):
    model = _sequence_model("gated")
    spec = model.to_spec()
    rebuilt = kf.FusionModel.from_spec(spec)
    assert rebuilt.to_spec() == spec
    # JSON string and YAML file give the same model.
    assert kf.FusionModel.from_spec(json.dumps(spec)).to_spec() == spec
    import yaml

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert kf.FusionModel.from_spec(str(path)).to_spec() == spec
    assert rebuilt.count_params() == model.count_params()


def test_spec_shared_branch_and_unknown_key():
    spec = {
        "inputs": {"a": {"shape": [6]}, "b": {"shape": [6]}},
        "branches": {"a": [{"type": "MLP", "units": [4], "name": "tied"}], "b": [{"ref": "tied"}]},
        "fusion": "concat",
        "head": {"type": "Classification", "num_classes": 2},
    }
    model = kf.FusionModel.from_spec(spec)
    assert len(model.branch_layers) == 1
    assert kf.FusionModel.from_spec(model.to_spec()).to_spec() == model.to_spec()
    with pytest.raises(ValueError, match="Unknown key 'fussion'.*'fusion'"):
        kf.FusionModel.from_spec({**spec, "fussion": "gated"})
    with pytest.raises(ValueError, match="Unknown branch type 'Cnn'.*'CNN'"):
        kf.FusionModel.from_spec(
            {**spec, "branches": {"a": [{"type": "Cnn"}], "b": [{"ref": "x"}]}}
        )


def test_single_branch_spec_round_trips_to_the_same_config():
    model = kf.FusionModel(inputs=keras.Input((6,), name="x"), branches=[kf.branches.MLP()])
    rebuilt = kf.FusionModel.from_spec(model.to_spec())
    assert rebuilt.get_config() == model.get_config()


_SPEC = {"inputs": {"x": {"shape": [6]}}, "branches": [{"type": "MLP"}, {"type": "MLP"}]}


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"inputs": {"x": {"shape": 6}}}, r"'shape' of input 'x'.*Received: shape=6"),
        ({"inputs": {"x": {"shape": ["6"]}}}, r"Invalid input 'x'.*Received: \{'shape': \['6'\]"),
        ({"inputs": {"x": {"shape": [6], "dtype": "f32"}}}, r"Invalid input 'x'.*'f32'"),
        ({"fusion": {"type": "GatedFusion", "unit": 8}}, r"Invalid fusion entry.*'unit'"),
        ({"fusion": {"type": "TransformerBlock"}}, r"Unknown fusion type 'TransformerBlock'"),
        ({"head": {"type": "Classification"}}, r"Invalid head entry.*num_classes"),
    ],
)
def test_ill_typed_spec_values_are_value_errors_naming_the_key(change, expected):
    with pytest.raises(ValueError, match=expected):
        kf.FusionModel.from_spec({**_SPEC, **change})


# ----------------------------------------------------------------------------- bad input
def test_unknown_fusion_name():
    with pytest.raises(ValueError, match="fusion='gate'.*'gated'"):
        kf.FusionModel(inputs=keras.Input((6,)), branches=[kf.branches.MLP()] * 2, fusion="gate")


def test_branch_dict_naming_missing_input():
    with pytest.raises(ValueError, match="'txt'.*inputs are \\['text'\\].*'text'"):
        kf.FusionModel(
            inputs={"text": keras.Input((5,), dtype="int32")},
            branches={"txt": [kf.branches.RNN(vocab_size=10)]},
        )


def test_branch_that_cannot_take_its_input():
    with pytest.raises(ValueError, match="MLP branch .* cannot take input 'signal' of shape"):
        kf.FusionModel(inputs=keras.Input((16, 4), name="signal"), branches=[kf.branches.MLP()])
    with pytest.raises(ValueError, match="vocab_size"):
        kf.FusionModel(
            inputs=keras.Input((16,), dtype="int32", name="ids"), branches=[kf.branches.CNN()]
        )


def test_list_of_branches_with_several_inputs():
    with pytest.raises(ValueError, match="must be a dict input name"):
        kf.FusionModel(
            inputs={"a": keras.Input((6,)), "b": keras.Input((6,))},
            branches=[kf.branches.MLP()],
        )


def test_vector_fusion_needs_pooled_branches():
    with pytest.raises(ValueError, match="pooling"):
        kf.FusionModel(
            inputs=keras.Input((16, 4)),
            branches=[kf.branches.CNN(pooling=None), kf.branches.RNN()],
            fusion="gated",
        )


def test_wrong_data_names_the_input_and_shape():
    model, used = _multimodal_model("concat")
    x, y = multimodal_classification(n=8)
    model.compile(optimizer="adam")
    with pytest.raises(ValueError, match="Missing input.*'tabular'.*\\(None, 5\\)"):
        model.fit({"image": x["image"], "text": x["text"]}, y, verbose=0)
    bad = dict(x, image=x["image"][:, :4])
    with pytest.raises(
        ValueError, match="Input 'image' expects arrays of shape \\(None, 8, 8, 1\\)"
    ):
        model.predict(bad, verbose=0)
    with pytest.raises(ValueError, match="Input 'text' expects integer token ids"):
        model.predict(dict(x, text=x["text"].astype("float32")), verbose=0)
    single = _sequence_model("concat")
    with pytest.raises(
        ValueError, match="Input 'signal' expects arrays of shape \\(None, 16, 4\\)"
    ):
        single.predict(np.zeros((2, 16, 5), "float32"), verbose=0)


def test_check_data_accepts_good_data():
    model, _ = _multimodal_model("concat")
    x, _ = multimodal_classification(n=4)
    model.check_data(x)
    out = model.predict(x, verbose=0)
    assert out.shape == (4, 1)
    assert helpers.as_numpy(out).dtype == np.float32


def _tiny_backbone_model():
    inp = keras.Input((16, 16, 3))
    out = keras.layers.Conv2D(4, 3, padding="same", name="conv")(inp)
    return keras.Model(inp, out, name="tiny")


def test_two_image_inputs_with_the_same_backbone_do_not_clash(tmp_path):
    # Two Backbone branches wrapping same-named inner models, one per image input.
    model = kf.FusionModel(
        inputs={"left": keras.Input((16, 16, 3)), "right": keras.Input((16, 16, 3))},
        branches={
            "left": kf.branches.Backbone(_tiny_backbone_model(), preprocess=False),
            "right": kf.branches.Backbone(_tiny_backbone_model(), preprocess=False),
        },
        fusion="attention",
        head=kf.heads.Classification(2),
    )
    names = [b.name for b in model.branch_layers]
    assert len(set(names)) == 2 and all(n.startswith("backbone_branch") for n in names)
    x = {
        k: np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
        for k in ("left", "right")
    }
    path = tmp_path / "two.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)


def test_a_dict_model_with_one_input_names_the_dict_it_takes():
    model = kf.FusionModel.from_spec(
        {
            "inputs": {"x": {"shape": [6]}},
            "branches": {"x": [{"type": "MLP", "units": [4]}]},
            "head": {"type": "Regression"},
        }
    )
    with pytest.raises(ValueError, match=r"takes a dict with its one input 'x'.*\{'x': array\}"):
        model.predict(np.zeros((2, 6), "float32"), verbose=0)
    assert model.predict({"x": np.zeros((2, 6), "float32")}, verbose=0).shape == (2, 1)
