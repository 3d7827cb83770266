"""MirroredStrategy over two logical CPU devices against one device (run by test_distribution).

Usage: `python tests/scale/mirrored_worker.py OUT.json`. Splits the CPU into two logical
devices (this must happen before TensorFlow initialises, hence a process of its own),
builds one FusionModel inside `MirroredStrategy.scope()` and the same model (same initial
weights) outside it, trains both with SGD on the same data and global batch, in order,
and writes what the test compares to OUT.json.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

_CPU = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _CPU, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kfusion as kf  # noqa: E402
from tests.scale.models import small_fusion_model as build  # noqa: E402

GLOBAL_BATCH = 16


def main(out_path):
    keras.utils.set_random_seed(0)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = build()
        mirrored.compile(optimizer=keras.optimizers.SGD(0.1))
    single = build()
    single.compile(optimizer=keras.optimizers.SGD(0.1))
    initial = mirrored.get_weights()
    single.set_weights(initial)

    x, y = kf.datasets.sequence_classification(n=64, length=8, features=3, seed=0)
    fit = {"batch_size": GLOBAL_BATCH, "epochs": 2, "shuffle": False, "verbose": 0}
    mirrored_history = mirrored.fit(x, y, **fit).history
    single_history = single.fit(x, y, **fit).history

    after_mirrored, after_single = mirrored.get_weights(), single.get_weights()
    result = {
        "replicas": strategy.num_replicas_in_sync,
        "variable_devices": sorted({v.device for v in mirrored.trainable_weights[0].value.values}),
        "weights": len(after_mirrored),
        "max_abs_diff": max(
            float(np.max(np.abs(a - b))) for a, b in zip(after_mirrored, after_single)
        ),
        "max_abs_change": max(
            float(np.max(np.abs(a - b))) for a, b in zip(after_mirrored, initial)
        ),
        "mirrored_loss": mirrored_history["loss"],
        "single_loss": single_history["loss"],
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
