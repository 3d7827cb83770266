"""kfusion benchmarks: one command, rewrites benchmarks/RESULTS.md.

    python benchmarks/run.py            # all sections (20-30 minutes on 2 cores)
    python benchmarks/run.py --quick    # fewer rounds, for a smoke run
    python benchmarks/run.py --render   # RESULTS.md again from results.json and NOTES.md

Method: every comparison interleaves its contenders (A, B, A, B, ...) over several rounds,
each round timing a fixed number of training steps after a warm-up, so drift on a shared
machine hits all contenders alike. Reported: the median step time per contender and the
ratio of medians. Timings live here, never in the test suite.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

T, F, BATCH, CLASSES = 64, 32, 64, 10


def data(n=BATCH * 8, seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, T, F)).astype("float32")
    y = rng.integers(0, CLASSES, size=(n,)).astype("int32")
    return x, y


# ---------------------------------------------------------------------------- models
def kfusion_model(fusion="concat", branches=("cnn", "rnn", "transformer")):
    import keras

    import kfusion as kf

    make = {
        "cnn": lambda: kf.branches.CNN(filters=(64, 64), kernel_size=3),
        "rnn": lambda: kf.branches.RNN(units=64, cell="lstm"),
        "transformer": lambda: kf.branches.Transformer(
            dim=64, depth=2, num_heads=4, intermediate_dim=128
        ),
    }
    return kf.FusionModel(
        inputs=keras.Input((T, F), name="signal"),
        branches=[make[b]() for b in branches],
        fusion=fusion,
        head=kf.heads.Classification(CLASSES),
    )


def hand_model():
    """The same network as `kfusion_model("concat")`, written with plain keras layers."""
    import keras
    from keras import layers

    inp = keras.Input((T, F))
    c = layers.Conv1D(64, 3, padding="same", activation="relu")(inp)
    c = layers.Conv1D(64, 3, padding="same", activation="relu")(c)
    c = layers.GlobalAveragePooling1D()(c)
    r = layers.LSTM(64)(inp)
    t = layers.Dense(64)(inp)
    t = PositionAdd(T)(t)
    for _ in range(2):
        h = layers.LayerNormalization(epsilon=1e-6)(t)
        h = layers.MultiHeadAttention(4, 16)(h, h)
        t = t + h
        h = layers.LayerNormalization(epsilon=1e-6)(t)
        h = layers.Dense(128, activation="gelu")(h)
        h = layers.Dense(64)(h)
        t = t + h
    t = layers.LayerNormalization(epsilon=1e-6)(t)
    t = layers.GlobalAveragePooling1D()(t)
    fused = layers.Concatenate()([c, r, t])
    out = layers.Dense(CLASSES, activation="softmax")(fused)
    return keras.Model(inp, out)


def _position_add_class():
    import keras

    class _PositionAdd(keras.layers.Layer):
        def __init__(self, length, **kwargs):
            super().__init__(**kwargs)
            self.length = length

        def build(self, shape):
            self.table = self.add_weight(shape=(self.length, shape[-1]), name="table")

        def call(self, x):
            return x + self.table[None, : keras.ops.shape(x)[1]]

    return _PositionAdd


def PositionAdd(length):  # noqa: N802 - reads like a layer
    return _position_add_class()(length)


def torch_model(branches=("cnn", "rnn", "transformer")):
    """The network in plain PyTorch; `branches` picks a subset (each alone: its own head)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1 = nn.LayerNorm(64, eps=1e-6)
            self.att = nn.MultiheadAttention(64, 4, batch_first=True)
            self.n2 = nn.LayerNorm(64, eps=1e-6)
            self.ff = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64))

        def forward(self, x):
            h = self.n1(x)
            x = x + self.att(h, h, h, need_weights=False)[0]
            return x + self.ff(self.n2(x))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            if "cnn" in branches:
                self.c1 = nn.Conv1d(F, 64, 3, padding=1)
                self.c2 = nn.Conv1d(64, 64, 3, padding=1)
            if "rnn" in branches:
                self.lstm = nn.LSTM(F, 64, batch_first=True)
            if "transformer" in branches:
                self.proj = nn.Linear(F, 64)
                self.pos = nn.Parameter(torch.zeros(T, 64))
                self.blocks = nn.ModuleList([Block(), Block()])
                self.norm = nn.LayerNorm(64, eps=1e-6)
            self.head = nn.Linear(64 * len(branches), CLASSES)

        def forward(self, x):
            features = []
            if "cnn" in branches:
                c = torch.relu(self.c2(torch.relu(self.c1(x.transpose(1, 2)))))
                features.append(c.mean(-1))
            if "rnn" in branches:
                features.append(self.lstm(x)[0][:, -1])
            if "transformer" in branches:
                t = self.proj(x) + self.pos
                for b in self.blocks:
                    t = b(t)
                features.append(self.norm(t).mean(1))
            return self.head(torch.cat(features, -1))

    return Net()


def hand_branch_model(branch):
    """One branch of `hand_model` alone, with its own Dense head (for the per-branch table)."""
    import keras

    model = hand_model()
    index = {"cnn": 0, "rnn": 1, "transformer": 2}[branch]
    concat = next(layer for layer in model.layers if isinstance(layer, keras.layers.Concatenate))
    feature = concat.input[index]
    out = keras.layers.Dense(CLASSES, activation="softmax")(feature)
    return keras.Model(model.input, out)


# ---------------------------------------------------------------------------- timing
def timed(fn, calls):
    """Seconds per call of `fn(i)` for i in range(calls), with garbage collection kept out.

    As `timeit` does: one full collection before, none during. With TensorFlow loaded a full
    collection takes about a second, and would otherwise land on whichever round it falls in.
    """
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for i in range(calls):
            fn(i)
        return (time.perf_counter() - start) / calls
    finally:
        gc.enable()


def keras_stepper(model, x, y, jit_compile="auto", batch=BATCH):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        jit_compile=jit_compile,
    )

    def rows(a, i):
        return [v[i : i + batch] for v in a] if isinstance(a, list) else a[i : i + batch]

    batches = [(rows(x, i), y[i : i + batch]) for i in range(0, len(y), batch)]
    for bx, by in batches[:2]:
        model.train_on_batch(bx, by)  # warm-up: tracing and compilation

    def run(steps):
        return timed(lambda i: model.train_on_batch(*batches[i % len(batches)]), steps)

    return run


def torch_stepper(x, y, compile_model=False, branches=("cnn", "rnn", "transformer")):
    import torch

    if os.environ.get("KFUSION_BENCH_TORCH_THREADS"):
        torch.set_num_threads(int(os.environ["KFUSION_BENCH_TORCH_THREADS"]))
    torch.manual_seed(0)
    net = torch_model(branches)
    if compile_model:
        net = torch.compile(net)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y).long()
    batches = [(xt[i : i + BATCH], yt[i : i + BATCH]) for i in range(0, len(x), BATCH)]

    def step(bx, by):
        opt.zero_grad()
        loss = loss_fn(net(bx), by)
        loss.backward()
        opt.step()

    for bx, by in batches[:2]:
        step(bx, by)

    def run(steps):
        return timed(lambda i: step(*batches[i % len(batches)]), steps)

    return run


def torch_process(compile_model=False, branches=("cnn", "rnn", "transformer")):
    """`torch_stepper` in a child process, driven round by round from this one.

    TensorFlow and PyTorch each keep their own thread pools; in one process they compete for
    the same cores between steps. The child holds PyTorch alone and times only when asked,
    so the runs stay interleaved while neither framework's threads touch the other's.
    """
    import atexit

    cmd = [sys.executable, __file__, "--serve-torch", ",".join(branches)]
    if compile_model:
        cmd.append("--compile")
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    atexit.register(proc.kill)

    def reply():
        while True:
            line = proc.stdout.readline()
            if not line:
                error = (proc.stderr.read().strip().splitlines() or ["no output"])[-1]
                raise RuntimeError(f"the PyTorch process stopped: {error[:200]}")
            if line.startswith("KFB "):
                return line[4:].strip()

    reply()  # "ready": built, warmed up (and compiled)

    def run(steps):
        proc.stdin.write(f"{steps}\n")
        proc.stdin.flush()
        return float(reply())

    run.close = proc.kill
    return run


def serve_torch(branches, compile_model):
    x, y = data()
    run = torch_stepper(x, y, compile_model=compile_model, branches=tuple(branches.split(",")))
    print("KFB ready", flush=True)
    for line in sys.stdin:
        print(f"KFB {run(int(line))!r}", flush=True)


def interleave(runners, rounds, steps):
    """{name: [seconds per step, one per round]}, contenders alternating within rounds.

    Child processes behind the runners (PyTorch's) are stopped once the rounds are done.
    """
    times = {name: [] for name in runners}
    try:
        for r in range(rounds):
            order = list(runners) if r % 2 == 0 else list(reversed(runners))
            for name in order:
                times[name].append(runners[name](steps))
    finally:
        for run in runners.values():
            getattr(run, "close", lambda: None)()
    return times


def summarise(times, baseline):
    base = statistics.median(times[baseline])
    return {
        name: {
            "median_ms": 1000 * statistics.median(v),
            "ratio": statistics.median(v) / base,
            "samples_per_s": BATCH / statistics.median(v),
        }
        for name, v in times.items()
    }


# -------------------------------------------------------------------------- sections
def section_overhead(rounds, steps):
    x, y = data()
    import keras

    keras.utils.set_random_seed(0)
    runners = {
        "hand-written keras": keras_stepper(hand_model(), x, y),
        "kfusion FusionModel": keras_stepper(kfusion_model("concat"), x, y),
    }
    return summarise(interleave(runners, rounds, steps), "hand-written keras")


def section_fusions(rounds, steps):
    x, y = data()
    kinds = ["concat", "weighted", "attention", "gated", "low_rank", "cross_attention"]
    runners = {k: keras_stepper(kfusion_model(k), x, y) for k in kinds}
    # Twice the rounds: the differences sought (a few percent) are the size of the noise.
    result = summarise(interleave(runners, 2 * rounds, steps), "concat")
    # FiLM fuses exactly two branches (one conditions the other): its own two-branch pair.
    pair = ("transformer", "cnn")
    runners = {k: keras_stepper(kfusion_model(k, pair), x, y) for k in ("concat", "film")}
    pair_result = summarise(interleave(runners, rounds, steps), "concat")
    result["concat (Transformer, CNN only)"] = pair_result["concat"]
    result["film (Transformer conditioned on CNN)"] = pair_result["film"]
    return result


def fusion_layer_model(kind):
    """The fusion layer alone on three 64-wide branch features (FiLM: two), with a Dense head."""
    import keras

    from kfusion.models._factory import make_fusion

    features = [keras.Input((64,)) for _ in range(2 if kind == "film" else 3)]
    fused = make_fusion(kind, [64] * len(features))(features)
    return keras.Model(features, keras.layers.Dense(CLASSES, activation="softmax")(fused))


def section_fusion_layers(rounds, steps, step_ms):
    """Each fusion layer's own training-step cost, isolated from the branches.

    In the full model the few-percent differences between fusion kinds are the size of the
    run-to-run noise; alone, each layer's cost is measured to a fraction of a millisecond.
    `implied_ratio` adds that cost (over concat's) to the full model's concat step.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    x = [rng.normal(size=(BATCH * 8, 64)).astype("float32") for _ in range(3)]
    y = rng.integers(0, CLASSES, size=BATCH * 8).astype("int32")
    kinds = ["concat", "weighted", "attention", "gated", "low_rank", "cross_attention", "film"]
    runners = {
        k: keras_stepper(fusion_layer_model(k), x[:2] if k == "film" else x, y) for k in kinds
    }
    result = summarise(interleave(runners, rounds, 5 * steps), "concat")
    base = result["concat"]["median_ms"]
    for r in result.values():
        r["added_ms"] = r["median_ms"] - base
        r["implied_ratio"] = (step_ms + r["added_ms"]) / step_ms
    return result


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


def section_pipeline(rounds, steps):
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


def section_torch(rounds, steps):
    x, y = data()
    runners = {
        "kfusion (TensorFlow, Keras default: no XLA on CPU)": keras_stepper(kfusion_model(), x, y),
        "kfusion (TensorFlow, jit_compile=True)": keras_stepper(
            kfusion_model(), x, y, jit_compile=True
        ),
        "PyTorch eager": torch_process(),
    }
    compiled_note = None
    try:
        runners["PyTorch torch.compile"] = torch_process(compile_model=True)
    except Exception as e:  # noqa: BLE001 - record why compile is unavailable here
        compiled_note = f"torch.compile failed here: {type(e).__name__}: {str(e)[:200]}"
    result = summarise(interleave(runners, rounds, steps), "PyTorch eager")
    if compiled_note:
        result["note"] = compiled_note
    return result


def section_torch_branches(rounds, steps):
    """Each branch alone (plain Keras on TensorFlow vs plain PyTorch): where the time goes."""
    x, y = data()
    result = {}
    for branch in ("cnn", "rnn", "transformer"):
        runners = {
            "keras": keras_stepper(hand_branch_model(branch), x, y),
            "keras_xla": keras_stepper(hand_branch_model(branch), x, y, jit_compile=True),
            "torch": torch_process(branches=(branch,)),
        }
        result[branch] = graph_xla_torch(summarise(interleave(runners, rounds, steps), "torch"))
    return result


def graph_xla_torch(times):
    """One table row from the timings of "keras" (graph), "keras_xla" and "torch"."""
    return {
        "graph_ms": times["keras"]["median_ms"],
        "xla_ms": times["keras_xla"]["median_ms"],
        "torch_ms": times["torch"]["median_ms"],
        "ratio": times["keras"]["ratio"],
        "ratio_xla": times["keras_xla"]["ratio"],
    }


def worker(rounds, steps, env=None, jit="auto"):
    """Run `--worker` in a fresh process (backend and thread pools are fixed per process).

    The worker times the FusionModel and PyTorch eager interleaved, so each process reports a
    ratio measured under the same conditions, whatever else the machine was doing.
    """
    cmd = [sys.executable, __file__, "--worker", "--rounds", str(rounds), "--steps", str(steps)]
    cmd += ["--jit", jit]
    out = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})), timeout=1200
    )
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_worker(rounds, steps, jit):
    import keras

    x, y = data()
    jit_compile = {"auto": "auto", "true": True, "false": False}[jit]
    runners = {
        "kfusion": keras_stepper(kfusion_model(), x, y, jit_compile=jit_compile),
        "torch": torch_process(),
    }
    times = summarise(interleave(runners, rounds, steps), "torch")
    print(
        json.dumps(
            {
                "backend": keras.backend.backend(),
                "median_ms": times["kfusion"]["median_ms"],
                "samples_per_s": times["kfusion"]["samples_per_s"],
                "torch_ms": times["torch"]["median_ms"],
                "vs_torch": 1 / times["kfusion"]["ratio"],
            }
        )
    )


def section_backends(rounds, steps):
    """The FusionModel on each backend (Keras' default jit_compile), each in its own process."""
    results = {
        backend: worker(rounds, steps, env={"KERAS_BACKEND": backend})
        for backend in ("tensorflow", "jax", "torch")
    }
    # On PyTorch, jit_compile=True hands the train step to torch.compile.
    results["torch, jit_compile=True"] = worker(
        rounds, steps, env={"KERAS_BACKEND": "torch"}, jit="true"
    )
    base = results["tensorflow"].get("median_ms")
    for r in results.values():
        if base and "median_ms" in r:
            r["ratio"] = r["median_ms"] / base
    return results


ONE_THREAD = {  # TensorFlow's two pools and PyTorch's (read by torch_stepper)
    "TF_NUM_INTEROP_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "KFUSION_BENCH_TORCH_THREADS": "1",
}
THREADS = {  # name: (environment, jit_compile)
    "default pools, no XLA": ({}, "false"),
    "default pools, XLA": ({}, "true"),
    "TF intra-op 1, inter-op 2 (branches side by side), no XLA": (
        {"TF_NUM_INTEROP_THREADS": "2", "TF_NUM_INTRAOP_THREADS": "1"},
        "false",
    ),
    "one thread each, no XLA": (ONE_THREAD, "false"),
    "one thread each, XLA": (ONE_THREAD, "true"),
}


def section_threads(rounds, steps):
    """kfusion (TensorFlow) vs PyTorch eager under different thread settings."""
    results = {}
    for name, (env, jit) in THREADS.items():
        results[name] = worker(rounds, steps, env=dict(env, KERAS_BACKEND="tensorflow"), jit=jit)
    return results


# Op-level: forward + backward of single ops at the network's shapes, TensorFlow graph vs
# TensorFlow XLA vs PyTorch eager. This is where the step-time gap comes from.
OP_SHAPES = {
    "GELU (exact), (64, 64, 128)": (64, 64, 128),
    "LayerNorm, (64, 64, 64)": (64, 64, 64),
    "softmax, (64, 4, 64, 64)": (64, 4, 64, 64),
    "attention core, q=k=v (64, 4, 64, 16)": (64, 4, 64, 16),
    "matmul, (4096, 64) @ (64, 256)": (4096, 64),
}


def _keras_op(name):
    from keras import ops

    if name.startswith("GELU"):
        return lambda a: ops.gelu(a, approximate=False)
    if name.startswith("LayerNorm"):
        return lambda a: ops.layer_normalization(a, epsilon=1e-6)
    if name.startswith("softmax"):
        return lambda a: ops.softmax(a, axis=-1)
    if name.startswith("attention"):  # what MultiHeadAttention computes per head
        return lambda a: ops.matmul(ops.softmax(ops.matmul(a, ops.swapaxes(a, -1, -2)) / 4), a)
    w = ops.ones((64, 256)) / 64
    return lambda a: ops.matmul(a, w)


def _torch_op(name):
    import torch
    import torch.nn.functional as tf_

    if name.startswith("GELU"):
        return tf_.gelu
    if name.startswith("LayerNorm"):
        return lambda a: tf_.layer_norm(a, a.shape[-1:], eps=1e-6)
    if name.startswith("softmax"):
        return lambda a: torch.softmax(a, -1)
    if name.startswith("attention"):
        return lambda a: tf_.scaled_dot_product_attention(a, a, a)
    w = torch.ones(64, 256) / 64
    return lambda a: a @ w


def section_ops(rounds, reps=30):
    import numpy as np
    import tensorflow as tf
    import torch

    result = {}
    for name, shape in OP_SHAPES.items():
        x = np.random.default_rng(0).normal(size=shape).astype("float32")
        runners = {}
        for label, jit in (("keras", False), ("keras_xla", True)):
            fn, xt = _keras_op(name), tf.constant(x)

            @tf.function(jit_compile=jit)
            def step(a, fn=fn):
                with tf.GradientTape() as tape:
                    tape.watch(a)
                    y = tf.reduce_sum(fn(a))
                return tape.gradient(y, a)

            runners[label] = _timer(lambda step=step, xt=xt: step(xt).numpy(), reps)
        fn, xt = _torch_op(name), torch.from_numpy(x).requires_grad_()

        def torch_step(fn=fn, xt=xt):
            xt.grad = None
            fn(xt).sum().backward()

        runners["torch"] = _timer(torch_step, reps)
        result[name] = graph_xla_torch(summarise(interleave(runners, rounds, 1), "torch"))
    return result


def _timer(fn, reps):
    fn()  # warm-up: trace/compile

    def run(steps):
        return timed(lambda _: fn(), reps * steps)

    return run


def section_inference(rounds):
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


# ------------------------------------------------------------------------------- GPU
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


def section_gpu(rounds, steps, peak_tflops):
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


def gpu_markdown():
    path = os.path.join(HERE, "gpu.json")
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
counts the matmuls and convolutions only (`train_flops` in run.py), so it is a lower bound.

{table(gpu, cols=tuple(c for c in cols if any(c in r for r in gpu.values())))}"""


# ---------------------------------------------------------------------------- report
def table(result, cols=("median_ms", "ratio", "samples_per_s")):
    lines = ["| contender | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in result.items():
        if not isinstance(r, dict):
            continue
        cells = []
        for c in cols:
            v = r.get(c)
            ratio = c in ("ratio", "ratio_xla", "vs_torch", "implied_ratio", "fraction_of_peak")
            fmt = ".3f" if ratio else ",.2f" if c in ("added_ms", "tflops") else ",.1f"
            cells.append("" if v is None else format(v, fmt))
        if "error" in r:
            cells = [r["error"]] + [""] * (len(cols) - 1)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def versions():
    import keras
    import numpy as np

    out = {"python": platform.python_version(), "keras": keras.__version__, "numpy": np.__version__}
    for mod in ("tensorflow", "jax", "torch"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            out[mod] = "not installed"
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--render", action="store_true", help="rewrite RESULTS.md from results.json and NOTES.md"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-torch", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--jit", choices=("auto", "true", "false"), default="auto")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="time the model under mixed_bfloat16 on the backend's device; writes gpu.json",
    )
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's bf16 peak")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    steps = args.steps or (5 if args.quick else 20)
    if args.serve_torch:
        serve_torch(args.serve_torch, args.compile)
        return
    if args.worker:
        run_worker(rounds, steps, args.jit)
        return
    if args.gpu:
        saved = run_header(rounds, steps) | {"peak_tflops": args.peak_tflops}
        saved["gpu"] = section_gpu(rounds, steps, args.peak_tflops)
        with open(os.path.join(HERE, "gpu.json"), "w") as f:
            json.dump(saved, f, indent=2)
        print(json.dumps(saved, indent=2))
        if os.path.exists(os.path.join(HERE, "results.json")):
            render()
        return
    if args.render:
        render()
        return
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    sections = {
        "overhead": section_overhead(rounds, steps),
        "vs_pytorch": section_torch(rounds, steps),
        "vs_pytorch_branches": section_torch_branches(rounds, steps),
        "fusion_kinds": section_fusions(rounds, steps),
    }
    concat_ms = sections["fusion_kinds"]["concat"]["median_ms"]
    sections |= {
        "fusion_layers": section_fusion_layers(rounds, steps, concat_ms),
        "pipeline": section_pipeline(rounds, steps),
        "backends": section_backends(rounds, steps),
        "threads": section_threads(rounds, steps),
        "inference": section_inference(rounds),
        # last: it loads PyTorch into this process, whose threads must not share the cores
        # with the TensorFlow sections above
        "ops": section_ops(rounds),
    }
    saved = run_header(rounds, steps)
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(dict(saved, sections=sections), f, indent=2)
    write_markdown(sections, rounds, steps, saved["date"], saved["versions"])


def run_header(rounds, steps):
    """What every saved run records beside its results: versions, date and run lengths."""
    today = datetime.date.today().isoformat()
    return {"versions": versions(), "date": today, "rounds": rounds, "steps": steps}


def render():
    """RESULTS.md again from results.json (and gpu.json, NOTES.md where they exist)."""
    with open(os.path.join(HERE, "results.json")) as f:
        saved = json.load(f)
    write_markdown(
        saved["sections"], saved["rounds"], saved["steps"], saved["date"], saved["versions"]
    )


FUSION_LAYER_COLS = ("median_ms", "added_ms", "implied_ratio")
GRAPH_XLA_TORCH_COLS = ("graph_ms", "xla_ms", "torch_ms", "ratio", "ratio_xla")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        flags = open("/proc/cpuinfo").read()
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        return f"{names[0]}, {isa}" if names else platform.machine()
    except OSError:
        return platform.machine()


def write_markdown(sections, rounds, steps, date, v):
    notes_path = os.path.join(HERE, "NOTES.md")
    notes = open(notes_path).read() if os.path.exists(notes_path) else ""
    md = f"""# kfusion benchmarks

Written by `python benchmarks/run.py` on {date}.

- Machine: {os.cpu_count()} CPU cores ({cpu_name()}), {platform.system()}
  {platform.release()}; no GPU lent to the session that ran this (see "GPU" below).
- Versions: {", ".join(f"{k} {val}" for k, val in v.items())}.
- Network: three branches on one (batch {BATCH}, T={T}, F={F}) input: Conv1D x2 (64) | LSTM 64 |
  two Transformer blocks (d=64, 4 heads) -> fusion -> Dense({CLASSES}).
- Method: contenders interleaved (A, B, ..., then reversed) over {rounds} rounds of {steps}
  training steps each after a warm-up; median seconds per step; ratio = median / baseline's
  median. train_on_batch on in-memory NumPy batches. Garbage collection runs before each
  timed round and not during it (as `timeit` does). PyTorch trains in a child process that
  times a round when asked, so the runs interleave while the two frameworks' thread pools
  never share a process (the single-op table is the exception: one process, ops in turn).

## Overhead: FusionModel vs the same graph written by hand (target ratio <= 1.03)

{table(sections["overhead"])}

## vs PyTorch on CPU (target: kfusion >= 1.2x PyTorch eager samples/s)

{table(sections["vs_pytorch"])}
{sections["vs_pytorch"].get("note", "")}

Each branch alone, plain Keras on TensorFlow (graph, and XLA) vs plain PyTorch eager (ratio =
step time / PyTorch's; above 1 means PyTorch is faster):

{table(sections["vs_pytorch_branches"], cols=GRAPH_XLA_TORCH_COLS)}

Single ops at the network's shapes, forward + backward (ms per call; ratio to PyTorch):

{table(sections["ops"], cols=GRAPH_XLA_TORCH_COLS)}

## Fusion kinds: step time relative to concat (target <= 1.05 for attention and gated)

{table(sections["fusion_kinds"])}

Each fusion layer alone (three 64-wide features, batch {BATCH}, a Dense head; `added_ms` over
concat's step; `implied_ratio` = full-model step with that cost added to concat's step above):

{table(sections["fusion_layers"], cols=FUSION_LAYER_COLS)}

## Input pipeline and XLA: `model.fit` of the FusionModel (TensorFlow, CPU)

{table(sections["pipeline"])}

## Backends: the same FusionModel (ratio to TensorFlow)

Each backend runs in its own process with Keras' default `jit_compile` (TensorFlow on a CPU:
no XLA; JAX: XLA; PyTorch: eager; the last row sets `jit_compile=True` on PyTorch, which
compiles the train step with `torch.compile`) and times PyTorch eager interleaved with itself;
`vs_torch` is kfusion's samples/s over PyTorch eager's in that process.

{table(sections["backends"], cols=("median_ms", "ratio", "samples_per_s", "torch_ms", "vs_torch"))}

## Threads: kfusion (TensorFlow) vs PyTorch eager

{table(sections["threads"], cols=("median_ms", "torch_ms", "vs_torch"))}

## Inference: SavedModel latency

{table(sections["inference"], cols=("median_ms", "samples_per_s"))}

## GPU

{gpu_markdown()}

{notes}
"""
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
