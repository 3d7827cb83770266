"""What `kfusion train --resume` continues from: the whole training state after each epoch.

After every epoch, `OUT/backup/epoch-NNNN/` holds the model's weights and the optimizer's
state (`model.weights.h5`), the state of every random generator (keras `SeedGenerator`s:
dropout masks; the data order is fixed, `shuffle=False`), the state of the recipe's
callbacks (learning-rate plateau, early stopping and its best weights) and the history of
every epoch so far. A folder is written under a hidden name and renamed into place, so a
run killed while it saves leaves the previous epoch's folder whole; the last two are kept.
Resuming from one gives the weights an uninterrupted run would have, bit for bit.

A backup that can't be read (a damaged disk, a file cut short) is passed over for the one
before it, with a line on stderr; when none can be read, the command stops with one line
saying to run again without `--resume`.
"""

import json
import os
import re
import shutil
import sys
import tempfile

import numpy as np

from kfusion.cli._common import UserError, one_line

KEEP = 2
_FOLDER = re.compile(r"^epoch-(\d{4,})$")
_WEIGHTS = "model.weights.h5"
_ARRAYS = "state.npz"
_STATE = "state.json"
# The attributes of keras' ReduceLROnPlateau and EarlyStopping that change from epoch to
# epoch (both reset them when training begins).
_CALLBACK_ATTRIBUTES = ("wait", "best", "best_epoch", "stopped_epoch", "cooldown_counter")


def seed_states(model):
    """The state variables of the model's random generators, in graph order."""
    weights = {id(v) for v in model.weights}
    return [v for v in model.variables if id(v) not in weights and v.name == "seed_generator_state"]


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


class Backup:
    """The backups in `folder` (OUT/backup): saved after each epoch, restored on resume."""

    def __init__(self, folder):
        self.folder = folder

    def clear(self):
        if os.path.isdir(self.folder):
            shutil.rmtree(self.folder)

    def _epochs(self):
        """`(epoch, path)` of every complete backup, oldest first."""
        if not os.path.isdir(self.folder):
            return []
        found = []
        for name in os.listdir(self.folder):
            match = _FOLDER.match(name)
            if match:
                found.append((int(match.group(1)), os.path.join(self.folder, name)))
        return sorted(found)

    # ------------------------------------------------------------------------ save
    def save(self, model, epochs_done, history, callbacks):
        """Writes the state after `epochs_done` epochs, then drops all but the last `KEEP`."""
        os.makedirs(self.folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".epoch-", dir=self.folder)
        try:
            model.save_weights(os.path.join(tmp, _WEIGHTS))
            arrays = {
                f"seed_{i}": np.asarray(v.numpy() if hasattr(v, "numpy") else v)
                for i, v in enumerate(seed_states(model))
            }
            states = []
            for c, callback in enumerate(callbacks):
                state = {a: _plain(getattr(callback, a, None)) for a in _CALLBACK_ATTRIBUTES}
                best = getattr(callback, "best_weights", None)
                state["best_weights"] = None if best is None else len(best)
                for i, w in enumerate(best or []):
                    arrays[f"callback_{c}_best_{i}"] = np.asarray(w)
                states.append(state)
            np.savez(os.path.join(tmp, _ARRAYS), **arrays)
            state = {
                "epochs_done": int(epochs_done),
                "history": history,
                "seeds": len(seed_states(model)),
                "callbacks": states,
                "stop_training": bool(getattr(model, "stop_training", False)),
            }
            with open(os.path.join(tmp, _STATE), "w", encoding="utf-8") as f:
                json.dump(state, f)
            final = os.path.join(self.folder, f"epoch-{epochs_done:04d}")
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
        for _, path in self._epochs()[:-KEEP]:
            shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.folder):  # hidden folders of a save that was killed
            if name.startswith(".epoch-") and os.path.join(self.folder, name) != tmp:
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    # --------------------------------------------------------------------- restore
    def restore(self, model):
        """Loads the newest readable backup into `model`; returns its state, or None.

        The model's optimizer is built first so that its state loads too. The returned
        dict holds `epochs_done`, `history`, `stop_training` and what `restore_callbacks`
        needs.
        """
        backups = self._epochs()
        if not backups:
            return None
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        damaged = []
        for epoch, path in reversed(backups):
            try:
                state = self._load(model, path)
            except Exception as e:  # noqa: BLE001 - any unreadable backup: try the one before
                damaged.append((path, e))
                continue
            for bad, error in damaged:
                print(
                    f"kfusion train: backup {bad} can't be read ({one_line(error)}); "
                    f"resuming after epoch {epoch} instead",
                    file=sys.stderr,
                )
            return state
        path, error = damaged[0]
        raise UserError(
            f"cannot resume: backup {path} can't be read ({one_line(error)}) and no earlier "
            f"one can; run again without --resume to start over (or remove {self.folder})"
        )

    def _load(self, model, path):
        with open(os.path.join(path, _STATE), encoding="utf-8") as f:
            state = json.load(f)
        with np.load(os.path.join(path, _ARRAYS), allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        seeds = seed_states(model)
        if state["seeds"] != len(seeds):
            raise ValueError(
                f"it holds {state['seeds']} random generator states, the model has "
                f"{len(seeds)} (was the spec changed?)"
            )
        model.load_weights(os.path.join(path, _WEIGHTS))
        for i, variable in enumerate(seeds):
            variable.assign(arrays[f"seed_{i}"])
        state["arrays"] = arrays
        return state

    @staticmethod
    def restore_callbacks(state, callbacks):
        """Puts the saved state back into `callbacks` (after their `on_train_begin`)."""
        arrays = state["arrays"]
        for c, (callback, saved) in enumerate(zip(callbacks, state["callbacks"])):
            for attribute in _CALLBACK_ATTRIBUTES:
                if hasattr(callback, attribute):
                    setattr(callback, attribute, saved[attribute])
            if saved.get("best_weights") is not None:
                callback.best_weights = [
                    arrays[f"callback_{c}_best_{i}"] for i in range(saved["best_weights"])
                ]


def callback(backup, state, tracked):
    """A keras callback that saves `backup` after every epoch (and restores `state`).

    `tracked`: the callbacks whose state is saved with the model's (the recipe's).
    """
    import keras

    class BackupCallback(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.history = dict(state["history"]) if state else {}

        def on_train_begin(self, logs=None):
            if state is not None:
                Backup.restore_callbacks(state, tracked)

        def on_epoch_end(self, epoch, logs=None):
            for key, value in (logs or {}).items():
                self.history.setdefault(key, []).append(float(value))
            backup.save(self.model, epoch + 1, self.history, tracked)

    return BackupCallback()
