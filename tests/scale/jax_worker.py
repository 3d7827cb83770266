"""Runs the README's JAX distribution blocks on two CPU devices (run by test_distribution).

Usage: `python tests/scale/jax_worker.py OUT.json DATA_PARALLEL.py MODEL_PARALLEL.py` with
`KERAS_BACKEND=jax` and `XLA_FLAGS=--xla_force_host_platform_device_count=2` (process-global
settings, hence a process of its own). Each block runs as written (after one
`keras.utils.set_random_seed(0)`, so the run repeats); what the test checks
(devices, how every variable and a batch are laid out, the losses) goes to OUT.json.
"""

import json
import sys


def _layout(model, batch_shape):
    import keras

    variables = []
    for v in model.weights:
        value = v.value
        variables.append(
            {
                "path": v.path,
                "shape": list(v.shape),
                "devices": len(value.sharding.device_set),
                "shard_shapes": sorted({tuple(s.data.shape) for s in value.addressable_shards}),
            }
        )
    distribution = keras.distribution.distribution()
    data = distribution.get_data_layout(batch_shape)
    return {
        "distribution": type(distribution).__name__,
        "mesh_shape": list(distribution.device_mesh.shape),
        "mesh_axes": list(distribution.device_mesh.axis_names),
        "data_axes": list(data.axes),
        "variables": variables,
    }


def run_block(path):
    with open(path, encoding="utf-8") as f:
        code = f.read()
    namespace = {"__name__": "__readme__"}
    exec(compile(code, path, "exec"), namespace)
    model, history = namespace["model"], namespace["history"]
    result = _layout(model, (64,) + tuple(model.input_shape[1:]))
    result["loss"] = [float(v) for v in history.history["loss"]]
    result["compute_dtype"] = model.compute_dtype
    return result


def main(out_path, *blocks):
    import jax
    import keras

    keras.utils.set_random_seed(0)  # the blocks do not seed: make the run repeatable
    result = {
        "backend": keras.config.backend(),
        "devices": [str(d) for d in jax.devices()],
        "blocks": [run_block(path) for path in blocks],
    }
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
