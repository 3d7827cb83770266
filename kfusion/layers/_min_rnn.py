"""The parallel recurrent layers' shared machinery (private): MinGRU and MinLSTM.

Both cells of Feng et al. 2024 (*Were RNNs All We Needed?*) are linear recurrences whose
coefficients depend on the input only:

    h_t = a_t * h_{t-1} + b_t,      a_t in (0, 1),   b_t > 0

so every step can be computed at once. In log space (the paper's numerically stable form)
the pairs `(log a_t, log b_t)` compose associatively,

    (la_1, lb_1) o (la_2, lb_2) = (la_1 + la_2, logaddexp(la_2 + lb_1, lb_2)),

and an associative scan of the pairs gives every `log h_t` (h_0 = 0). `log_states` is
that scan, chunked (see its docstring): O(T) work in O(16 log_16 T) sequential steps. A
layer that returns only its final state needs no scan: with the suffix sums
`S_t = la_{t+1} + ... + la_T`, `log h_T = logsumexp_t(lb_t + S_t)`.

`keras.ops.associative_scan` is not used: in keras 3.15 its TensorFlow version loses the
static shape when the batch size is unknown (a functional model fails to build), does not
compile with XLA, and needs autograph for lengths known only at run time (SavedModel,
ONNX and LiteRT traces fail); on a CPU it was also 2-4x slower than the chunked scan
(benchmarks/RESULTS.md, "Long sequences").

Masked steps get `a = 1, b = 0` (`la = 0`, `lb = -1e4`, whose exponential is exactly 0 in
float32), the identity of the recurrence: the state passes through them unchanged, so
right-padding changes neither the outputs at valid steps nor the final state.

Only `keras` and `keras.ops` are used here.
"""

import keras
from keras import ops

from kfusion import _checks
from kfusion.layers import _utils

# log(b) of a masked step: exp(-1e4) is exactly 0 in float32, and -1e4 stays finite, so no
# `inf - inf` can reach the scan or its gradient.
_MASKED_LOG = -1.0e4
# log 0 where a term is left out of a log-sum-exp after the gates' sums are taken off.
_LOW = -1.0e30


def log_g(x):
    """log of the paper's positive activation g(x) = x + 0.5 (x >= 0), sigmoid(x) (x < 0).

    Below -80 the sigmoid is held at sigmoid(-80) (about 2e-35, still a normal float32),
    so the log never sees 0.
    """
    return ops.log(ops.where(x >= 0, x + 0.5, ops.sigmoid(ops.maximum(x, -80.0))))


def _logaddexp(x, y):
    # max + softplus(-|x - y|): stable, and cheaper than keras' NaN-guarded version (no
    # inf reaches it here: stand-ins for log 0 are finite).
    return ops.maximum(x, y) + ops.softplus(-ops.abs(x - y))


def _combine(earlier, later):
    la_1, lb_1 = earlier
    la_2, lb_2 = later
    return la_1 + la_2, _logaddexp(la_2 + lb_1, lb_2)


# Steps per chunk of the chunked scan (see `log_states`).
CHUNK = 16
# T_max of the chrono initialisation when the input length is unknown at build time.
_CHRONO_UNKNOWN_LENGTH = 1000
# Recursive-doubling levels for lengths only known at run time, after two levels of
# chunks: up to 2**24 * 256 steps.
_DOUBLINGS = 24


def _into_chunks(log_a, log_b, chunk):
    """(chunk, batch, n_chunks, units) views of both, padded at the end with the identity."""
    length = log_a.shape[1]
    dynamic = length is None
    if dynamic:
        length = ops.shape(log_a)[1]
    # (chunk - length % chunk) % chunk, not (-length) % chunk: ONNX's Mod of a negative
    # number is not Python's.
    pad = (chunk - length % chunk) % chunk
    if dynamic or pad:
        widths = [[0, 0], [0, pad], [0, 0]]
        log_a = ops.pad(log_a, widths, constant_values=0.0)
        log_b = ops.pad(log_b, widths, constant_values=_MASKED_LOG)
    chunks = (length + pad) // chunk
    shape = (ops.shape(log_a)[0], chunks, chunk, log_a.shape[-1])
    log_a = ops.transpose(ops.reshape(log_a, shape), (2, 0, 1, 3))
    log_b = ops.transpose(ops.reshape(log_b, shape), (2, 0, 1, 3))
    return log_a, log_b, length


def _scan_chunks(log_a, log_b):
    """Every step's prefix pair along axis 0 of `(CHUNK, ...)` tensors.

    On JAX a `keras.ops.scan` loop: XLA fuses an unrolled chain of log-space combines
    into kernels that recompute each step for every later use (measured: 10-20x slower).
    Elsewhere the `CHUNK` combines are unrolled: TensorFlow's graph runs them faster than
    a loop, and its `scan` (a loop of TensorList ops) neither compiles with XLA nor
    converts to LiteRT's builtin ops.
    """
    if keras.config.backend() == "jax":

        def step(carry, pair):
            carry = _combine(carry, pair)
            return carry, carry

        _, (steps_a, steps_b) = ops.scan(step, (log_a[0], log_b[0]), (log_a[1:], log_b[1:]))
        return (
            ops.concatenate([log_a[:1], steps_a], axis=0),
            ops.concatenate([log_b[:1], steps_b], axis=0),
        )
    acc = (log_a[0], log_b[0])
    steps_a, steps_b = [acc[0]], [acc[1]]
    for t in range(1, log_a.shape[0]):
        acc = _combine(acc, (log_a[t], log_b[t]))
        steps_a.append(acc[0])
        steps_b.append(acc[1])
    return ops.stack(steps_a, axis=0), ops.stack(steps_b, axis=0)


def _shift(x, steps, fill):
    """`x` moved `steps` places later along axis 1, `fill` coming in (any length)."""
    length = ops.shape(x)[1]
    if isinstance(length, int):
        kept = x[:, : max(length - steps, 0)]
    else:
        kept = x[:, : ops.maximum(length - steps, 0)]
    return ops.pad(kept, [[0, 0], [steps, 0], [0, 0]], constant_values=fill)[:, :length]


def _doubling_scan(log_a, log_b):
    """The prefix `log h_t` by recursive doubling (Hillis & Steele 1986), for a length
    known only at run time: `_DOUBLINGS` shifts cover up to 2**_DOUBLINGS steps."""
    for level in range(_DOUBLINGS):
        steps = 2**level
        earlier = (_shift(log_a, steps, 0.0), _shift(log_b, steps, _MASKED_LOG))
        log_a, log_b = _combine(earlier, (log_a, log_b))
    return log_b


def log_states(log_a, log_b, _levels=2):
    """`log h_t` for every step (h_0 = 0), along axis 1 of `(batch, T, units)` tensors.

    A chunked log-space scan. The steps are cut into chunks of `CHUNK`, and one pass of
    `CHUNK` combines scans all chunks at once (vectorised across them), giving each step's
    prefix within its chunk and each chunk's total. The chunks' totals are scanned the
    same way one level up (recursively), and each step is then combined with the total of
    all the chunks before its own. The work is O(T) and the sequential depth `CHUNK` per
    level: O(CHUNK log_CHUNK T) instead of T. When the length is only known at run time,
    two levels of chunks are followed by recursive doubling over what remains (T / 256
    chunk totals).
    """
    length = log_a.shape[1]
    if length is not None and length == 1:
        return log_b
    if length is not None and length <= CHUNK:
        moved = (ops.transpose(log_a, (1, 0, 2)), ops.transpose(log_b, (1, 0, 2)))
        return ops.transpose(_scan_chunks(*moved)[1], (1, 0, 2))
    if length is None and _levels == 0:
        return _doubling_scan(log_a, log_b)
    chunk_a, chunk_b, length = _into_chunks(log_a, log_b, CHUNK)
    local_a, local_b = _scan_chunks(chunk_a, chunk_b)
    total_a, total_b = local_a[-1], local_b[-1]  # (batch, n_chunks, units)
    prefix_b = log_states(total_a, total_b, _levels - 1)
    # What the state is when each chunk starts: the prefix of the chunks before it.
    before = _shift(prefix_b, 1, _MASKED_LOG)
    log_h = _logaddexp(local_a + ops.expand_dims(before, 0), local_b)
    log_h = ops.transpose(log_h, (1, 2, 0, 3))  # (batch, n_chunks, CHUNK, units)
    shape = ops.shape(log_h)
    log_h = ops.reshape(log_h, (shape[0], shape[1] * shape[2], log_a.shape[-1]))
    return log_h[:, :length]


def cumsum(x):
    """Inclusive cumulative sum along axis 1 of `(batch, T, units)`, chunked.

    Within chunks of `CHUNK` steps, then over the chunks' totals (recursively): O(T) work
    whatever the backend, where XLA on TensorFlow lowers one long `cumsum` to a
    reduce-window whose work grows with T squared.
    """
    length = x.shape[1]
    if length is None or length <= CHUNK:
        return ops.cumsum(x, axis=1)
    pad = (-length) % CHUNK
    if pad:
        x = ops.pad(x, [[0, 0], [0, pad], [0, 0]])
    chunks = (length + pad) // CHUNK
    units = x.shape[-1]
    inner = ops.cumsum(ops.reshape(x, (-1, chunks, CHUNK, units)), axis=2)
    totals = cumsum(inner[:, :, -1])  # (batch, chunks, units)
    before = ops.concatenate([ops.zeros_like(totals[:, :1]), totals[:, :-1]], axis=1)
    out = ops.reshape(inner + ops.expand_dims(before, 2), (-1, chunks * CHUNK, units))
    return out[:, :length] if pad else out


def log_final_state(log_a, log_b, valid=None):
    """`log h_T` alone (h_0 = 0): no scan, one log-sum-exp over the steps.

    `h_T = sum_t b_t exp(S_t)` with the suffix sums `S_t = la_{t+1} + ... + la_T`, i.e.
    `log h_T = logsumexp_t(lb_t + S_t)`. The suffix sums are summed from the end, so each
    carries the rounding of its own size only (a term far in the past has a large `-S_t`
    and weighs nothing). Masked steps (`valid` False; their `la` must be 0) are left out.
    """
    suffix = ops.flip(cumsum(ops.flip(log_a, axis=1)), axis=1) - log_a
    terms = log_b + suffix
    if valid is not None:
        terms = ops.where(valid, terms, _LOW)
    return ops.logsumexp(terms, axis=1)


class MinRNNBase(keras.layers.Layer):
    """What MinGRU and MinLSTM share (see the module docstring). Private."""

    # The input projections (gates, candidate state), one `units`-wide Dense each.
    projections = ("gate", "candidate")

    def __init__(
        self,
        units,
        return_sequences=False,
        go_backwards=False,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        chrono_init=True,
        **kwargs,
    ):
        units = _checks.check_int("units", units)
        return_sequences = _checks.check_bool("return_sequences", return_sequences)
        go_backwards = _checks.check_bool("go_backwards", go_backwards)
        dropout = _checks.check_rate("dropout", dropout)
        kernel_initializer = _checks.check_initializer("kernel_initializer", kernel_initializer)
        bias_initializer = _checks.check_initializer("bias_initializer", bias_initializer)
        chrono_init = _checks.check_bool("chrono_init", chrono_init)
        super().__init__(**kwargs)
        self.units = units
        self.return_sequences = return_sequences
        self.go_backwards = go_backwards
        self.dropout = dropout
        self.kernel_initializer = kernel_initializer
        self.bias_initializer = bias_initializer
        self.chrono_init = chrono_init
        # What keras.layers.Bidirectional reads from the layers it wraps.
        self.return_state = False
        self.stateful = False
        self.supports_masking = True
        # One dropout mask per sequence, shared by all its steps (as keras' LSTM does).
        self.input_dropout = keras.layers.Dropout(
            self.dropout, noise_shape=(None, 1, None), dtype=self.dtype_policy, name="dropout"
        )
        self.projection_layers = [
            keras.layers.Dense(
                self.units,
                kernel_initializer=keras.initializers.get(self.kernel_initializer),
                bias_initializer=keras.initializers.get(self.bias_initializer),
                dtype=self.dtype_policy,
                name=name,
            )
            for name in self.projections
        ]

    def _project(self, x):
        """The float32 projections of `x`, one (batch, T, units) tensor per name."""
        return [ops.cast(layer(x), "float32") for layer in self.projection_layers]

    def _log_coefficients(self, x):
        """`(log a, log b)`, each (batch, T, units) in float32, from the inputs `x`."""
        raise NotImplementedError

    def _chrono_biases(self, log_timescales):
        """{projection index: its bias} for timescales `exp(log_timescales)`."""
        raise NotImplementedError

    def _initialize_timescales(self, length):
        """Chrono initialisation (Tallec & Ollivier 2018, *Can recurrent neural networks
        warp time?*): each unit starts with a memory of `1 + tau` steps, `tau` drawn
        uniformly in [1, T_max - 1], T_max the input's static length (1000 if unknown)."""
        t_max = _CHRONO_UNKNOWN_LENGTH if length is None else max(int(length), 3)
        tau = keras.random.uniform((self.units,), minval=1.0, maxval=float(t_max - 1))
        for index, bias in self._chrono_biases(ops.log(tau)).items():
            layer = self.projection_layers[index]
            layer.bias.assign(ops.cast(bias, layer.bias.dtype))

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        name = type(self).__name__
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                f"{name} expects sequences of shape (batch, T, features) with a known number "
                f"of features. Received shape {input_shape}."
            )
        self.input_spec = keras.InputSpec(ndim=3, axes={-1: input_shape[-1]})
        self.input_dropout.build(input_shape)
        for layer in self.projection_layers:
            layer.build(input_shape)
        if self.chrono_init:
            self._initialize_timescales(input_shape[1])
        self.built = True

    def call(self, sequences, initial_state=None, mask=None, training=None):
        x = sequences
        if self.dropout > 0.0:
            x = self.input_dropout(x, training=training)
        log_a, log_b = self._log_coefficients(x)
        valid = None
        if mask is not None:
            valid = _utils.step_mask(mask, "bool")
            log_a = ops.where(valid, log_a, 0.0)
        if self.go_backwards:
            log_a, log_b = ops.flip(log_a, axis=1), ops.flip(log_b, axis=1)
            valid = None if valid is None else ops.flip(valid, axis=1)
        if self.return_sequences:
            if valid is not None:
                log_b = ops.where(valid, log_b, _MASKED_LOG)
            h = ops.exp(log_states(log_a, log_b))
        else:
            h = ops.exp(log_final_state(log_a, log_b, valid))
        if initial_state is not None:
            if isinstance(initial_state, (list, tuple)):
                if len(initial_state) != 1:
                    raise ValueError(
                        f"{type(self).__name__} has one state: pass one (batch, units) tensor "
                        f"as `initial_state`. Received {len(initial_state)} tensors."
                    )
                initial_state = initial_state[0]
            h0 = ops.cast(initial_state, "float32")
            if self.return_sequences:
                decay = ops.exp(ops.cumsum(log_a, axis=1))
                h = h + decay * ops.expand_dims(h0, 1)
            else:
                h = h + ops.exp(ops.sum(log_a, axis=1)) * h0
        return ops.cast(h, self.compute_dtype)

    def compute_output_shape(self, sequences_shape, initial_state_shape=None):
        sequences_shape = tuple(sequences_shape)
        if self.return_sequences:
            return sequences_shape[:2] + (self.units,)
        return (sequences_shape[0], self.units)

    def compute_mask(self, inputs, mask=None):
        return mask if self.return_sequences else None

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "return_sequences": self.return_sequences,
            "go_backwards": self.go_backwards,
            "dropout": self.dropout,
            "kernel_initializer": keras.initializers.serialize(
                keras.initializers.get(self.kernel_initializer)
            ),
            "bias_initializer": keras.initializers.serialize(
                keras.initializers.get(self.bias_initializer)
            ),
            "chrono_init": self.chrono_init,
        }
