"""Attention at long T: one Transformer-branch training step, explicit vs fused attention.

The model: ``kf.branches.Transformer(dim=64, depth=1, num_heads=4, vocab_size=100)`` on
token ids (batch 4, right-padded to T with lengths T, 3T/4, T/2 and T/4, so the padding
mask is active) + ``Dense(1)``, MSE loss, Adam, ``model.train_on_batch`` (keras' default
``jit_compile="auto"``). Two attention paths of the blocks are compared:

- ``explicit``: einsum logits, float32 masked softmax, einsum with the values; every
  ``(batch, heads, T, T)`` tensor is materialized (and kept for the backward pass);
- ``fused``: ``keras.ops.dot_product_attention`` with the padding mask (the backend's
  fused kernel where it has one), what the blocks use without attention dropout on PyTorch
  and on JAX off CPU.

Each (backend, path, T) cell runs in its own fresh subprocess with 1 thread
(``OMP_NUM_THREADS=1``, TF intra/inter-op 1, ``torch.set_num_threads(1)``,
``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false``). It builds and compiles the model, records
ru_maxrss (the baseline), runs ``warmup`` steps (tracing and compilation included) and then
``steps`` timed steps (``steps_long`` at T >= 4096). Reported: the median step time of the
timed steps, the process's peak RSS (ru_maxrss at the end), and the peak RSS above the
baseline, i.e. what the training steps (including the first, compiling, one) added.

    python benchmarks/attention_memory.py [--lengths 1024 4096] [--backends tensorflow jax torch]
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

BATCH, DIM, HEADS, DEPTH, VOCAB = 4, 64, 4, 1, 100
PATHS = ("explicit", "fused")
BACKENDS = ("tensorflow", "jax", "torch")


def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_cell(path, T, warmup, steps):
    """In this (fresh) process: build, train `warmup + steps` steps, return the measures."""
    import keras
    import numpy as np

    import kfusion as kf
    from kfusion.layers import transformer_block

    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(1)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    transformer_block._ATTENTION_PATH = path
    keras.utils.set_random_seed(0)
    ids = keras.Input((T,), dtype="int32")
    branch = kf.branches.Transformer(dim=DIM, depth=DEPTH, num_heads=HEADS, vocab_size=VOCAB)
    model = keras.Model(ids, keras.layers.Dense(1)(branch(ids)))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.integers(1, VOCAB, size=(BATCH, T)).astype("int32")
    lengths = [T, 3 * T // 4, T // 2, T // 4][:BATCH]
    for row, length in enumerate(lengths):
        x[row, length:] = 0
    y = rng.standard_normal((BATCH, 1)).astype("float32")
    baseline = rss_mb()
    for _ in range(warmup):
        loss = model.train_on_batch(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    peak = rss_mb()
    return {
        "step_s": statistics.median(times),
        "step_s_all": times,
        "peak_rss_mb": peak,
        "baseline_rss_mb": baseline,
        "peak_above_baseline_mb": peak - baseline,
        "loss_finite": bool(np.isfinite(float(np.asarray(loss).reshape(-1)[0]))),
        "jit_compile": str(model.jit_compile),
    }


def child(args):
    result = run_cell(args.path, args.length, args.warmup, args.steps)
    print("RESULT " + json.dumps(result), flush=True)


def spawn(backend, path, T, warmup, steps, timeout):
    env = dict(
        os.environ,
        KERAS_BACKEND=backend,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        TF_NUM_INTRAOP_THREADS="1",
        TF_NUM_INTEROP_THREADS="1",
        TF_CPP_MIN_LOG_LEVEL="3",
        XLA_FLAGS="--xla_cpu_multi_thread_eigen=false",
        PYTHONPATH=str(HERE.parent),
    )
    cmd = [sys.executable, __file__, "--child", "--path", path, "--length", str(T)]
    cmd += ["--warmup", str(warmup), "--steps", str(steps)]
    start = time.time()
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT ") :])
            result["cell_wall_s"] = time.time() - start
            return result
    return {"error": (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]}


def versions():
    import importlib.metadata as md

    found = {}
    for name in ("keras", "tensorflow", "jax", "torch"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def table(results):
    rows = [
        "| backend | T | path | step (s, median) | peak RSS (MB) | above baseline (MB) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['backend']} | {r['T']} | {r['path']} | error: {r['error']} | | |")
            continue
        rows.append(
            f"| {r['backend']} | {r['T']} | {r['path']} | {r['step_s']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {r['peak_above_baseline_mb']:.0f} |"
        )
    return "\n".join(rows)


def jit(results):
    seen = {}
    for r in results:
        if "jit_compile" in r:
            seen.setdefault(r["backend"], r["jit_compile"])
    return ", ".join(f"{b} jit_compile={v}" for b, v in seen.items())


def ratios(results):
    lines = []
    cells = {(r["backend"], r["T"], r["path"]): r for r in results if "error" not in r}
    for backend, T, path in cells:
        if path != "fused" or (backend, T, "explicit") not in cells:
            continue
        e, f = cells[(backend, T, "explicit")], cells[(backend, T, "fused")]
        lines.append(
            f"- {backend}, T = {T}: fused / explicit step time "
            f"{f['step_s'] / e['step_s']:.2f}x, memory above baseline "
            f"{f['peak_above_baseline_mb']:.0f} MB vs {e['peak_above_baseline_mb']:.0f} MB"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS))
    parser.add_argument("--paths", nargs="+", default=list(PATHS))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps at T < 4096")
    parser.add_argument("--steps-long", type=int, default=2, help="timed steps at T >= 4096")
    parser.add_argument("--timeout", type=int, default=240, help="seconds per cell")
    parser.add_argument("--out", default=str(HERE / "attention_memory.json"))
    parser.add_argument("--results-md", default=str(HERE / "RESULTS.md"))
    parser.add_argument(
        "--render", action="store_true", help="rewrite the RESULTS.md section from --out"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if args.render:
        return render(args)

    results = []
    start = time.time()
    for backend in args.backends:
        for T in args.lengths:
            for path in args.paths:
                steps = args.steps if T < 4096 else args.steps_long
                result = spawn(backend, path, T, args.warmup, steps, args.timeout)
                result.update(backend=backend, T=T, path=path)
                print(json.dumps(result), flush=True)
                results.append(result)
    meta = {
        "batch": BATCH,
        "dim": DIM,
        "num_heads": HEADS,
        "depth": DEPTH,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "timed_steps_at_4096_and_more": args.steps_long,
        "threads": 1,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), "
        f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": versions(),
        "total_wall_s": time.time() - start,
    }
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    write_results(meta, results, args.results_md)


def write_results(meta, results, results_md):
    from _marked import write_section

    machine, steps, steps_long = (
        meta["machine"],
        meta["timed_steps"],
        meta.get("timed_steps_at_4096_and_more"),
    )
    text = f"""## Attention memory: explicit vs fused attention at long T

`python benchmarks/attention_memory.py` (raw numbers: `benchmarks/attention_memory.json`;
`--render` rewrites this section from them). One training step (`train_on_batch`, Adam,
MSE) of `Transformer(dim={meta["dim"]}, depth={meta["depth"]}, num_heads={meta["num_heads"]},
vocab_size={VOCAB})` + `Dense(1)` on batch {meta["batch"]} of token ids right-padded to T
(lengths T, 3T/4, T/2, T/4: the padding mask is active). `explicit` is the blocks' einsum +
float32 masked softmax path; `fused` is `keras.ops.dot_product_attention`. Without attention
dropout the blocks take `fused` on PyTorch (and on JAX off CPU) and `explicit` on TensorFlow
and on JAX's CPU; both are forced here on every backend. CPU, 1 thread, each cell in a fresh
subprocess; {meta["warmup_steps"]} warm-up step(s) then the median of {steps} timed steps
({steps_long} at T >= 4096, to keep the run short). Peak RSS is the process's ru_maxrss;
"above baseline" is what the training steps (the first, compiling, one included) added over
the built, compiled model. keras' `jit_compile="auto"` gave {jit(results)}. {machine}, shared
with other jobs while it ran, so step times are indicative (memory is not affected);
{", ".join(f"{k} {v}" for k, v in meta["versions"].items())}. Whole run: \
{meta["total_wall_s"] / 60:.1f} min.

{table(results)}

{ratios(results)}

Notes:
- On CPU only PyTorch has a memory-saving kernel: its `scaled_dot_product_attention` picks
  the flash-attention CPU kernel (forward and backward in blocks), so neither the
  `(batch, heads, T, T)` logits nor the probabilities are stored, and it is also several
  times faster. The padding mask is passed as `(batch, 1, 1, T)`, not as a `(T, T)` matrix,
  so it costs O(T) too.
- TensorFlow has no fused kernel: keras' TensorFlow `dot_product_attention` is the same
  einsum + float32 softmax, plus a `(batch, heads, T, T)` boolean mask it materializes from
  the padding mask. It used somewhat more memory than the explicit path and less time here
  (it has one masking `where` where the explicit path has two). Since the aim is memory at
  long T, the blocks keep the explicit path on TensorFlow, which is also the path TensorFlow
  exports already took (the fused path exports to SavedModel, ONNX and LiteRT as well).
- JAX on CPU uses its `xla` implementation of `dot_product_attention`, which broadcasts the
  mask to every head and was both larger and slower than the explicit path here; the
  blocks keep the explicit path on JAX's CPU. On GPU/TPU keras reaches cuDNN flash attention
  (float16/bfloat16) or Splash attention through the fused path; not measured here.
- Both paths give the same result (tests/layers/test_transformer_block.py compares them on
  every backend, padded keys, fully masked rows and rotary positions included).
"""
    write_section(results_md, "attention_memory", text)


def render(args):
    data = json.loads(Path(args.out).read_text())
    write_results(data["meta"], data["results"], args.results_md)


if __name__ == "__main__":
    main()
