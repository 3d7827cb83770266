"""kfusion (TensorFlow) against PyTorch eager under different thread settings, one process each."""

from _timing import table, worker

NAME = "threads"


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


def measure(rounds, steps, done):
    """kfusion (TensorFlow) vs PyTorch eager under different thread settings."""
    results = {}
    for name, (env, jit) in THREADS.items():
        results[name] = worker(rounds, steps, env=dict(env, KERAS_BACKEND="tensorflow"), jit=jit)
    return results


def markdown(result):
    return f"""## Threads: kfusion (TensorFlow) vs PyTorch eager

{table(result, cols=("median_ms", "torch_ms", "vs_torch"))}"""
