import keras
from keras import ops

from kfusion.layers import _min_rnn


@keras.saving.register_keras_serializable(package="kfusion")
class MinLSTM(_min_rnn.MinRNNBase):
    """The minimal LSTM of Feng et al. 2024, computed in parallel over time.

    From *Were RNNs All We Needed?* (Feng, Tung, Ahmed, Bengio and Hajimirsadeghi
    2024). The forget and input gates and the candidate state depend on the
    input only; the gates are normalised to sum to one, which keeps the state
    independent of the sequence length:

        f_t = sigmoid(W_f x_t + b_f),   i_t = sigmoid(W_i x_t + b_i)
        h~_t = g(W_h x_t + b_h),        g(v) = v + 0.5 (v >= 0), sigmoid(v) (v < 0)
        h_t = f_t / (f_t + i_t) * h_{t-1} + i_t / (f_t + i_t) * h~_t,    h_0 = 0

    The linear recurrence is solved with `keras.ops.associative_scan` in log
    space (the paper's numerically stable form): O(log T) sequential depth
    instead of T steps. With `return_sequences=False` only the final state is
    computed, as one log-sum-exp over the steps. States are positive. The
    gates, the scan and the state are computed in float32; the input
    projection follows the dtype policy and the output is cast to the compute
    dtype.

    Masked steps leave the state unchanged (the recurrence's identity), so
    right-padding never changes the outputs at valid steps or the final state.
    The layer works inside `keras.layers.Bidirectional`.

    Args:
        units: int, the state width.
        return_sequences: bool, return every step's state `(batch, T, units)`
            (True) or only the final one `(batch, units)` (False, default).
        go_backwards: bool, read the sequence from its end; with
            `return_sequences=True` the states come in reading order (reversed),
            as keras' recurrent layers do.
        dropout: float in [0, 1), dropout on the inputs (one mask per sequence,
            shared by its steps).
        kernel_initializer: initializer of the input projection's kernel.
        bias_initializer: initializer of its biases (the candidate's, and the
            gates' too with `chrono_init=False`).
        chrono_init: bool, whether the gate biases start with the chrono
            initialisation of Tallec & Ollivier 2018 (*Can recurrent neural
            networks warp time?*): each unit's memory starts at `1 + tau` steps,
            `tau` uniform in [1, T_max - 1], T_max the input's static length
            (1000 when unknown). With zero biases a unit starts forgetting half
            its state every step, and long-range signals give no gradient.
            Defaults to True.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        sequences: a float tensor `(batch, T, features)`; `T` may be unknown.
        initial_state: optional `(batch, units)` state `h_0` (or a list
            holding it). Defaults to zeros.
        mask: optional boolean `(batch, T)`, False at padded steps.
        training: bool, whether dropout is active.

    Returns:
        `(batch, T, units)` with `return_sequences=True`, else `(batch, units)`.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> x = np.random.default_rng(0).normal(size=(2, 100, 3)).astype("float32")
    >>> tuple(kf.layers.MinLSTM(8, return_sequences=True)(x).shape)
    (2, 100, 8)
    >>> mask = np.arange(100)[None, :] < np.array([[100], [60]])
    >>> tuple(kf.layers.MinLSTM(8)(x, mask=mask).shape)
    (2, 8)
    """

    projections = ("forget", "input", "candidate")

    def _log_coefficients(self, x):
        forget, inputs, candidate = self._project(x)
        # r = log(i / f) = log sigmoid(k_i) - log sigmoid(k_f)
        ratio = ops.softplus(-forget) - ops.softplus(-inputs)
        log_forget = -ops.softplus(ratio)  # log(f / (f + i))
        # log(i / (f + i)) = log(f / (f + i)) + r
        return log_forget, log_forget + ratio + _min_rnn.log_g(candidate)

    def _chrono_biases(self, log_timescales):
        # f / (f + i) = tau / (1 + tau) with b_f = log tau, b_i = -log tau
        return {0: log_timescales, 1: -log_timescales}
