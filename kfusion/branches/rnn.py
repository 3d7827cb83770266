import keras
from keras import ops

from kfusion import _checks
from kfusion.branches._base import BaseBranch
from kfusion.layers import _utils
from kfusion.layers.min_gru import MinGRU
from kfusion.layers.min_lstm import MinLSTM

_CELLS = {
    "lstm": keras.layers.LSTM,
    "gru": keras.layers.GRU,
    "mingru": MinGRU,
    "minlstm": MinLSTM,
}
# Cells computed all at once over time (no recurrent weights, no recurrent dropout).
_PARALLEL = ("mingru", "minlstm")
_HALF = ("float16", "bfloat16")
# The causal convolution window in front of minGRU / minLSTM by default (Mamba's is 4).
_AUTO_CONV = 4


@keras.saving.register_keras_serializable(package="kfusion")
class RNN(BaseBranch):
    """A recurrent branch (LSTM, GRU, minGRU, minLSTM) for token ids, sequences and images.

    A stack of `num_layers` recurrent layers: the LSTM of Hochreiter &
    Schmidhuber 1997 (*Long Short-Term Memory*), the GRU of Cho et al. 2014
    (*Learning Phrase Representations using RNN Encoder-Decoder*), or the
    minGRU / minLSTM of Feng et al. 2024 (*Were RNNs All We Needed?*,
    `kf.layers.MinGRU`, `kf.layers.MinLSTM`), optionally bidirectional
    (Schuster & Paliwal 1997):

        h_t = cell(x_t, h_{t-1})                               (forward)
        out_t = [h_t^forward; h_t^backward]                    (bidirectional)

    The mask (token ids: the non-zero ids; sequences: the keras mask) goes to
    every layer, so padded steps neither update the state nor count.

    With `pooling="last"` the final layer returns only its final state: with
    right-padding that is the state after the last valid step, and for a
    bidirectional layer `[forward final; backward final]`, the backward
    direction having read the whole valid sequence. Other poolings (and None)
    keep every step and the branch pools them with the mask.

    Images are read row by row: `(batch, H, W, C)` becomes a sequence of `H`
    steps of `W * C` features (the width and channels must be known).

    minGRU and minLSTM gates depend on the input only, so the whole sequence
    is computed at once (a log-space parallel scan, no loop over the steps).
    At 1,024 steps on one CPU thread, a minGRU layer compiled with
    `jit_compile=True` trains 3.1x the samples/s of keras' LSTM compiled the
    same way and 5.6x PyTorch's `nn.LSTM`; without XLA (keras' default on a
    TensorFlow CPU) it is 1.3x keras' LSTM (benchmarks/RESULTS.md, "Long
    sequences"). A single layer is
    a linear recurrence in its state; stacking layers (`num_layers >= 2`) adds
    depth.

    By default minGRU and minLSTM read the sequence through a causal
    convolution first (`conv_kernel_size=4` steps, `units` filters, GELU, then
    layer normalisation per step), as Mamba's block does (Gu & Dao 2023): a
    step sees itself and the three before it, never a later one. Without it a
    cell's gates are functions of the single value x_t on a one-channel series,
    and the cells stay at chance on univariate sets such as GunPoint; with it
    they match or beat the LSTM on the four UCR/UEA sets of the accuracy table,
    with one layer and with two (benchmarks/ACCURACY.md, "RNN cells").

    Under mixed precision the LSTM and GRU layers (their sigmoid gates and the
    carried state) run in float32 with float32 weights; minGRU and minLSTM
    project their inputs in the compute dtype and run the gates and the scan
    in float32. The output is cast to the policy's compute dtype.

    Args:
        units: int, the state width of each recurrent layer. Defaults to 64.
        cell: `"lstm"`, `"gru"`, `"mingru"` or `"minlstm"`. Defaults to
            `"lstm"`.
        bidirectional: bool, whether every layer also reads the sequence
            backwards (output width `2 * units`).
        num_layers: int, the number of stacked recurrent layers.
        dropout: float in [0, 1), dropout on the inputs of each layer.
        recurrent_dropout: float in [0, 1), dropout on the recurrent state
            (LSTM and GRU only: minGRU and minLSTM have no recurrent weights).
        pooling: `"last"` (the final state, default), `"mean"` or `"max"`
            (masked, over the steps), or None to return every step with its
            mask.
        output_dim: int or None, width of a final linear projection (per step
            when `pooling=None`).
        vocab_size: int or None. When given, the branch takes integer token
            ids (0 is padding) and embeds them.
        embedding_dim: int or None, the token embedding width. Defaults to 64.
        conv_kernel_size: int, None or `"auto"`: the window of a causal
            convolution (`units` filters, GELU, layer-normalised) in front of
            the first recurrent layer, or None for none. `"auto"` (default)
            means 4 for minGRU and minLSTM and None for LSTM and GRU. Padded
            steps are zeroed before it.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: integer token ids `(batch, T)` (with `vocab_size`), a float
            sequence `(batch, T, F)` or an image `(batch, H, W, C)`.
        training: bool, whether dropout is active.
        mask: optional boolean `(batch, T)` mask for float sequences (token
            ids make their own mask from the zeros).

    Returns:
        `(batch, D)` with a pooling, otherwise `(batch, T, D)` (with the
        input's mask for token ids and sequences; `T = H` for images), where
        `D` is `output_dim`, or `units` (`2 * units` when bidirectional).

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> rnn = kf.branches.RNN(units=8, cell="gru", bidirectional=True)
    >>> tuple(rnn(np.ones((2, 10, 4), "float32")).shape)
    (2, 16)
    >>> rows = kf.branches.RNN(units=8, num_layers=2, pooling=None)
    >>> tuple(rows(np.ones((2, 6, 5, 3), "float32")).shape)
    (2, 6, 8)
    >>> long = kf.branches.RNN(units=8, cell="mingru", num_layers=2, pooling="mean")
    >>> tuple(long(np.ones((2, 1000, 3), "float32")).shape)
    (2, 8)
    >>> text = kf.branches.RNN(units=8, vocab_size=100, embedding_dim=4)
    >>> tuple(text(np.array([[5, 7, 9, 0], [3, 0, 0, 0]])).shape)
    (2, 8)
    """

    name_prefix = "rnn_branch"
    kinds = ("tokens", "sequence", "image")

    def __init__(
        self,
        units=64,
        cell="lstm",
        bidirectional=False,
        num_layers=1,
        dropout=0.0,
        recurrent_dropout=0.0,
        pooling="last",
        output_dim=None,
        vocab_size=None,
        embedding_dim=None,
        conv_kernel_size="auto",
        **kwargs,
    ):
        units = _checks.check_int("units", units)
        cell = _checks.check_choice("cell", cell, tuple(_CELLS))
        if isinstance(conv_kernel_size, str) and conv_kernel_size == "auto":
            conv_kernel_size = _AUTO_CONV if cell in _PARALLEL else None
        else:
            try:
                conv_kernel_size = _checks.check_int(
                    "conv_kernel_size", conv_kernel_size, allow_none=True
                )
            except ValueError:
                raise ValueError(
                    "`conv_kernel_size` must be an integer >= 1, None or 'auto'. "
                    f"Received: conv_kernel_size={conv_kernel_size!r}"
                ) from None
        bidirectional = _checks.check_bool("bidirectional", bidirectional)
        num_layers = _checks.check_int("num_layers", num_layers)
        dropout = _checks.check_rate("dropout", dropout)
        recurrent_dropout = _checks.check_rate("recurrent_dropout", recurrent_dropout)
        if cell in _PARALLEL and recurrent_dropout:
            raise ValueError(
                f"`recurrent_dropout` applies to the lstm and gru cells; {cell} has no "
                f"recurrent weights (use `dropout`). Received: "
                f"recurrent_dropout={recurrent_dropout!r}"
            )
        super().__init__(
            pooling=pooling,
            output_dim=output_dim,
            vocab_size=vocab_size,
            embedding_dim=embedding_dim,
            **kwargs,
        )
        self.units = units
        self.cell = cell
        self.bidirectional = bidirectional
        self.num_layers = num_layers
        self.dropout = dropout
        self.recurrent_dropout = recurrent_dropout
        self.conv_kernel_size = conv_kernel_size
        self.conv = self.conv_norm = None
        if conv_kernel_size is not None:
            # Causal: a step sees itself and the `k - 1` steps before it, never a later
            # one, so right-padding cannot reach a valid step.
            self.conv = keras.layers.Conv1D(
                units,
                conv_kernel_size,
                padding="causal",
                activation="gelu",
                dtype=self.dtype_policy,
                name="conv",
            )
            # Normalised per step, so the gates start on inputs of unit scale.
            self.conv_norm = keras.layers.LayerNormalization(
                dtype=self.dtype_policy, name="conv_norm"
            )

        # LSTM/GRU gates and state stay in float32 under mixed precision (minGRU and
        # minLSTM keep their scan in float32 themselves).
        rnn_policy = self.dtype_policy
        half = keras.backend.standardize_dtype(self.compute_dtype) in _HALF
        if half and self.cell not in _PARALLEL:
            rnn_policy = keras.DTypePolicy("float32")
        extra = {} if self.cell in _PARALLEL else {"recurrent_dropout": self.recurrent_dropout}
        self.rnn_layers = []
        # minGRU/minLSTM read backwards through their own backward layer, not through
        # keras.layers.Bidirectional: that wrapper rebuilds the layer it wraps from its
        # config, and while a model loads keras matches such configs by id(), so a freed
        # template's id taken by a later one can hand a Bidirectional an earlier layer as
        # its backward half.
        self.backward_layers = []
        for i in range(self.num_layers):
            last = i == self.num_layers - 1

            def make(name, backwards=False, last=last):
                more = {"go_backwards": True} if backwards else {}
                return _CELLS[self.cell](
                    self.units,
                    dropout=self.dropout,
                    return_sequences=not (last and self.pooling == "last"),
                    dtype=rnn_policy,
                    name=name,
                    **extra,
                    **more,
                )

            if self.bidirectional and self.cell in _PARALLEL:
                layer = make(f"forward_{self.cell}_{i}")
                self.backward_layers.append(make(f"backward_{self.cell}_{i}", backwards=True))
            elif self.bidirectional:
                layer = keras.layers.Bidirectional(
                    make(f"{self.cell}_{i}"), dtype=rnn_policy, name=f"bidirectional_{i}"
                )
            else:
                layer = make(f"{self.cell}_{i}")
            self.rnn_layers.append(layer)

    # ------------------------------------------------------------------ helpers
    def _rows_as_sequence_shape(self, shape):
        batch, height, width, channels = shape
        if width is None:
            raise ValueError(
                f"RNN branch '{self.name}' reads images row by row and needs a known image "
                f"width. Received shape {tuple(shape)}."
            )
        return (batch, height, width * channels)

    def _make_input_spec(self, kind, shape):
        if kind == "image":  # rows of width * channels features: both are fixed
            return keras.InputSpec(ndim=4, axes={-2: shape[2], -1: shape[3]})
        return super()._make_input_spec(kind, shape)

    # ----------------------------------------------------------- body contract
    def _build_body(self, kind, shape):
        shape = tuple(shape)
        if kind == "image":
            shape = self._rows_as_sequence_shape(shape)
        if self.conv is not None:
            self.conv.build(shape)
            shape = tuple(self.conv.compute_output_shape(shape))
            self.conv_norm.build(shape)
        for i, layer in enumerate(self.rnn_layers):
            layer.build(shape)
            out = tuple(layer.compute_output_shape(shape))
            if self.backward_layers:
                self.backward_layers[i].build(shape)
                out = out[:-1] + (2 * out[-1],)
            shape = out

    def _call_body(self, x, mask, kind, training):
        if kind == "image":
            _, height, features = self._rows_as_sequence_shape(tuple(x.shape))
            if height is None:
                x = ops.reshape(x, (ops.shape(x)[0], -1, features))
            else:
                x = ops.reshape(x, (-1, height, features))
            x = ops.cast(x, self.compute_dtype)
            mask = None
        if self.conv is not None:
            x = _utils.zero_padded(x, mask)  # padded steps read as zeros, as before step 0
            x = self.conv_norm(self.conv(x))
        for i, layer in enumerate(self.rnn_layers):
            if self.backward_layers:
                backward = self.backward_layers[i](x, mask=mask, training=training)
                x = layer(x, mask=mask, training=training)
                if len(backward.shape) == 3:  # states come in reading order: realign them
                    backward = ops.flip(backward, axis=1)
                x = ops.concatenate([x, backward], axis=-1)
            else:
                x = layer(x, mask=mask, training=training)
        x = ops.cast(x, self.compute_dtype)
        if len(x.shape) == 2:
            return x, None
        return x, mask

    def _body_output_shape(self, kind, shape):
        shape = tuple(shape)
        if kind == "image":
            shape = self._rows_as_sequence_shape(shape)
        width = self.units * (2 if self.bidirectional else 1)
        if self.pooling == "last":
            return (shape[0], width)
        return (shape[0], shape[1], width)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "cell": self.cell,
            "bidirectional": self.bidirectional,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
            "recurrent_dropout": self.recurrent_dropout,
            "conv_kernel_size": self.conv_kernel_size,
        }

    @classmethod
    def from_config(cls, config):
        # Configs saved before `conv_kernel_size` existed had no convolution.
        config = {"conv_kernel_size": None, **config}
        return super().from_config(config)
