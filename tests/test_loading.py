"""Loading never reaches outside the archive, and every damaged or crafted file is a clear
`ValueError`: a Backbone config naming weights (a download, a local file), `builtins` and
`keras.config` names, a bit flipped in the weights, a branch that reloads under another
name. And exports clean up the temporary folders of an export killed midway."""

import json
import os
import zipfile

import keras
import numpy as np
import pytest

import kfusion as kf
from kfusion import export as kexport
from kfusion.cli import main


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


def _objects(config, registered_name):
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
def backbone_model_path(tmp_path):
    tiny = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Conv2D(4, 3)])
    model = kf.FusionModel(
        inputs=keras.Input((16, 16, 3), name="image"),
        branches=[kf.branches.Backbone(tiny, name="backbone")],
        head=kf.heads.Classification(2),
    )
    path = tmp_path / "backbone.keras"
    model.save(path)
    return path


@pytest.mark.parametrize("weights", ["imagenet", "weights_file"])
def test_a_backbone_config_naming_weights_is_refused(
    backbone_model_path, tmp_path, monkeypatch, capsys, weights
):
    if weights == "weights_file":  # a file on this machine that the config names
        other = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3)])
        weights = str(tmp_path / "other.weights.h5")
        other.save_weights(weights)

    def edit(config):
        (backbone,) = _objects(config, "kfusion>Backbone")
        backbone["config"]["weights"] = weights

    path = _rewrite_config(backbone_model_path, tmp_path / "crafted.keras", edit)
    fetched = []
    monkeypatch.setattr(keras.utils, "get_file", lambda *a, **k: fetched.append(a))
    with pytest.raises(ValueError, match="Backbone 'backbone' with weights=") as info:
        kexport.load(path)
    assert repr(weights) in str(info.value) and len(str(info.value)) < 800
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "weights=" in err[0]
    # The class refuses such a config on its own, too (keras.saving.load_model).
    (config,) = _objects(json.loads(zipfile.ZipFile(path).read("config.json")), "kfusion>Backbone")
    with pytest.raises(ValueError, match="never downloads them or reads a file"):
        kf.branches.Backbone.from_config(config["config"])
    assert fetched == []
    assert isinstance(kexport.load(backbone_model_path), kf.FusionModel)


@pytest.mark.parametrize(
    "module, name, fragment",
    [
        ("builtins", "eval", "'eval' (module 'builtins': not a keras function)"),
        ("keras.config", "enable_unsafe_deserialization", "keras.config.enable_unsafe"),
        ("keras.utils", "get_file", "keras.utils.get_file (not a modelling object)"),
    ],
)
def test_builtins_and_keras_config_names_are_refused_up_front(tmp_path, module, name, fragment):
    i = keras.Input((3,), name="x")
    model = keras.Model(i, keras.layers.Dense(2, activation="relu")(i))
    model.save(tmp_path / "m.keras")

    def edit(config):
        (dense,) = [layer for layer in config["config"]["layers"] if layer["class_name"] == "Dense"]
        dense["config"]["activation"] = {
            "module": module,
            "class_name": "function",
            "config": name,
            "registered_name": name,
        }

    path = _rewrite_config(tmp_path / "m.keras", tmp_path / "crafted.keras", edit)
    with pytest.raises(ValueError, match="names what loading refuses") as info:
        kexport.load(path)
    assert fragment in str(info.value) and "could not be deserialized" not in str(info.value)
    # A keras activation saved by name with module "builtins" (as keras does) still loads.
    model = keras.Model(i, keras.layers.Dense(2, activation="gelu")(i))
    model.save(tmp_path / "gelu.keras")
    assert kexport.load(tmp_path / "gelu.keras").layers[-1].activation.__name__ == "gelu"


def test_a_bit_flipped_weights_file_is_a_value_error(tmp_path):
    model = kf.FusionModel(inputs=keras.Input((4,), name="x"), branches=[kf.branches.MLP()])
    model.save(tmp_path / "m.keras")
    data = bytearray((tmp_path / "m.keras").read_bytes())
    with zipfile.ZipFile(tmp_path / "m.keras") as archive:
        info = archive.getinfo("model.weights.h5")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start + info.compress_size // 2] ^= 0xFF
    (tmp_path / "flipped.keras").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="is damaged and could not be loaded.*CRC"):
        kexport.load(tmp_path / "flipped.keras")


@keras.saving.register_keras_serializable(package="tests")
class _KwBranch(keras.layers.Layer):
    """A user branch whose `__init__` takes `**kw`: keras' automatic config drops its name."""

    def __init__(self, units=4, **kw):
        super().__init__(**kw)
        self.units = units
        self.dense = keras.layers.Dense(units)

    def build(self, input_shape):
        self.dense.build(input_shape)

    def call(self, x):
        return self.dense(x)


def test_a_branch_that_reloads_under_another_name_is_said(tmp_path):
    model = kf.FusionModel(
        inputs=keras.Input((3,), name="x"),
        branches=[_KwBranch(4, name="mine"), kf.branches.MLP(units=(4,))],
    )
    model.save(tmp_path / "m.keras")
    with pytest.raises(ValueError, match=r"lists branch\(es\) \['mine'\].*\*\*kwargs"):
        kexport.load(tmp_path / "m.keras")


def test_export_removes_what_an_interrupted_export_left(tmp_path):
    model = kf.FusionModel(inputs=keras.Input((4,), name="x"), branches=[kf.branches.MLP()])
    stale = [tmp_path / ".m.keras.tmp-999999999-abcd", tmp_path / ".m.keras.tmp-x1y2z3"]
    running = tmp_path / f".m.keras.tmp-{os.getppid()}-efgh"  # a process that runs
    other = tmp_path / ".other.keras.tmp-999999999-abcd"  # another export's
    for folder in (*stale, running, other):
        folder.mkdir()
        (folder / "export.keras").write_bytes(b"half")
    kexport.export(model, tmp_path / "m.keras", format="keras", probe=np.ones((2, 4), "float32"))
    assert sorted(os.listdir(tmp_path)) == sorted(["m.keras", running.name, other.name])
