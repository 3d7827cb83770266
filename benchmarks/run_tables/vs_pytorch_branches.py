"""Each branch alone: plain Keras on TensorFlow (graph, and XLA) against plain PyTorch eager."""

from _models import data, hand_branch_model
from _timing import (
    graph_xla_torch,
    interleave,
    keras_stepper,
    summarise,
    table,
    torch_process,
)

NAME = "vs_pytorch_branches"
GRAPH_XLA_TORCH_COLS = ("graph_ms", "xla_ms", "torch_ms", "ratio", "ratio_xla")


def measure(rounds, steps, done):
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


INTRO = """\
Each branch alone, plain Keras on TensorFlow (graph, and XLA) vs plain PyTorch eager (ratio =
step time / PyTorch's; above 1 means PyTorch is faster):"""


def markdown(result):
    return f"{INTRO}\n\n{table(result, cols=GRAPH_XLA_TORCH_COLS)}"
