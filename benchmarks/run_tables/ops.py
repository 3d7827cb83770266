"""Single ops at the network's shapes, forward + backward: TensorFlow graph, XLA, PyTorch eager.

This table loads PyTorch into the runner's own process, so the runner times it last: its
thread pools must not share the cores with the TensorFlow tables before it.
"""

from _timing import graph_xla_torch, interleave, summarise, table, timed

from run_tables.vs_pytorch_branches import GRAPH_XLA_TORCH_COLS

NAME = "ops"
LAST = True  # it loads PyTorch into this process


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


def measure(rounds, steps, done, reps=30):
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


INTRO = """\
Single ops at the network's shapes, forward + backward (ms per call; ratio to PyTorch):"""


def markdown(result):
    return f"{INTRO}\n\n{table(result, cols=GRAPH_XLA_TORCH_COLS)}"
