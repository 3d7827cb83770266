"""`model.fit` of the FusionModel on NumPy arrays against a `tf.data` pipeline, and XLA."""

from _models import BATCH, data, kfusion_model
from _timing import interleave, summarise, table, timed

NAME = "pipeline"


def fit_stepper(model, x, y, pipeline="numpy", jit_compile="auto"):
    """Seconds per step of `model.fit` (one epoch of `steps` batches) on a given pipeline."""
    import keras
    import tensorflow as tf

    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        jit_compile=jit_compile,
    )

    def data_for(steps):
        n = steps * BATCH
        reps = -(-n // len(x))
        xs, ys = (np_tile(x, reps)[:n], np_tile(y, reps)[:n])
        if pipeline == "numpy":
            return {"x": xs, "y": ys, "batch_size": BATCH}
        ds = tf.data.Dataset.from_tensor_slices((xs, ys)).batch(BATCH, drop_remainder=True)
        return {"x": ds.prefetch(tf.data.AUTOTUNE)}

    model.fit(**data_for(2), epochs=1, verbose=0, shuffle=False)  # warm-up: trace/compile

    def run(steps):
        kwargs = data_for(steps)
        return timed(lambda _: model.fit(**kwargs, epochs=1, verbose=0, shuffle=False), 1) / steps

    return run


def np_tile(a, reps):
    import numpy as np

    return np.concatenate([a] * reps) if reps > 1 else a


def measure(rounds, steps, done):
    """`fit` on NumPy arrays vs a `tf.data` pipeline (fixed shapes, prefetch), and XLA."""
    x, y = data()
    runners = {
        "fit, NumPy arrays": fit_stepper(kfusion_model(), x, y, "numpy"),
        "fit, tf.data (drop_remainder, prefetch)": fit_stepper(kfusion_model(), x, y, "tf.data"),
        "fit, tf.data + jit_compile=True (XLA)": fit_stepper(
            kfusion_model(), x, y, "tf.data", jit_compile=True
        ),
    }
    # Epochs of 5x the steps: the end of a `fit` call sometimes takes about a second (keras
    # releasing the epoch's data iterator), a fixed cost that short epochs would magnify.
    return summarise(interleave(runners, rounds, 5 * steps), "fit, NumPy arrays")


def markdown(result):
    return f"""## Input pipeline and XLA: `model.fit` of the FusionModel (TensorFlow, CPU)

{table(result)}"""
