"""Every spec form the README shows trains with `kfusion train`, from the README's own text."""

import json
import os
import re

import numpy as np
import pytest
import yaml

from kfusion import export as kexport
from tests.cli.commands import ROOT, run_here
from tests.conftest import requires_tensorflow

pytestmark = requires_tensorflow  # the command's exports are TensorFlow formats

README = os.path.join(ROOT, "README.md")
SPECS = re.findall(r"```yaml\n(.*?)```", open(README, encoding="utf-8").read(), re.S)
ROWS = 40


def _data_for(spec, path):
    """Arrays for the spec's inputs (unknown lengths: 16 steps) and labels for its head."""
    rng = np.random.default_rng(0)
    arrays = {}
    for name, entry in spec["inputs"].items():
        shape = [16 if d is None else d for d in entry["shape"]]
        arrays[name] = rng.normal(size=(ROWS, *shape)).astype(entry.get("dtype", "float32"))
    head = spec["head"]
    if head["type"] == "Classification":
        arrays["y"] = (np.arange(ROWS) % head["num_classes"]).astype("int32")
    else:
        arrays["y"] = rng.normal(size=(ROWS, head.get("units", 1))).astype("float32")
    np.savez(path, **arrays)
    return path


def test_the_readme_shows_each_spec_form():
    forms = [yaml.safe_load(text) for text in SPECS]
    branches = [f["branches"] for f in forms]
    assert any(isinstance(b, dict) and len(b) == 1 for b in branches)  # mapping, one input
    assert any(isinstance(b, list) for b in branches)  # the list form
    assert any(isinstance(b, dict) and len(b) > 1 for b in branches)  # several inputs
    assert any("ref" in e for b in branches if isinstance(b, dict) for v in b.values() for e in v)


@pytest.mark.parametrize("index", range(len(SPECS)))
def test_readme_spec_trains(index, tmp_path, capsys, monkeypatch):
    spec = yaml.safe_load(SPECS[index])
    (tmp_path / "spec.yaml").write_text(SPECS[index])
    data = _data_for(spec, tmp_path / "data.npz")
    # The exports themselves are tested in test_train.py; here the model they are given
    # must run on the probe the command passes (a dict where the model takes one).
    exported = []

    def export(model, path, format, probe):
        model.predict(probe, verbose=0)
        exported.append(format)
        return str(path)

    monkeypatch.setattr(kexport, "export", export)
    out = tmp_path / "run"
    result = run_here(capsys, "train", tmp_path / "spec.yaml", "--data", data, "--out", out)
    assert result.returncode == 0, result.stderr[-2000:]
    assert exported == ["keras", "saved_model"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]["loss"]) == spec.get("epochs") or spec["recipe"]["max_epochs"]
    assert (out / "checkpoints" / "last.keras").exists()
