"""Timing helpers of the speed tables: steppers, interleaved rounds, medians and Markdown rows.

PyTorch runs in a child process (`torch_process`, served by `run.py --serve-torch`), and whole
backends or thread settings in fresh processes (`worker`, served by `run.py --worker`).
"""

import gc
import json
import os
import statistics
import subprocess
import sys
import time

from _models import BATCH, data, kfusion_model, torch_model

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run.py")


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

    cmd = [sys.executable, RUNNER, "--serve-torch", ",".join(branches)]
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
    cmd = [sys.executable, RUNNER, "--worker", "--rounds", str(rounds), "--steps", str(steps)]
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
