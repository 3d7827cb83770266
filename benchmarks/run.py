"""kfusion benchmarks: one command, rewrites benchmarks/RESULTS.md.

    python benchmarks/run.py            # all sections (several minutes on 2 cores)
    python benchmarks/run.py --quick    # fewer rounds, for a smoke run

Method: every comparison interleaves its contenders (A, B, A, B, ...) over several rounds,
each round timing a fixed number of training steps after a warm-up, so drift on a shared
machine hits all contenders alike. Reported: the median step time per contender and the
ratio of medians. Timings live here, never in the test suite.
"""

import argparse
import datetime
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
def kfusion_model(fusion="concat"):
    import keras

    import kfusion as kf

    return kf.FusionModel(
        inputs=keras.Input((T, F), name="signal"),
        branches=[
            kf.branches.CNN(filters=(64, 64), kernel_size=3),
            kf.branches.RNN(units=64, cell="lstm"),
            kf.branches.Transformer(dim=64, depth=2, num_heads=4, intermediate_dim=128),
        ],
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
def keras_stepper(model, x, y, jit_compile="auto"):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        jit_compile=jit_compile,
    )
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
    for bx, by in batches[:2]:
        model.train_on_batch(bx, by)  # warm-up: tracing and compilation

    def run(steps):
        start = time.perf_counter()
        for i in range(steps):
            bx, by = batches[i % len(batches)]
            model.train_on_batch(bx, by)
        return (time.perf_counter() - start) / steps

    return run


def torch_stepper(x, y, compile_model=False, branches=("cnn", "rnn", "transformer")):
    import torch

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
        start = time.perf_counter()
        for i in range(steps):
            step(*batches[i % len(batches)])
        return (time.perf_counter() - start) / steps

    return run


def interleave(runners, rounds, steps):
    """{name: [seconds per step, one per round]}, contenders alternating within rounds."""
    times = {name: [] for name in runners}
    for r in range(rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            times[name].append(runners[name](steps))
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
    kinds = ["concat", "weighted", "attention", "gated", "low_rank"]
    runners = {k: keras_stepper(kfusion_model(k), x, y) for k in kinds}
    return summarise(interleave(runners, rounds, steps), "concat")


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
        start = time.perf_counter()
        model.fit(**kwargs, epochs=1, verbose=0, shuffle=False)
        return (time.perf_counter() - start) / steps

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
    return summarise(interleave(runners, rounds, steps), "fit, NumPy arrays")


def section_torch(rounds, steps):
    x, y = data()
    runners = {
        "kfusion (TensorFlow, XLA auto)": keras_stepper(kfusion_model("concat"), x, y),
        "PyTorch eager": torch_stepper(x, y),
    }
    compiled_note = None
    try:
        runners["PyTorch torch.compile"] = torch_stepper(x, y, compile_model=True)
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
            "torch": torch_stepper(x, y, branches=(branch,)),
        }
        times = summarise(interleave(runners, rounds, steps), "torch")
        result[f"{branch}: keras (TensorFlow) / PyTorch eager"] = {
            "median_ms": times["keras"]["median_ms"],
            "torch_ms": times["torch"]["median_ms"],
            "ratio": times["keras"]["ratio"],
        }
    return result


def section_backends(rounds, steps):
    """Each backend in its own process (a backend is fixed per process)."""
    results = {}
    for backend in ("tensorflow", "jax", "torch"):
        env = dict(os.environ, KERAS_BACKEND=backend)
        cmd = [
            sys.executable,
            __file__,
            "--one-backend",
            "--rounds",
            str(rounds),
            "--steps",
            str(steps),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200)
        if out.returncode != 0:
            results[backend] = {"error": out.stderr.strip().splitlines()[-1][:300]}
            continue
        results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results.get("tensorflow", {}).get("median_ms")
    for r in results.values():
        if base and "median_ms" in r:
            r["ratio"] = r["median_ms"] / base
    return results


def one_backend(rounds, steps):
    x, y = data()
    run = keras_stepper(kfusion_model("concat"), x, y)
    times = [run(steps) for _ in range(rounds)]
    med = statistics.median(times)
    print(json.dumps({"median_ms": 1000 * med, "samples_per_s": BATCH / med}))


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
            start = time.perf_counter()
            for _ in range(reps):
                serve(xb)
            times.append((time.perf_counter() - start) / reps)
        med = statistics.median(times)
        result[f"batch {batch}"] = {"median_ms": 1000 * med, "samples_per_s": batch / med}
    return result


# ---------------------------------------------------------------------------- report
def table(result, cols=("median_ms", "ratio", "samples_per_s")):
    lines = ["| contender | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, r in result.items():
        if not isinstance(r, dict):
            continue
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append("" if v is None else (f"{v:.3f}" if c == "ratio" else f"{v:,.1f}"))
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
    parser.add_argument("--one-backend", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 7)
    steps = args.steps or (5 if args.quick else 20)
    if args.one_backend:
        one_backend(rounds, steps)
        return
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    sections = {
        "overhead": section_overhead(rounds, steps),
        "vs_pytorch": section_torch(rounds, steps),
        "vs_pytorch_branches": section_torch_branches(rounds, steps),
        "fusion_kinds": section_fusions(rounds, steps),
        "pipeline": section_pipeline(rounds, steps),
        "backends": section_backends(rounds, steps),
        "inference": section_inference(rounds),
    }
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump({"versions": versions(), "sections": sections}, f, indent=2)
    write_markdown(sections, rounds, steps)


def write_markdown(sections, rounds, steps):
    v = versions()
    cpu = platform.processor() or platform.machine()
    notes_path = os.path.join(HERE, "NOTES.md")
    notes = open(notes_path).read() if os.path.exists(notes_path) else ""
    md = f"""# kfusion benchmarks

Written by `python benchmarks/run.py` on {datetime.date.today().isoformat()}.

- Machine: {os.cpu_count()} CPU cores ({cpu}), {platform.system()} {platform.release()}; no GPU
  lent to the session that ran this (see "GPU" below).
- Versions: {", ".join(f"{k} {val}" for k, val in v.items())}.
- Network: three branches on one (batch {BATCH}, T={T}, F={F}) input: Conv1D x2 (64) | LSTM 64 |
  two Transformer blocks (d=64, 4 heads) -> fusion -> Dense({CLASSES}).
- Method: contenders interleaved (A, B, ..., then reversed) over {rounds} rounds of {steps}
  training steps each after a warm-up; median seconds per step; ratio = median / baseline's
  median. train_on_batch on in-memory NumPy batches.

## Overhead: FusionModel vs the same graph written by hand (target ratio <= 1.03)

{table(sections["overhead"])}

## vs PyTorch on CPU (target: kfusion >= 1.2x PyTorch eager samples/s)

{table(sections["vs_pytorch"])}
{sections["vs_pytorch"].get("note", "")}

Each branch alone, plain Keras on TensorFlow vs plain PyTorch eager (step time ratio; above 1
means PyTorch is faster):

{table(sections["vs_pytorch_branches"], cols=("median_ms", "torch_ms", "ratio"))}

## Fusion kinds: step time relative to concat (target <= 1.05 for attention and gated)

{table(sections["fusion_kinds"])}

## Input pipeline and XLA: `model.fit` of the FusionModel (TensorFlow, CPU)

{table(sections["pipeline"])}

## Backends: the same FusionModel (ratio to TensorFlow)

{table(sections["backends"])}

## Inference: SavedModel latency

{table(sections["inference"], cols=("median_ms", "samples_per_s"))}

## GPU

No accelerator was lent to the session that wrote this file (the device tool's status said
`can_start_another: false`), so no GPU samples/s or fraction of peak FLOP/s is recorded here.
`benchmarks/run.py` runs unchanged on a GPU machine with `KERAS_BACKEND=jax`.

{notes}
"""
    with open(os.path.join(HERE, "RESULTS.md"), "w") as f:
        f.write(md)
    print(md)


if __name__ == "__main__":
    main()
