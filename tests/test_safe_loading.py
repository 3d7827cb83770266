"""Safe loading and atomic exports.

- every registered kfusion class saves and reloads with `safe_mode=True` (one sweep driven by
  keras' registry, so a new class without a case here fails the sweep);
- a `.keras` file naming an unknown class, or holding Python code, is refused clearly and
  runs nothing;
- no kfusion code calls eval/exec/pickle/marshal or an unsafe loader (an `ast` scan);
- an export that breaks midway leaves the earlier export at its path intact and loadable.
"""

import ast
import json
import os
import pathlib
import zipfile

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion import cli
from kfusion import export as kexport
from kfusion.ensemble._layers import EnsembleAverage, FrozenMember, MetaLearner
from kfusion.heads._base import SparseCategoricalCrossentropyWithSmoothing
from tests import helpers

PACKAGE = pathlib.Path(kf.__file__).parent
RNG = np.random.default_rng(0)


def _floats(*shape):
    return RNG.normal(size=shape).astype("float32")


def _probabilities(n, k):
    p = RNG.uniform(0.1, 1.0, size=(n, k)).astype("float32")
    return p / p.sum(-1, keepdims=True)


def _classifier(name):
    model = kf.FusionModel(
        inputs=keras.Input((4,), name="x"),
        branches=[kf.branches.MLP(units=(4,))],
        head=kf.heads.Classification(3),
        name=name,
    )
    model(_floats(2, 4))
    return model


def _tiny_image_model():
    i = keras.Input((None, None, 3))
    return keras.Model(i, keras.layers.Conv2D(4, 3, padding="same", name="conv")(i))


# class name -> () -> (keras.Model to save, its input data, the object whose class is tested)
def _layer_case(layer, arrays):
    return helpers.wrap(layer, arrays), arrays, layer


def _loss_case():
    loss = SparseCategoricalCrossentropyWithSmoothing(label_smoothing=0.1)
    i = keras.Input((4,))
    model = keras.Model(i, keras.layers.Dense(3, activation="softmax")(i))
    model.compile(optimizer="adam", loss=loss)
    model.optimizer.build(model.trainable_variables)
    return model, _floats(4, 4), loss


def _distiller_case():
    distiller = kf.ensemble.Distiller(_classifier("teacher"), _classifier("student"))
    x = _floats(4, 4)
    distiller(x)
    return distiller, x, distiller


def _fusion_model_case():
    model = kf.FusionModel(
        inputs={"a": keras.Input((5, 3)), "b": keras.Input((4,))},
        branches={"a": [kf.branches.CNN(filters=(4,))], "b": [kf.branches.MLP(units=(4,))]},
        fusion="gated",
        head=kf.heads.Classification(3),
    )
    x = {"a": _floats(4, 5, 3), "b": _floats(4, 4)}
    return model, x, model


def _missing_modalities_case():
    model = kf.FusionModel(
        inputs={"a": keras.Input((5, 3)), "b": keras.Input((4,))},
        branches={"a": [kf.branches.CNN(filters=(4,))], "b": [kf.branches.MLP(units=(4,))]},
        fusion="attention",
        head=kf.heads.Classification(3),
        modality_dropout=0.2,
    )
    layer = model.get_layer("missing_modalities")
    for v in layer.embeddings:
        v.assign(RNG.normal(size=v.shape).astype("float32"))
    x = {"a": _floats(4, 5, 3), "b": _floats(4, 4)}
    x.update(a_present=np.array([True, False, True, False]), b_present=np.ones(4, bool))
    return model, x, layer


def _with(case, layer_name):
    """A model case whose object under test is one of its layers."""
    model, x, _ = case
    return model, x, model.get_layer(layer_name)


def _loss_fusion_case():
    model = kf.FusionModel(
        inputs={"a": keras.Input((5, 3)), "b": keras.Input((4,))},
        branches={"a": [kf.branches.CNN(filters=(4,))], "b": [kf.branches.MLP(units=(4,))]},
        head=kf.heads.Classification(3),
        aux_loss_weight=0.5,
        balance="ogm",
    )
    model.get_layer("gradient_modulation").coefficients.assign([0.5, 1.0])
    x = {"a": _floats(4, 5, 3), "b": _floats(4, 4)}
    return model, x, model


CASES = {
    "AttentionFusion": lambda: _layer_case(kf.layers.AttentionFusion(4), [_floats(4, 3)] * 2),
    "ConcatFusion": lambda: _layer_case(kf.layers.ConcatFusion(4), [_floats(4, 3)] * 2),
    "CrossAttentionFusion": lambda: _layer_case(
        kf.layers.CrossAttentionFusion(dim=4, num_heads=2), [_floats(4, 5, 3), _floats(4, 2, 3)]
    ),
    "FiLMFusion": lambda: _layer_case(kf.layers.FiLMFusion(), [_floats(4, 3), _floats(4, 2)]),
    "GatedFusion": lambda: _layer_case(kf.layers.GatedFusion(4), [_floats(4, 3)] * 3),
    "LowRankFusion": lambda: _layer_case(kf.layers.LowRankFusion(4, rank=2), [_floats(4, 3)] * 2),
    "WeightedSumFusion": lambda: _layer_case(kf.layers.WeightedSumFusion(4), [_floats(4, 3)] * 2),
    "MissingModalities": _missing_modalities_case,
    "AuxiliaryHeads": lambda: _with(_loss_fusion_case(), "auxiliary_heads"),
    "GradientModulation": lambda: _with(_loss_fusion_case(), "gradient_modulation"),
    "BranchDropout": lambda: _layer_case(kf.layers.BranchDropout(0.3), [_floats(4, 3)] * 2),
    "InputNormalization": lambda: _layer_case(
        kf.layers.InputNormalization("series"), _floats(4, 6, 3)
    ),
    "PatchEmbedding": lambda: _layer_case(kf.layers.PatchEmbedding(4, 4), _floats(4, 8, 8, 3)),
    "PositionEmbedding": lambda: _layer_case(kf.layers.PositionEmbedding(8), _floats(4, 5, 4)),
    "MinGRU": lambda: _layer_case(kf.layers.MinGRU(4, return_sequences=True), _floats(4, 20, 3)),
    "MinLSTM": lambda: _layer_case(kf.layers.MinLSTM(4, go_backwards=True), _floats(4, 20, 3)),
    "TransformerBlock": lambda: _layer_case(
        kf.layers.TransformerBlock(num_heads=2, intermediate_dim=8), _floats(4, 5, 4)
    ),
    "CNN": lambda: _layer_case(kf.branches.CNN(filters=(4,)), _floats(4, 6, 3)),
    "RNN": lambda: _layer_case(kf.branches.RNN(units=4, cell="gru"), _floats(4, 6, 3)),
    "Transformer": lambda: _layer_case(
        kf.branches.Transformer(dim=4, depth=1, num_heads=2, vocab_size=10),
        RNG.integers(0, 10, size=(4, 6)).astype("int32"),
    ),
    "FCN": lambda: _layer_case(
        kf.branches.FCN(filters=(4, 4), kernel_sizes=(3, 3)), _floats(4, 6, 3)
    ),
    "ResNet": lambda: _layer_case(
        kf.branches.ResNet(filters=(4,), kernel_sizes=(3, 3, 3)), _floats(4, 6, 3)
    ),
    "InceptionTime": lambda: _layer_case(
        kf.branches.InceptionTime(depth=3, filters=4, kernel_sizes=(5, 3)), _floats(4, 6, 3)
    ),
    "MLP": lambda: _layer_case(kf.branches.MLP(units=(4,)), _floats(4, 3)),
    "Backbone": lambda: _layer_case(
        kf.branches.Backbone(_tiny_image_model(), preprocess=False), _floats(4, 8, 8, 3)
    ),
    "Classification": lambda: _layer_case(kf.heads.Classification(3), _floats(4, 3)),
    "MultiLabel": lambda: _layer_case(kf.heads.MultiLabel(3), _floats(4, 3)),
    "Regression": lambda: _layer_case(kf.heads.Regression(2), _floats(4, 3)),
    "MultiTask": lambda: _layer_case(
        kf.heads.MultiTask(
            {"a": kf.heads.Classification(3), "b": kf.heads.Regression()},
            loss_weights={"b": 0.5},
            uncertainty_weighting=True,
        ),
        _floats(4, 3),
    ),
    "EnsembleAverage": lambda: _layer_case(
        EnsembleAverage([0.5, 0.5], learned=True), [_probabilities(4, 3)] * 2
    ),
    "MetaLearner": lambda: _layer_case(
        MetaLearner(2, ["probabilities", "probabilities"], activation="softmax"),
        np.concatenate([_probabilities(4, 3)] * 2, axis=-1),
    ),
    "FrozenMember": lambda: _layer_case(FrozenMember(_classifier("member")), _floats(4, 4)),
    "SparseCategoricalCrossentropyWithSmoothing": _loss_case,
    "Distiller": _distiller_case,
    "FusionModel": _fusion_model_case,
}


def _registered_kfusion_names():
    return sorted(
        name.split(">", 1)[1]
        for name in keras.saving.get_custom_objects()
        if name.startswith("kfusion>")
    )


def test_every_registered_kfusion_class_has_a_loading_case():
    registered = _registered_kfusion_names()
    assert registered, "kfusion registered nothing"
    assert set(CASES) == set(registered), (
        f"registered but untested: {sorted(set(registered) - set(CASES))}; "
        f"tested but not registered: {sorted(set(CASES) - set(registered))}"
    )


def _objects_in(model):
    found = list(model._flatten_layers(include_self=True, recursive=True))
    for layer in list(found):
        found += [getattr(layer, a, None) for a in ("loss", "teacher", "student", "model")]
    return [o for o in found if o is not None]


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_kfusion_class_loads_with_safe_mode(tmp_path, name):
    cls = keras.saving.get_registered_object(f"kfusion>{name}")
    assert cls is not None and cls.__name__ == name
    model, x, obj = CASES[name]()
    assert isinstance(obj, cls)
    expected = helpers.as_numpy(model(x, training=False))
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert any(type(o) is cls for o in _objects_in(loaded)), f"no {name} in the reloaded model"
    got = helpers.as_numpy(loaded(x, training=False))
    for e, g in zip(keras.tree.flatten(expected), keras.tree.flatten(got)):
        np.testing.assert_allclose(g, e, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ refused .keras files
def _rewrite_config(path, new_path, edit):
    with zipfile.ZipFile(path) as archive:
        files = {n: archive.read(n) for n in archive.namelist()}
    config = json.loads(files["config.json"])
    edit(config)
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(new_path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return new_path


def _objects_named(config, registered_name):
    found, stack = [], [config]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("registered_name") == registered_name:
                found.append(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return found


@pytest.fixture
def saved_model_path(tmp_path):
    model, _, _ = _fusion_model_case()
    path = tmp_path / "good.keras"
    model.save(path)
    return path


def _unknown_class_file(saved_model_path, tmp_path):
    def edit(config):
        (gated,) = _objects_named(config, "kfusion>GatedFusion")
        gated["class_name"] = "NotAKfusionLayer"
        gated["registered_name"] = "kfusion>NotAKfusionLayer"

    return _rewrite_config(saved_model_path, tmp_path / "unknown.keras", edit)


def test_unknown_class_is_refused_with_a_clear_error(saved_model_path, tmp_path):
    path = _unknown_class_file(saved_model_path, tmp_path)
    # keras itself refuses it (its message ends with the class name) ...
    with pytest.raises(TypeError, match="NotAKfusionLayer"):
        keras.saving.load_model(path, safe_mode=True)
    # ... and kfusion's loader says so first, in a short message, before loading anything.
    with pytest.raises(ValueError) as info:
        kexport.load(path)
    message = str(info.value)
    assert message.index("'NotAKfusionLayer'") < 200, message
    assert "kfusion.layers.gated_fusion" in message and len(message) < 600
    assert isinstance(kexport.load(saved_model_path), kf.FusionModel)


def test_unknown_module_is_refused_and_nothing_runs(saved_model_path, tmp_path):
    canary = tmp_path / "canary"

    def edit(config):
        (gated,) = _objects_named(config, "kfusion>GatedFusion")
        gated.update(module="os", class_name="system", registered_name=None)
        gated["config"] = f"touch {canary}"

    path = _rewrite_config(saved_model_path, tmp_path / "os.keras", edit)
    with pytest.raises(ValueError, match="'system' \\(module 'os'"):
        kexport.load(path)
    with pytest.raises(TypeError, match="system"):
        keras.saving.load_model(path, safe_mode=True)
    assert not canary.exists()


def test_python_code_in_a_file_never_runs(tmp_path):
    canary = tmp_path / "canary"
    i = keras.Input((3,))
    leak = keras.layers.Lambda(lambda x, p=str(canary): (open(p, "w").close(), x)[1])
    model = keras.Model(i, leak(kf.layers.ConcatFusion()([i, i])))
    path = tmp_path / "lambda.keras"
    model.save(path)
    canary.unlink(missing_ok=True)  # building the model ran the lambda
    for load in (kexport.load, lambda p: keras.saving.load_model(p, safe_mode=True)):
        with pytest.raises(ValueError, match="safe_mode"):
            load(path)
    assert not canary.exists()


def test_not_a_keras_file_is_refused(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="not a readable .keras file"):
        kexport.load(path)
    with pytest.raises(ValueError, match="path="):
        kexport.load(tmp_path / "model.h5")


def test_cli_inspect_refuses_an_unknown_class_in_one_line(saved_model_path, tmp_path, capsys):
    path = _unknown_class_file(saved_model_path, tmp_path)
    assert cli.main(["inspect", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kfusion inspect: error: cannot load")
    assert "'NotAKfusionLayer'" in lines[0]


# -------------------------------------------------------------------------- code scan
_UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
_UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve"}


def _dotted(node):
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def unsafe_calls(source, filename="<source>"):
    """Lines of `source` that could run code or unpickle data from a file."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in _UNSAFE_MODULES:
                    found.append(f"{where} import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if (node.module or "").split(".")[0] in _UNSAFE_MODULES:
                found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func) or ""
            keywords = {k.arg: k.value for k in node.keywords}
            last = name.rsplit(".", 1)[-1]
            if name in _UNSAFE_BUILTINS:
                found.append(f"{where} {name}()")
            elif name.split(".")[0] in _UNSAFE_MODULES:
                found.append(f"{where} {name}()")
            elif name in ("torch.load", "yaml.load", "yaml.unsafe_load", "yaml.full_load"):
                found.append(f"{where} {name}()")
            elif name in ("np.load", "numpy.load"):
                flag = keywords.get("allow_pickle")
                if not (isinstance(flag, ast.Constant) and flag.value is False):
                    found.append(f"{where} {name}() without allow_pickle=False")
            elif last in ("load_model", "deserialize_keras_object", "from_config"):
                flag = keywords.get("safe_mode")
                if isinstance(flag, ast.Constant) and flag.value is False:
                    found.append(f"{where} {name}(safe_mode=False)")
            elif last == "enable_unsafe_deserialization":
                found.append(f"{where} {name}()")
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = (
        "import pickle\nfrom marshal import loads\neval('1')\nexec('x=1')\n"
        "np.load(p)\nnp.load(p, allow_pickle=True)\ntorch.load(p)\nyaml.load(s)\n"
        "keras.saving.load_model(p, safe_mode=False)\n"
        "keras.config.enable_unsafe_deserialization()\n"
    )
    assert len(unsafe_calls(bad)) == 10
    good = "np.load(p, allow_pickle=False)\nyaml.safe_load(s)\nmodel.compile()\n"
    assert unsafe_calls(good) == []


def test_no_kfusion_code_runs_or_unpickles_user_files():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    found = []
    for path in files:
        found += unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))
    assert found == []


def test_numpy_loads_in_kfusion_refuse_pickles():
    uses = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if "np.load(" in path.read_text(encoding="utf-8")
    ]
    # reading --data, for train and for export's quantization alike (the scan above checks
    # allow_pickle=False), the resume backup's random-generator states, and the script the
    # demo runs in a fresh process to reload its own arrays
    assert sorted(uses) == ["cli/_backup.py", "cli/_data.py", "cli/demo.py"]


# ---------------------------------------------------------------------- atomic exports
def _vector_model(seed):
    keras.utils.set_random_seed(seed)
    return kf.FusionModel(
        inputs=keras.Input((4,), name="x"),
        branches=[kf.branches.MLP(units=(4,))],
        head=kf.heads.Regression(),
    )


FORMATS = ["keras", "saved_model"]


def _needs_saved_model(fmt):
    if fmt == "saved_model" and keras.config.backend() == "torch":
        pytest.skip("SavedModel export needs the TensorFlow or JAX backend")


def _reload_outputs(path, fmt, x):
    if fmt == "keras":
        return kexport.load(path).predict(x, verbose=0)
    import tensorflow as tf

    reloaded = tf.saved_model.load(str(path))
    return np.asarray(reloaded.serve(x))


@pytest.fixture
def earlier(tmp_path, request):
    """An earlier export at the destination, and what it returns on a probe batch."""
    fmt = request.param
    _needs_saved_model(fmt)
    x = _floats(4, 4)
    path = tmp_path / ("m.keras" if fmt == "keras" else "saved")
    model = _vector_model(0)
    kexport.export(model, path, format=fmt, probe=x)
    return fmt, path, x, model.predict(x, verbose=0)


def _assert_intact(tmp_path, fmt, path, x, expected):
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary files left behind
    np.testing.assert_allclose(_reload_outputs(path, fmt, x), expected, atol=1e-5)


@pytest.mark.parametrize("earlier", FORMATS, indirect=True)
def test_writer_failing_midway_keeps_the_earlier_export(tmp_path, earlier, monkeypatch):
    fmt, path, x, expected = earlier
    real_writer = kexport._WRITERS[fmt]

    def breaks_midway(model, tmp, probe, atol, rtol):
        real_writer(model, tmp, probe, atol, rtol)  # a complete, verified new export ...
        raise OSError("disk full")  # ... and then the process fails before publishing

    monkeypatch.setitem(kexport._WRITERS, fmt, breaks_midway)
    with pytest.raises(OSError, match="disk full"):
        kexport.export(_vector_model(1), path, format=fmt, probe=x)
    _assert_intact(tmp_path, fmt, path, x, expected)


@pytest.mark.parametrize("earlier", FORMATS, indirect=True)
def test_unwritable_target_keeps_the_earlier_export(tmp_path, earlier, monkeypatch):
    # The final rename onto the target fails (a read-only or busy target): the earlier
    # export, moved aside a moment before, must be put back.
    fmt, path, x, expected = earlier
    real_replace = os.replace

    def replace(src, dst):
        if os.fspath(dst) == str(path) and not os.fspath(src).endswith(".previous"):
            raise PermissionError(13, "Permission denied", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(kexport.os, "replace", replace)
    with pytest.raises(PermissionError):
        kexport.export(_vector_model(1), path, format=fmt, probe=x)
    monkeypatch.undo()
    _assert_intact(tmp_path, fmt, path, x, expected)


def test_export_never_replaces_a_folder_it_did_not_write(tmp_path):
    x = _floats(4, 4)
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(IsADirectoryError, match="writes a file"):
        kexport.export(_vector_model(0), folder, format="keras", probe=x)
    if keras.config.backend() != "torch":
        with pytest.raises(FileExistsError, match="not a SavedModel"):
            kexport.export(_vector_model(0), folder, format="saved_model", probe=x)
        file_target = tmp_path / "m.keras"
        file_target.write_text("a file")
        with pytest.raises(FileExistsError, match="not a folder"):
            kexport.export(_vector_model(0), file_target, format="saved_model", probe=x)
        assert file_target.read_text() == "a file"
    assert (folder / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(folder)) == ["notes.txt"]
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]  # no temporary files
