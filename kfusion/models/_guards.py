"""Checks FusionModel makes while it builds (private).

- `check_size`: a size argument (`units`, `num_classes`, `vocab_size`, ...) so large that
  training the layer's weights (the weights, their gradients and Adam's two slots) would
  not fit in this machine's memory is refused with a
  `ValueError` naming the argument and the estimated size, before any weight is allocated
  (allocating them would run out of memory after a long wait instead);
- `branches_by_name`: the reloaded branch layers a FusionModel config names, with a clear
  error when one of them came back under another name.
"""

import numbers
import os

# Constructor arguments that size a layer's weights.
SIZE_ARGUMENTS = (
    "units",
    "filters",
    "dim",
    "intermediate_dim",
    "key_dim",
    "num_heads",
    "num_classes",
    "num_labels",
    "vocab_size",
    "embedding_dim",
    "output_dim",
    "rank",
)
BYTES_PER_PARAMETER = 4  # float32
# Training holds each weight's gradient and the optimizer's slots too (Adam: two).
TRAINING_COPIES = 4


def memory_bytes():
    """This machine's physical memory in bytes (None where it can't be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _sizes(layer):
    """`{argument: largest value}` of the layer's integer size arguments."""
    found = {}
    for key in SIZE_ARGUMENTS:
        value = getattr(layer, key, None)
        items = value if isinstance(value, (list, tuple)) else [value]
        ints = [
            int(v) for v in items if isinstance(v, numbers.Integral) and not isinstance(v, bool)
        ]
        if ints:
            found[key] = max(ints)
    return found


def estimate_parameters(layer, input_width):
    """A lower bound of the parameters `layer` makes on inputs `input_width` wide.

    Returns `(argument, value, parameters)` for the largest size argument: the weights it
    sizes have at least `value * width` entries, `width` being the input's last dimension
    or the layer's next largest size (an embedding's width), whichever is larger.
    """
    sizes = _sizes(layer)
    if not sizes:
        return None
    argument = max(sizes, key=sizes.get)
    value = sizes[argument]
    others = [v for k, v in sizes.items() if k != argument]
    width = max([int(input_width or 1), 1] + others)
    return argument, value, value * width


def _human(n_bytes):
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n_bytes < 1024 or unit == "PB":
            return f"{n_bytes:.1f} {unit}" if unit != "bytes" else f"{int(n_bytes)} bytes"
        n_bytes /= 1024
    return f"{n_bytes:.1f} PB"


def check_size(layer, input_width, where, memory=None):
    """Raises `ValueError` when training `layer`'s weights can't fit in this machine's memory."""
    memory = memory_bytes() if memory is None else memory
    estimate = estimate_parameters(layer, input_width)
    if memory is None or estimate is None:
        return
    argument, value, parameters = estimate
    weights = parameters * BYTES_PER_PARAMETER
    if weights * TRAINING_COPIES > memory:
        raise ValueError(
            f"`{argument}`={value} in {where} makes at least {parameters:.3g} parameters "
            f"({_human(weights)} as float32, about {TRAINING_COPIES}x that to train), more "
            f"than this machine's {_human(memory)} of memory allows. "
            f"Received: {argument}={value}"
        )


def branches_by_name(layers, names):
    """`{name: layer}` for the branch `names` a FusionModel config lists.

    A custom branch class whose `__init__` takes `**kw` (not `**kwargs`) and has no
    `get_config` of its own loses its `name` in keras' automatic config, so it reloads
    under another name: said here, instead of a bare KeyError.
    """
    by_name = {layer.name: layer for layer in layers}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(
            f"The FusionModel config lists branch(es) {missing}, but its branch layers "
            f"reload as {sorted(by_name)}: a branch class must keep its `name` in its "
            "config (take `**kwargs` in `__init__` and pass them to `super().__init__`, or "
            "define `get_config`)."
        )
    return by_name
