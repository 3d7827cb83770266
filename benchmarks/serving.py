"""Serving latency: one sample and a batch of 256 through every path a user can serve by.

    python benchmarks/serving.py [--threads 1] [--rounds 5] [--calls 40]

The network is the one of `benchmarks/run.py` (`benchmarks/_models.py`: CNN 64-64 | LSTM 64 |
Transformer 64x2, concat fusion, 10 classes, inputs (64, 32)) in kfusion and in plain PyTorch.
Contenders:

- kfusion on TensorFlow: `model.predict`, `model.serve(x, jit_compile=False)` (a
  `tf.function` graph), `model.serve(x)` (the same with XLA), the SavedModel's
  `serving_default` signature, ONNX Runtime on kfusion's ONNX (float32 and dynamic int8),
  LiteRT (float32, float16 weights, int8 weights and activations);
- PyTorch eager under `torch.inference_mode()`, and the PyTorch module exported with
  `torch.onnx.export` run by ONNX Runtime; these run in a child process so the two
  frameworks' thread pools never share the cores.

Every runtime is held to `--threads` threads (TensorFlow intra/inter-op, ONNX Runtime
intra-op, the LiteRT interpreter, `torch.set_num_threads`). Rounds interleave the
contenders (A, B, C, ..., A, B, C, ...); in each round a contender answers `--calls` single
samples (each timed) and a few batches of 256. Reported: p50 and p99 over all single-sample
calls, and samples/s from the median batch-256 call. Writes `benchmarks/serving.json` and
the `serving` section of `benchmarks/RESULTS.md`.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

T, F, CLASSES, BIG = 64, 32, 10, 256


def inputs(n, seed=0):
    import numpy as np

    return np.random.default_rng(seed).normal(size=(n, T, F)).astype("float32")


def set_threads(threads):
    for var in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
        os.environ[var] = str(threads)


# --------------------------------------------------------------------------- PyTorch
def torch_model():
    """The network in plain PyTorch: benchmarks/run.py's, with the softmax served here."""
    import torch
    from _models import torch_model as logits_model

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = logits_model()

        def forward(self, x):
            return torch.softmax(self.net(x), -1)

    return Net().eval()


def torch_child(threads):
    """Serves the PyTorch contenders: reads `NAME BATCH CALLS`, answers seconds per call."""
    import onnxruntime as ort
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    net = torch_model()
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "torch.onnx")
    # With autograd on: under inference_mode, nn.MultiheadAttention takes its fused fast
    # path (aten::_native_multi_head_attention), which the ONNX exporter has no rule for.
    torch.onnx.export(
        net,
        (torch.from_numpy(inputs(2)),),
        path,
        input_names=["signal"],
        output_names=["output_0"],
        dynamic_axes={"signal": {0: "batch"}, "output_0": {0: "batch"}},
        dynamo=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    data = {n: inputs(n) for n in (1, BIG)}
    tensors = {n: torch.from_numpy(v) for n, v in data.items()}

    def eager(n):
        with torch.inference_mode():
            return net(tensors[n]).numpy()

    def onnx(n):
        return session.run(None, {"signal": data[n]})[0]

    runners = {"PyTorch eager (inference_mode)": eager, "PyTorch -> ONNX Runtime": onnx}
    for fn in runners.values():
        for n in (1, BIG):
            fn(n)
    print("KFB " + json.dumps(list(runners)), flush=True)
    for line in sys.stdin:
        name, batch, calls = line.rsplit(" ", 2)
        print("KFB " + json.dumps(timed(runners[name], int(batch), int(calls))), flush=True)


def timed(fn, batch, calls):
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(batch)
        out.append(time.perf_counter() - start)
    return out


class TorchProcess:
    def __init__(self, threads):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--torch-child", "--threads", str(threads)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.names = self._reply()

    def _reply(self):
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError("the PyTorch process stopped")
            if line.startswith("KFB "):
                return json.loads(line[4:])

    def runner(self, name):
        def run(batch, calls):
            self.proc.stdin.write(f"{name} {batch} {calls}\n")
            self.proc.stdin.flush()
            return self._reply()

        return run


# --------------------------------------------------------------------------- kfusion
def kfusion_runners(threads):
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    import kfusion as kf
    from kfusion.export import export

    keras.utils.set_random_seed(0)
    model = kf.FusionModel(
        inputs=keras.Input((T, F), name="signal"),
        branches=[
            kf.branches.CNN(filters=(64, 64), kernel_size=3),
            kf.branches.RNN(units=64, cell="lstm"),
            kf.branches.Transformer(dim=64, depth=2, num_heads=4, intermediate_dim=128),
        ],
        fusion="concat",
        head=kf.heads.Classification(CLASSES),
    )
    calibration = inputs(128, seed=1)
    folder = tempfile.mkdtemp()
    data = {n: inputs(n) for n in (1, BIG)}
    saved = tf.saved_model.load(export(model, os.path.join(folder, "sm"), probe=data[1]))
    signature = saved.signatures["serving_default"]
    tf_data = {n: tf.constant(v) for n, v in data.items()}
    runners = {
        "kfusion model.predict": lambda n: model.predict(data[n], batch_size=BIG, verbose=0),
        "kfusion model.serve (tf.function)": lambda n: model.serve(data[n], jit_compile=False),
        "kfusion model.serve (XLA)": lambda n: model.serve(data[n]),
        "kfusion SavedModel signature": lambda n: signature(signal=tf_data[n]),
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    for label, mode in (("float32", None), ("dynamic int8", "dynamic")):
        path = export(
            model,
            os.path.join(folder, f"{label}.onnx"),
            format="onnx",
            quantize=mode,
            data=calibration,
        )
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        runners[f"kfusion ONNX Runtime {label}"] = lambda n, s=session: s.run(
            None, {s.get_inputs()[0].name: data[n]}
        )
    for label, mode in (("float32", None), ("float16", "float16"), ("int8", "int8")):
        path = export(
            model,
            os.path.join(folder, f"{label}.tflite"),
            format="litert",
            quantize=mode,
            data=calibration,
        )
        runners[f"kfusion LiteRT {label}"] = litert_runner(Interpreter, path, threads, data)
    for fn in runners.values():
        for n in (1, BIG):
            fn(n)
    return {
        name: (lambda batch, calls, fn=fn: timed(fn, batch, calls)) for name, fn in runners.items()
    }, int(model.count_params())


def litert_runner(interpreter_cls, path, threads, data):
    """A LiteRT signature runner per batch size (the interpreter resizes its input)."""
    runners = {}
    for n in data:
        interpreter = interpreter_cls(model_path=path, num_threads=threads)
        runners[n] = interpreter.get_signature_runner()
    names = {
        n: list(interpreter.get_signature_list()["serving_default"]["inputs"])[0] for n in data
    }
    return lambda n: runners[n](**{names[n]: data[n]})


# ---------------------------------------------------------------------------- driver
def run(args):
    set_threads(args.threads)
    torch_proc = TorchProcess(args.threads)
    runners, params = kfusion_runners(args.threads)
    for name in torch_proc.names:
        runners[name] = torch_proc.runner(name)
    single = {name: [] for name in runners}
    big = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run_ in runners.items():
            single[name] += run_(1, args.calls)
            big[name] += run_(BIG, args.big_calls)
    torch_proc.proc.kill()
    rows = {}
    for name in runners:
        times = sorted(single[name])
        rows[name] = {
            "p50_ms": 1000 * statistics.median(times),
            "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))],
            "calls": len(times),
            "batch256_samples_per_s": BIG / statistics.median(big[name]),
        }
    return rows, params


def markdown(data):
    rows = data["rows"]
    eager = rows["PyTorch eager (inference_mode)"]["p50_ms"]
    lines = [
        "## Serving: latency at batch 1 and throughput at batch 256",
        "",
        f"Written by `python benchmarks/serving.py --threads {data['threads']} --rounds "
        f"{data['rounds']} --calls {data['calls']}` on {data['date']} ({data['machine']}; the "
        "machine was shared with other work, hence one thread per runtime). Network: CNN "
        "64-64 | LSTM 64 | Transformer 64x2, concat fusion, inputs (64, 32), "
        f"{data['parameters']:,} parameters; the same network in plain PyTorch. "
        "Contenders interleaved round by round; p50 / p99 over every single-sample call, "
        "samples/s from the median batch-256 call; x eager = p50 / PyTorch eager's p50.",
        "",
        "| path | batch 1 p50 (ms) | batch 1 p99 (ms) | x eager | batch 256 (samples/s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, row in sorted(rows.items(), key=lambda kv: kv[1]["p50_ms"]):
        lines.append(
            f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['p50_ms'] / eager:.2f} | {row['batch256_samples_per_s']:,.0f} |"
        )
    best_name, best = min(
        ((n, r) for n, r in rows.items() if n.startswith("kfusion")), key=lambda kv: kv[1]["p50_ms"]
    )
    ratio = best["p50_ms"] / eager
    lines += [
        "",
        f"Target: kfusion's best path at batch 1 <= 0.5x PyTorch eager's p50. Best: {best_name}, "
        f"{ratio:.2f}x: {'met' if ratio <= 0.5 else 'missed'}.",
        "",
    ]
    lines += data.get("notes", [])
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--big-calls", type=int, default=3)
    parser.add_argument("--render", action="store_true", help="only rewrite the section")
    parser.add_argument("--torch-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.torch_child:
        torch_child(args.threads)
        return
    out = os.path.join(HERE, "serving.json")
    if not args.render:
        rows, params = run(args)
        data = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s)",
            "threads": args.threads,
            "rounds": args.rounds,
            "calls": args.calls,
            "parameters": params,
            "rows": rows,
        }
        notes_path = os.path.join(HERE, "SERVING_NOTES.md")
        if os.path.exists(notes_path):
            data["notes"] = open(notes_path).read().strip().splitlines()
        with open(out, "w") as f:
            json.dump(data, f, indent=1)
    data = json.load(open(out))
    notes_path = os.path.join(HERE, "SERVING_NOTES.md")
    if os.path.exists(notes_path):
        data["notes"] = open(notes_path).read().strip().splitlines()
    from _marked import write_section

    write_section(os.path.join(HERE, "RESULTS.md"), "serving", markdown(data))


if __name__ == "__main__":
    main()
