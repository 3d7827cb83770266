"""The command starts fast and quietly (`kfusion._startup`): what can be checked without
TensorFlow is answered before it loads, and TensorFlow's start-up log stays hidden unless
the user's own `TF_CPP_MIN_LOG_LEVEL` asks for it (a whole run without it:
test_train.py::test_train_writes_model_and_metrics)."""

import os
import subprocess
import sys

import numpy as np
import yaml

from kfusion import _startup
from tests.cli.commands import QUIET_ENV, ROOT, SPEC

# The console script below finds kfusion on the path, installed or not.
PATHS = [ROOT, os.environ.get("PYTHONPATH")]
SCRIPT_ENV = dict(QUIET_ENV, PYTHONPATH=os.pathsep.join(p for p in PATHS if p))


def _imported_modules(*command):
    """`(result, top-level modules imported)` of a `python -X importtime` run."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", *command],
        capture_output=True,
        text=True,
        env=SCRIPT_ENV,
        cwd=ROOT,
        timeout=120,
    )
    modules = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    errors = [line for line in result.stderr.splitlines() if not line.startswith("import time:")]
    return result, modules, errors


def test_mistakes_are_answered_before_tensorflow_loads(tmp_path):
    np.savez(tmp_path / "d.npz", signal=np.zeros((4, 12, 3)), table=np.zeros((4, 4)), y=np.zeros(4))
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump({**SPEC, "epocs": 3}))
    (tmp_path / "seed.yaml").write_text(yaml.safe_dump({**SPEC, "seed": -1}))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(SPEC))
    (tmp_path / "file").write_text("")
    # The console script `pip install` writes, started by its own path.
    script = tmp_path / "kfusion"
    script.write_text("import sys\nfrom kfusion.cli import main\nsys.exit(main())\n")
    data = tmp_path / "d.npz"
    cases = [
        (("-m", "kfusion", "inspect", tmp_path / "none.keras"), "model not found"),
        ((script, "inspect", tmp_path / "none.keras"), "model not found"),
        (
            ("-m", "kfusion", "export", tmp_path / "x.keras", "--format", "onnx", "--out", "o"),
            "model not found",
        ),
        (("-m", "kfusion", "train", tmp_path / "none.yaml", "--data", data), "spec file not found"),
        (("-m", "kfusion", "train", tmp_path / "typo.yaml", "--data", data), "'epocs'"),
        (("-m", "kfusion", "train", tmp_path / "seed.yaml", "--data", data), "'seed' must be"),
        (
            ("-m", "kfusion", "train", tmp_path / "spec.yaml", "--data", "none.npz"),
            "data file not found",
        ),
        (
            (
                "-m",
                "kfusion",
                "train",
                tmp_path / "spec.yaml",
                "--data",
                data,
                "--out",
                tmp_path / "file" / "run",
            ),
            "is not a folder",
        ),
        (("-m", "kfusion", "demo", "--epochs", "0"), "--epochs must be >= 1"),
    ]
    for command, fragment in cases:
        result, modules, errors = _imported_modules(*map(str, command))
        assert result.returncode == 2, result.stderr[-2000:]
        assert len(errors) == 1 and fragment in errors[0], errors
        assert not modules & {"tensorflow", "keras", "jax", "torch"}, sorted(modules)


SAMPLE = (
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
    "I0000 00:00:1.0 1 port.cc:153] oneDNN custom operations are on.\n"
    "I0000 00:00:1.0 1 cpu_feature_guard.cc:227] This TensorFlow binary is optimized\n"
    "To enable the following instructions: AVX2 FMA, in other operations, rebuild.\n"
    "W0000 00:00:1.0 1 something.cc:1] a warning\n"
    "E0000 00:00:1.0 1 cuda_platform.cc:52] failed call to cuInit\n"
    "/path/to/module.py:3: UserWarning: a Python warning\n"
)


def test_start_up_log_is_filtered_by_the_level():
    lines = SAMPLE.splitlines(keepends=True)
    assert _startup.filter_tf_log(SAMPLE, 0) == SAMPLE
    assert _startup.filter_tf_log(SAMPLE, 1) == "".join(lines[:1] + lines[4:])
    assert _startup.filter_tf_log(SAMPLE, 2) == "".join(lines[5:])
    assert _startup.filter_tf_log(SAMPLE, 3) == lines[-1]  # Python's own lines stay


def test_started_as_command():
    assert _startup.started_as_command(["-m"], ["python", "-m", "kfusion", "train"])
    assert _startup.started_as_command(["-m"], ["python", "-X", "importtime", "-mkfusion"])
    assert not _startup.started_as_command(["-m"], ["python", "-m", "pytest", "kfusion"])
    assert _startup.started_as_command(["/venv/bin/kfusion", "demo"])
    assert not _startup.started_as_command(["/venv/bin/python", "kfusion"])
    assert not _startup.started_as_command([])
