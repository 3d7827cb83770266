"""How the command tests run `kfusion`, the spec and data they train on, and the one-line
error check."""

import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow", PYTHONUNBUFFERED="1")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The environment of a user who set no TensorFlow log level.
QUIET_ENV = {k: v for k, v in ENV.items() if k != "TF_CPP_MIN_LOG_LEVEL"}


def run_command(*args, timeout=600, env=ENV):
    """Runs `python -m kfusion ARGS` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "kfusion", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=timeout,
    )


def run_here(capsys, *args):
    """Runs the command's `main` in this process (no interpreter start-up): for the error paths
    and the commands that follow a real `python -m kfusion` run."""
    from kfusion.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("kfusion")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


SPEC = {
    "inputs": {"signal": {"shape": [12, 3], "dtype": "float32"}, "table": {"shape": [4]}},
    "branches": {
        "signal": [{"type": "CNN", "filters": [8], "name": "cnn"}],
        "table": [{"type": "MLP", "units": [8], "name": "mlp"}],
    },
    "fusion": "gated",
    "head": {"type": "Classification", "num_classes": 2},
    "optimizer": "adam",
    "learning_rate": 0.01,
    "epochs": 3,
    "batch_size": 32,
    "seed": 7,
}


def make_data(path, n=256):
    rng = np.random.default_rng(0)
    signal_ = rng.normal(size=(n, 12, 3)).astype("float32")
    table = rng.normal(size=(n, 4)).astype("float32")
    y = ((signal_[:, :, 0].mean(1) * 3 + table[:, 0]) > 0).astype("int32")
    np.savez(path, signal=signal_, table=table, y=y)
    return path
