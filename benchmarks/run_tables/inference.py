"""SavedModel latency of the FusionModel at batch 1 and batch 256."""

import os
import statistics

from _models import data, kfusion_model
from _timing import table, timed

NAME = "inference"


def measure(rounds, steps, done):
    import tempfile

    import tensorflow as tf

    from kfusion.export import export

    model = kfusion_model("concat")
    folder = tempfile.mkdtemp()
    x, _ = data(n=256)
    export(model, os.path.join(folder, "sm"), probe=x[:4])
    serve = tf.saved_model.load(os.path.join(folder, "sm")).signatures["serving_default"]
    result = {}
    for batch in (1, 256):
        xb = tf.constant(x[:batch])
        serve(xb)
        reps = 50 if batch == 1 else 5
        times = []
        for _ in range(rounds):
            times.append(timed(lambda _, xb=xb: serve(xb), reps))
        med = statistics.median(times)
        result[f"batch {batch}"] = {"median_ms": 1000 * med, "samples_per_s": batch / med}
    return result


def markdown(result):
    return f"""## Inference: SavedModel latency

{table(result, cols=("median_ms", "samples_per_s"))}"""
