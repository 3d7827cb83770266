"""How the `kfusion` command starts: fast, and without TensorFlow's start-up log.

`import kfusion` imports every submodule (which registers each class a `.keras` file names)
and with them Keras and TensorFlow, which takes seconds. The command (`python -m kfusion`,
or the `kfusion` script) must answer a missing file or a malformed spec faster than that,
so while it starts, `kfusion/__init__.py` imports nothing heavy, and the command checks its
arguments, paths and spec keys first and only then calls `import_keras`.

TensorFlow writes its C++ start-up messages (absl's "All log messages before
absl::InitializeLog()", oneDNN, CUDA) to stderr before it reads `TF_CPP_MIN_LOG_LEVEL`.
`import_keras` sets `TF_CPP_MIN_LOG_LEVEL=3` unless the user set it, and drops the
messages written while TensorFlow loads that are below that level; everything else written
to stderr meanwhile is passed on.
"""

import importlib
import os
import re
import sys
import tempfile

COMMAND = "kfusion"
SUBMODULES = (
    "branches",
    "callbacks",
    "datasets",
    "ensemble",
    "export",
    "heads",
    "inspect",
    "layers",
    "models",
    "recipes",
    "tune",
)
DEFAULT_TF_LOG_LEVEL = "3"
# An absl/glog record: severity letter, MMDD, a space ("I0000 00:00:17... port.cc:153] ...").
_RECORD = re.compile(r"^([IWEF])\d{4} ")
_SEVERITY = {"I": 0, "W": 1, "E": 2, "F": 3}
_ABSL_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"
# Lines Python writes (warnings, tracebacks): never a record's continuation.
_PYTHON_LINE = re.compile(r"^(Traceback |  File |\S+\.py:\d+: \w+: |\w+(Error|Warning): )")


def started_as_command(argv=None, orig_argv=None):
    """Whether this process is the `kfusion` command starting (`python -m kfusion`, the script).

    While `python -m kfusion` imports the package, `sys.argv[0]` is `"-m"` and the module
    name follows `-m` in `sys.orig_argv`; the console script's `sys.argv[0]` is its path.
    """
    argv = sys.argv if argv is None else argv
    if not argv:
        return False
    if argv[0] == "-m":
        orig_argv = list(getattr(sys, "orig_argv", ()) if orig_argv is None else orig_argv)
        for i, arg in enumerate(orig_argv[1:], 1):
            if arg == "-m":
                return i + 1 < len(orig_argv) and orig_argv[i + 1] == COMMAND
            if arg.startswith("-m"):
                return arg[2:] == COMMAND
        return False
    name = os.path.basename(argv[0])
    return name in (COMMAND, f"{COMMAND}.exe", f"{COMMAND}-script.py")


def import_submodules():
    """Imports every kfusion submodule (each registers the classes it defines)."""
    for name in SUBMODULES:
        importlib.import_module(f"kfusion.{name}")


def filter_tf_log(text, min_level):
    """The part of `text` (stderr written while TensorFlow loads) that `min_level` keeps.

    Records below `min_level` (0 info, 1 warning, 2 error, 3 fatal only) are dropped with
    their continuation lines, as TensorFlow drops them once its logging has started;
    everything else (Python's warnings and tracebacks among it) is kept.
    """
    kept, keep_continuation = [], True
    for line in text.splitlines(keepends=True):
        record = _RECORD.match(line)
        if record:
            keep_continuation = _SEVERITY[record.group(1)] >= min_level
            keep = keep_continuation
        elif line.startswith(_ABSL_PREAMBLE):
            keep = keep_continuation = _SEVERITY["W"] >= min_level
        elif _PYTHON_LINE.match(line):
            keep = keep_continuation = True
        else:
            keep = keep_continuation
        if keep:
            kept.append(line)
    return "".join(kept)


def _tf_log_level():
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


def import_keras():
    """Imports Keras (and its backend) and every kfusion submodule; returns `keras`.

    Sets `TF_CPP_MIN_LOG_LEVEL` (unless set) before TensorFlow loads, and filters what
    TensorFlow writes to stderr while it loads by that level (see the module docstring).
    """
    if "keras" in sys.modules:
        import_submodules()
        return sys.modules["keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", DEFAULT_TF_LOG_LEVEL)
    level = _tf_log_level()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable stderr: nothing to filter
        saved = None
    if saved is None or level <= 0:
        if saved is not None:
            os.close(saved)
        import keras

        import_submodules()
        return keras
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras

            import_submodules()
        finally:
            try:
                sys.stderr.flush()
            except (OSError, ValueError):
                pass
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = filter_tf_log(captured.read().decode("utf-8", "replace"), level)
            if text:
                sys.stderr.write(text)
                sys.stderr.flush()
    return keras
