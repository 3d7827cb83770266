"""What the commands share: the one-line user error, output helpers, loading a model file."""

import json
import os
import tempfile

from kfusion._startup import import_keras

EXIT_USAGE = 2


class UserError(Exception):
    """An error in what the user gave: printed as one line, exit code 2."""


def one_line(error):
    """The first line of an exception's message (keras appends dumps on later lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def say(args, *parts):
    if not getattr(args, "quiet", False):
        print(*parts, flush=True)


def check_writable_dir(path):
    """Creates `path` (a folder) or raises UserError when it can't be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".kfusion-write-test-", delete=True)
        probe.close()
    except OSError as e:
        raise UserError(f"cannot write to output folder {path!r}: {e.strerror or e}") from None


def give_normal_mode(path):
    """The mode a new file gets under the user's umask (`mkstemp` makes files 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def atomic_json(data, path):
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
        give_normal_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_any(path):
    """`(model, "keras" | "saved_model")` from a path; the path is checked before Keras loads."""
    if not os.path.exists(path):
        raise UserError(f"model not found: {path}")
    is_saved_model = os.path.isdir(path) and os.path.exists(os.path.join(path, "saved_model.pb"))
    if not path.endswith(".keras") and not is_saved_model:
        raise UserError(f"{path} is neither a .keras file nor a SavedModel folder")
    import_keras()
    if path.endswith(".keras"):
        from kfusion import export as kexport

        try:
            return kexport.load(path), "keras"
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: say so in one line
            raise UserError(f"cannot load {path}: {str(e).splitlines()[0]}") from None
    import tensorflow as tf

    try:
        return tf.saved_model.load(path), "saved_model"
    except Exception as e:  # noqa: BLE001 - a damaged SavedModel: say so in one line
        raise UserError(f"cannot load {path}: {one_line(e)}") from None
