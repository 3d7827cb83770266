"""The FusionModel under mixed_bfloat16 on an accelerator (`run.py --gpu`), kept in gpu.json.

Not part of the full run: `--gpu` times it alone and writes gpu.json; every RESULTS.md
rendering shows what gpu.json holds, or says that no accelerator was lent.
"""

import json
import os
import statistics

from _models import CLASSES, F, T, data, kfusion_model
from _timing import interleave, keras_stepper, table

NAME = "gpu"
HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


GPU_BATCHES = (64, 1024)


def train_flops(batch):
    """FLOPs of one training step of `kfusion_model()`: its matmuls and convolutions.

    Counted as 2 per multiply-add, forward pass x3 for a training step (the backward pass
    costs about twice the forward one); elementwise ops, norms and softmax are left out, so
    the achieved FLOP/s this gives is a lower bound on the work done.
    """
    d, ff, heads_dim = 64, 128, 64
    conv = 2 * T * 3 * (F * 64 + 64 * 64)  # two Conv1D, kernel 3
    lstm = 2 * T * 4 * 64 * (F + 64)  # input and recurrent matmuls of each step
    proj = 2 * T * F * d
    block = 2 * T * 4 * d * heads_dim + 2 * 2 * T * T * heads_dim + 2 * T * 2 * d * ff
    head = 2 * 3 * 64 * CLASSES
    return 3 * batch * (conv + lstm + proj + 2 * block + head)


def measure(rounds, steps, peak_tflops):
    """The FusionModel under mixed_bfloat16 on the backend's first device (JAX: XLA).

    Contenders are batch sizes, interleaved; each row gives samples/s, the achieved TFLOP/s
    of `train_flops` and, given `--peak-tflops`, its fraction of the device's peak.
    """
    import keras

    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        runners = {}
        for batch in GPU_BATCHES:
            x, y = data(n=batch * 4)
            runners[f"batch {batch}"] = keras_stepper(kfusion_model(), x, y, batch=batch)
        times = interleave(runners, rounds, steps)
    finally:
        keras.config.set_dtype_policy(previous)
    result = {"device": device_name()}
    for batch in GPU_BATCHES:
        median = statistics.median(times[f"batch {batch}"])
        tflops = train_flops(batch) / median / 1e12
        row = {"median_ms": 1000 * median, "samples_per_s": batch / median, "tflops": tflops}
        if peak_tflops:
            row["fraction_of_peak"] = tflops / peak_tflops
        result[f"batch {batch}"] = row
    return result


def device_name():
    import keras

    if keras.backend.backend() == "jax":
        import jax

        device = jax.devices()[0]
        return f"{device.platform}: {device.device_kind}"
    return f"{keras.backend.backend()}: default device"


NO_GPU = """\
No accelerator was lent to the session that wrote this file (the device tool's status said
`can_start_another: false`), so no GPU samples/s or fraction of peak FLOP/s is recorded here.
On a GPU machine, `KERAS_BACKEND=jax python benchmarks/run.py --gpu --peak-tflops P` (P: the
device's dense bf16 peak) times the FusionModel under `mixed_bfloat16`, writes
`benchmarks/gpu.json` and rewrites this section."""


def gpu_markdown(folder=HERE):
    path = os.path.join(folder, "gpu.json")
    if not os.path.exists(path):
        return NO_GPU
    with open(path) as f:
        saved = json.load(f)
    gpu = dict(saved["gpu"])
    device = gpu.pop("device")
    cols = ("median_ms", "samples_per_s", "tflops", "fraction_of_peak")
    return f"""Written by `python benchmarks/run.py --gpu` on {saved["date"]} ({device}; keras
{saved["versions"]["keras"]}, jax {saved["versions"]["jax"]}; peak taken as
{saved["peak_tflops"]} TFLOP/s). The FusionModel above under `mixed_bfloat16`, train_on_batch
on in-memory batches, {saved["rounds"]} interleaved rounds of {saved["steps"]} steps. `tflops`
counts the matmuls and convolutions only (`train_flops` in run_tables/gpu.py), so it is a
lower bound.

{table(gpu, cols=tuple(c for c in cols if any(c in r for r in gpu.values())))}"""


def markdown(folder=HERE):
    """The GPU section of RESULTS.md, from `folder`/gpu.json where there is one."""
    return f"""## GPU

{gpu_markdown(folder)}"""
