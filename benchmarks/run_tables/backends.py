"""The same FusionModel on each Keras backend, each in its own process beside PyTorch eager."""

from _timing import table, worker

NAME = "backends"


def measure(rounds, steps, done):
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


def markdown(result):
    cols = ("median_ms", "ratio", "samples_per_s", "torch_ms", "vs_torch")
    return f"""## Backends: the same FusionModel (ratio to TensorFlow)

Each backend runs in its own process with Keras' default `jit_compile` (TensorFlow on a CPU:
no XLA; JAX: XLA; PyTorch: eager; the last row sets `jit_compile=True` on PyTorch, which
compiles the train step with `torch.compile`) and times PyTorch eager interleaved with itself;
`vs_torch` is kfusion's samples/s over PyTorch eager's in that process.

{table(result, cols=cols)}"""
