"""The contract every kfusion branch follows (private base class).

A branch is a keras Layer that turns ONE input tensor into features. It adapts to what it is
given, decided in `build` from the input's rank (and `vocab_size`):

| input                          | kind        | example shape         |
|--------------------------------|-------------|-----------------------|
| rank 2, `vocab_size` given     | "tokens"    | (batch, T) int ids    |
| rank 2, no `vocab_size`        | "vectors"   | (batch, F) float      |
| rank 3                         | "sequence"  | (batch, T, F) float   |
| rank 4                         | "image"     | (batch, H, W, C)      |

Token ids: id 0 is padding. The base embeds them (`vocab_size`, `embedding_dim`), zeroes the
padded embeddings and hands the body a (batch, T, E) sequence plus a (batch, T) bool mask.
Padding must never change the output: bodies keep padded steps out of every result that
reaches a valid step, and pooling is masked.

Subclasses set `kinds` (the kinds they accept) and `poolings` (the pooling modes they
accept) and implement:
- `_build_body(kind, shape)`: create/build the body's sub-layers for a body input `shape`
  (tokens arrive here as (batch, T, embedding_dim), kind "tokens").
- `_call_body(x, mask, kind, training)`: returns `(y, mask)`; `y` is (batch, T', D) to be
  pooled by the base (with `mask` of shape (batch, T') or None), or (batch, D) when the body
  pooled itself.
- `_body_output_shape(kind, shape)`: the shape `_call_body` returns.
- `_body_keeps_length(kind)`: True when a (batch, T', D) body output lines up step for step
  with the input's mask (so the mask can follow it when `pooling=None`).
The base applies `pooling` ("mean", "max", "last", or None to keep the sequence and its
mask), then the optional `output_dim` projection (per token when pooling is None).
"""

import keras
from keras import ops

from kfusion import _checks, _quantization
from kfusion.layers import _utils

KINDS = ("tokens", "vectors", "sequence", "image")
_HINTS = {
    "tokens": "integer token ids of shape (batch, T) with vocab_size=... given",
    "vectors": "float vectors of shape (batch, F)",
    "sequence": "sequences of shape (batch, T, F)",
    "image": "images of shape (batch, H, W, C)",
}


def default_name(prefix):
    """A unique readable name: `prefix`, then `prefix_1`, `prefix_2`, ..."""
    uid = keras.backend.get_uid(prefix)
    return prefix if uid == 1 else f"{prefix}_{uid - 1}"


def is_integer_dtype(dtype):
    name = keras.backend.standardize_dtype(dtype)
    return name.startswith("int") or name.startswith("uint")


def infer_kind(shape, vocab_size):
    """The input kind for a shape (batch first), or None when no kind fits."""
    rank = len(shape)
    if rank == 2:
        return "tokens" if vocab_size is not None else "vectors"
    return {3: "sequence", 4: "image"}.get(rank)


class BaseBranch(keras.layers.Layer):
    """Base of all kfusion branches (see the module docstring for the contract)."""

    name_prefix = "branch"
    kinds = KINDS
    poolings = ("mean", "max", "last", None)
    default_embedding_dim = 64

    def __init__(
        self,
        pooling="mean",
        output_dim=None,
        vocab_size=None,
        embedding_dim=None,
        **kwargs,
    ):
        if kwargs.get("name") is None:
            kwargs["name"] = default_name(self.name_prefix)
        super().__init__(**kwargs)
        self.pooling = _checks.check_choice("pooling", pooling, self.poolings)
        self.output_dim = _checks.check_int("output_dim", output_dim, allow_none=True)
        self.vocab_size = _checks.check_int("vocab_size", vocab_size, minimum=2, allow_none=True)
        self.embedding_dim = _checks.check_int("embedding_dim", embedding_dim, allow_none=True)
        if self.vocab_size is not None and "tokens" not in self.kinds:
            raise ValueError(
                f"{type(self).__name__} does not take token ids. Received: vocab_size={vocab_size}"
            )
        self.supports_masking = True
        self.input_kind = None
        self.embedding = None
        if self.vocab_size is not None:
            self.embedding = keras.layers.Embedding(
                self.vocab_size,
                self.embedding_dim or self.default_embedding_dim,
                dtype=self.dtype_policy,
                name="embedding",
            )
        self.output_projection = None
        if self.output_dim is not None:
            self.output_projection = keras.layers.Dense(
                self.output_dim, dtype=self.dtype_policy, name="output_projection"
            )

    # ----------------------------------------------------------------- input checks
    def check_input(self, shape, dtype=None, input_name="input"):
        """Returns the input kind, or raises `ValueError` naming the input and shape.

        Args:
            shape: the input shape, batch first.
            dtype: the input dtype if known (integer ids need `vocab_size`).
            input_name: the input's name, for the message.
        """
        shape = tuple(shape)
        kind = infer_kind(shape, self.vocab_size)
        cls = type(self).__name__
        accepted = "; ".join(_HINTS[k] for k in self.kinds)
        if dtype is not None and kind in ("vectors", "sequence") and is_integer_dtype(dtype):
            if len(shape) == 2 and "tokens" in self.kinds:
                raise ValueError(
                    f"{cls} branch '{self.name}' got integer input '{input_name}' of shape "
                    f"{shape}: token ids need `vocab_size`. Received: vocab_size=None"
                )
            kind = None
        if kind == "tokens" and dtype is not None and not is_integer_dtype(dtype):
            raise ValueError(
                f"{cls} branch '{self.name}' has vocab_size={self.vocab_size} and expects "
                f"integer token ids for input '{input_name}', but it has dtype "
                f"{keras.backend.standardize_dtype(dtype)} and shape {shape}."
            )
        if kind not in self.kinds:
            raise ValueError(
                f"{cls} branch '{self.name}' cannot take input '{input_name}' of shape "
                f"{shape}{'' if dtype is None else ' and dtype ' + str(dtype)}. "
                f"It takes: {accepted}."
            )
        if kind != "tokens" and self.vocab_size is not None:
            raise ValueError(
                f"{cls} branch '{self.name}' has vocab_size={self.vocab_size} but input "
                f"'{input_name}' of shape {shape} is not a (batch, T) array of token ids."
            )
        if kind in ("sequence", "image", "vectors") and shape[-1] is None:
            raise ValueError(
                f"{cls} branch '{self.name}' needs a known feature/channel size for input "
                f"'{input_name}'. Received shape {shape}."
            )
        return kind

    # ------------------------------------------------------------------ keras API
    def _body_input_shape(self, input_shape):
        if self.input_kind == "tokens":
            return tuple(input_shape) + (self.embedding.output_dim,)
        return tuple(input_shape)

    def _make_input_spec(self, kind, shape):
        """What later calls must match: the rank `build` saw and the feature size.

        Without it a built branch would run an input of another kind or width through
        sub-layers built for the first one (a Conv1D on an image, for one).
        """
        if kind == "tokens":
            return keras.InputSpec(ndim=2)
        return keras.InputSpec(ndim=len(shape), axes={-1: shape[-1]})

    def build(self, input_shape):
        self.input_kind = self.check_input(input_shape)
        self.input_spec = self._make_input_spec(self.input_kind, tuple(input_shape))
        if self.embedding is not None:
            self.embedding.build(tuple(input_shape))
        body_shape = self._body_input_shape(input_shape)
        self._build_body(self.input_kind, body_shape)
        out_shape = self._body_output_shape(self.input_kind, body_shape)
        if self.output_projection is not None:
            self.output_projection.build((None, out_shape[-1]))
        if not self.trainable:
            # Sub-layers made after `Layer.__init__(trainable=False)` start trainable; pass
            # the flag down now that all of them exist (the setter skips an unchanged value).
            keras.layers.Layer.trainable.fset(self, False)
        self.built = True

    def call(self, inputs, training=None, mask=None):
        # `build` sees only the shape: the dtype rules (integer ids need vocab_size) apply here.
        self.check_input(inputs.shape, inputs.dtype)
        if self.input_kind == "tokens":
            if not is_integer_dtype(inputs.dtype):
                raise ValueError(
                    f"{type(self).__name__} branch '{self.name}' expects integer token ids "
                    f"of shape (batch, T). Received dtype {inputs.dtype}."
                )
            mask = ops.not_equal(inputs, 0)
            x = self.embedding(inputs)
            x = _utils.zero_padded(x, mask)
        else:
            x = inputs
            if self.input_kind != "sequence":
                mask = None
        y, y_mask = self._call_body(x, mask, self.input_kind, training)
        if len(y.shape) == 3 and self.pooling is not None:
            y = self._pool(y, y_mask)
        if self.output_projection is not None:
            y = self.output_projection(y)
        return y

    def compute_mask(self, inputs, mask=None):
        if self.pooling is not None or not self._body_keeps_length(self.input_kind):
            return None
        if self.input_kind == "tokens":
            return ops.not_equal(inputs, 0)
        if self.input_kind == "sequence":
            return mask
        return None

    def compute_output_shape(self, input_shape):
        kind = self.input_kind or self.check_input(input_shape)
        body_shape = tuple(input_shape)
        if kind == "tokens":
            body_shape = body_shape + (self.embedding_dim or self.default_embedding_dim,)
        shape = tuple(self._body_output_shape(kind, body_shape))
        if len(shape) == 3 and self.pooling is not None:
            shape = (shape[0], shape[-1])
        if self.output_dim is not None:
            shape = shape[:-1] + (self.output_dim,)
        return shape

    def get_config(self):
        config = {
            **super().get_config(),
            "pooling": self.pooling,
            "output_dim": self.output_dim,
            "vocab_size": self.vocab_size,
            "embedding_dim": self.embedding_dim,
        }
        # Quantized sub-layers (model.quantize) are rebuilt quantized when loaded.
        return _quantization.with_quantized_sublayers(self, config)

    # ------------------------------------------------------------------- pooling
    def _pool(self, x, mask):
        if self.pooling == "mean":
            return _utils.masked_mean(x, mask)
        if self.pooling == "max":
            if mask is None:
                return ops.max(x, axis=1)
            m = ops.expand_dims(mask, -1)
            half = keras.backend.standardize_dtype(x.dtype) == "float16"
            low = ops.cast(-6.0e4 if half else -1.0e9, x.dtype)
            pooled = ops.max(ops.where(m, x, low), axis=1)
            any_valid = ops.any(m, axis=1)
            return ops.where(any_valid, pooled, ops.zeros_like(pooled))
        if self.pooling == "last":
            if mask is None:
                return x[:, -1, :]
            lengths = ops.sum(ops.cast(mask, "int32"), axis=1)
            steps = ops.arange(ops.shape(x)[1], dtype="int32")
            pick = ops.equal(ops.expand_dims(steps, 0), ops.expand_dims(lengths - 1, 1))
            return ops.sum(x * ops.expand_dims(ops.cast(pick, x.dtype), -1), axis=1)
        raise ValueError(f"Unknown pooling: {self.pooling}")  # pragma: no cover

    # ------------------------------------------------------ subclass responsibilities
    def _build_body(self, kind, shape):
        raise NotImplementedError

    def _call_body(self, x, mask, kind, training):
        raise NotImplementedError

    def _body_output_shape(self, kind, shape):
        raise NotImplementedError

    def _body_keeps_length(self, kind):
        return kind in ("tokens", "sequence")
