"""Hyperparameter search over FusionModels with KerasTuner (an optional extra).

`keras-tuner` is imported only when `hypermodel()` is called; without it the call raises
an `ImportError` that says how to install it.
"""

import importlib.util
import numbers

import keras

from kfusion import _checks, heads
from kfusion import branches as kbranches
from kfusion.branches._base import infer_kind, is_integer_dtype
from kfusion.models import FusionModel

BRANCHES = {
    "cnn": kbranches.CNN,
    "mlp": kbranches.MLP,
    "rnn": kbranches.RNN,
    "transformer": kbranches.Transformer,
}
# Fusions that take one vector per branch (cross_attention/film need token features or
# exactly two branches, so they are left out of an automatic search).
VECTOR_FUSIONS = ("concat", "weighted", "attention", "gated", "low_rank")
_DEFAULT_BRANCHES = {
    "vectors": ("mlp",),
    "tokens": ("cnn", "rnn", "transformer"),
    "sequence": ("cnn", "rnn", "transformer"),
    "image": ("cnn", "transformer"),
}
INSTALL_HINT = (
    "kfusion.tune needs keras-tuner, an optional extra. Install it with "
    "`pip install keras-tuner` (or `pip install 'kfusion[tune]'`)."
)
TENSORBOARD_HINT = (
    "kfusion.tune: on the TensorFlow backend keras-tuner's search imports tensorboard, "
    "which TensorFlow no longer installs. Install it with `pip install tensorboard` (or "
    "`pip install 'kfusion[tune]'`)."
)

__all__ = ["hypermodel"]


def _require_keras_tuner():
    try:
        import keras_tuner
    except ImportError as e:
        raise ImportError(INSTALL_HINT) from e
    if keras.config.backend() == "tensorflow" and importlib.util.find_spec("tensorboard") is None:
        raise ImportError(TENSORBOARD_HINT)
    return keras_tuner


def hypermodel(
    input_shape,
    num_classes,
    branches=None,
    fusions=("concat", "attention", "gated"),
    widths=(8, 16, 32, 64),
    depths=(1, 2),
    learning_rate=(1e-4, 1e-2),
    input_dtype="float32",
    vocab_size=None,
):
    """A `keras_tuner.HyperModel` searching FusionModel architectures for classification.

    Random, Bayesian or Hyperband search (Li et al. 2018, *Hyperband*; KerasTuner,
    O'Malley et al. 2019) over FusionModels `input -> branches -> fusion -> head`. The
    space (hyperparameter names in quotes):

        "use_<branch>"   Boolean, one per candidate branch: which branches the model has
                         (at least one: with none chosen the first candidate is used)
        "fusion"         Choice over `fusions` (used with two or more branches)
        "width"          Choice over `widths`: CNN filters, RNN units, Transformer dim,
                         MLP units (and the token embedding size)
        "depth"          Choice over `depths`: conv blocks, RNN layers, Transformer
                         blocks, MLP layers
        "learning_rate"  Float in `learning_rate`, log sampling (Adam)

    Each trial builds a `FusionModel` with a `Classification(num_classes)` head and
    compiles it with Adam, the head's loss and an `"accuracy"` metric (use
    `objective="val_accuracy"`).

    Args:
        input_shape: the input shape without the batch axis, e.g. `(16, 4)` for
            sequences, `(8, 8, 1)` for images, `(12,)` for vectors or token ids.
        num_classes: int >= 1 (1 or 2: binary).
        branches: the candidate branch names ("cnn", "rnn", "transformer", "mlp"), or
            None for those that fit the input: vectors -> mlp; sequences and tokens ->
            cnn, rnn, transformer; images -> cnn, transformer.
        fusions: the candidate fusions, a subset of "concat", "weighted", "attention",
            "gated", "low_rank".
        widths: candidate branch widths (ints >= 1).
        depths: candidate branch depths (ints >= 1).
        learning_rate: `(min, max)`, floats with 0 < min < max.
        input_dtype: the input's dtype ("int32" for token ids, with `vocab_size`; an
            integer dtype for vectors or sequences without `vocab_size` is refused).
        vocab_size: int or None, the token vocabulary for integer token ids of shape
            `(T,)` (needs an integer `input_dtype`).

    Returns:
        A `keras_tuner.HyperModel`; `build(hp)` returns a compiled `FusionModel`.

    Raises:
        ImportError: when keras-tuner (or, on the TensorFlow backend, tensorboard, which
            keras-tuner's search imports there) is not installed, with the command that
            installs it.
        ValueError: for a bad argument, naming it and its value.

    Example:

    >>> import keras_tuner
    >>> from kfusion import tune
    >>> hm = tune.hypermodel((16, 4), num_classes=3, branches=("cnn", "rnn"))
    >>> hp = keras_tuner.HyperParameters()
    >>> model = hm.build(hp)
    >>> model.output_shape
    (None, 3)
    >>> sorted(hp.values)
    ['depth', 'fusion', 'learning_rate', 'use_cnn', 'use_rnn', 'width']
    """
    shape = _check_input_shape(input_shape)
    num_classes = _checks.check_int("num_classes", num_classes)
    vocab_size = _checks.check_int("vocab_size", vocab_size, minimum=2, allow_none=True)
    try:
        input_dtype = keras.backend.standardize_dtype(input_dtype)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"`input_dtype` must be a dtype name. Received: input_dtype={input_dtype!r}"
        ) from e
    kind = infer_kind((None,) + shape, vocab_size)
    if kind is None:
        raise ValueError(
            "`input_shape` must be (F,) vectors or token ids, (T, F) sequences or "
            f"(H, W, C) images. Received: input_shape={input_shape!r}"
        )
    _check_tokens(shape, kind, input_dtype, vocab_size)
    names = _check_branches(branches, kind)
    fusions = _check_names("fusions", fusions, VECTOR_FUSIONS)
    widths = _checks.check_int_tuple("widths", widths)
    depths = _checks.check_int_tuple("depths", depths)
    learning_rate = _check_learning_rate(learning_rate)
    kt = _require_keras_tuner()

    class FusionHyperModel(kt.HyperModel):
        """Builds one FusionModel per trial (see `kfusion.tune.hypermodel`)."""

        def build(self, hp):
            chosen = [n for n in names if hp.Boolean(f"use_{n}", default=True)] or [names[0]]
            fusion = hp.Choice("fusion", list(fusions))
            width = hp.Choice("width", list(widths))
            depth = hp.Choice("depth", list(depths))
            rate = hp.Float("learning_rate", *learning_rate, sampling="log")
            model = FusionModel(
                inputs=keras.Input(shape, dtype=input_dtype, name="inputs"),
                branches=[_make_branch(n, width, depth, vocab_size) for n in chosen],
                fusion=fusion,
                head=heads.Classification(num_classes),
            )
            model.compile(optimizer=keras.optimizers.Adam(rate))
            return model

    return FusionHyperModel(name="kfusion_hypermodel")


def _make_branch(name, width, depth, vocab_size):
    tokens = {"vocab_size": vocab_size, "embedding_dim": width} if vocab_size else {}
    if name == "mlp":
        return kbranches.MLP(units=(width,) * depth)
    if name == "cnn":
        return kbranches.CNN(filters=(width,) * depth, kernel_size=3, **tokens)
    if name == "rnn":
        return kbranches.RNN(units=width, num_layers=depth, **tokens)
    heads_ = 2 if width % 2 == 0 else 1
    return kbranches.Transformer(dim=width, depth=depth, num_heads=heads_, **tokens)


def _check_input_shape(value):
    ok = isinstance(value, (list, tuple)) and 1 <= len(value) <= 3
    if ok:
        ok = all(
            d is None or (isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1)
            for d in value
        )
        ok = ok and value[-1] is not None
    if not ok:
        raise ValueError(
            "`input_shape` must be a tuple of 1 to 3 positive ints (batch axis excluded; "
            f"only leading sizes may be None). Received: input_shape={value!r}"
        )
    return tuple(None if d is None else int(d) for d in value)


def _check_tokens(shape, kind, input_dtype, vocab_size):
    """Raises unless dtype and `vocab_size` agree: token ids are `(T,)` integers."""
    if vocab_size is not None and len(shape) != 1:
        raise ValueError(
            "`vocab_size` is for token ids of shape (T,); `input_shape` "
            f"{shape} is not. Received: vocab_size={vocab_size}"
        )
    if kind == "tokens" and not is_integer_dtype(input_dtype):
        raise ValueError(
            "Token ids (`vocab_size` given) need an integer `input_dtype` such as "
            f"'int32'. Received: input_dtype={input_dtype!r}"
        )
    if kind in ("vectors", "sequence") and is_integer_dtype(input_dtype):
        raise ValueError(
            f"Integer inputs of shape {shape} are token ids: give `vocab_size` (with "
            f"input_shape=(T,)), or use a float `input_dtype`. Received: "
            f"input_dtype={input_dtype!r}"
        )


def _check_names(arg, value, allowed):
    items = (value,) if isinstance(value, str) else value
    ok = isinstance(items, (list, tuple)) and len(items) > 0 and all(v in allowed for v in items)
    if not ok:
        raise ValueError(
            f"`{arg}` must be a non-empty list of names from {list(allowed)}. "
            f"Received: {arg}={value!r}"
        )
    return tuple(dict.fromkeys(items))


def _check_branches(value, kind):
    if value is None:
        return _DEFAULT_BRANCHES[kind]
    names = _check_names("branches", value, tuple(BRANCHES))
    for name in names:
        if kind not in BRANCHES[name].kinds:
            raise ValueError(
                f"Branch {name!r} cannot take {kind} inputs. Received: branches={value!r}"
            )
    return names


def _check_learning_rate(value):
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if ok:
        ok = all(isinstance(v, numbers.Real) and not isinstance(v, bool) and v > 0 for v in value)
        ok = ok and value[0] < value[1]
    if not ok:
        raise ValueError(
            "`learning_rate` must be a (min, max) pair of positive floats with min < max. "
            f"Received: learning_rate={value!r}"
        )
    return float(value[0]), float(value[1])
