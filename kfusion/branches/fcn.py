import keras
from keras import ops

from kfusion import _checks
from kfusion.branches._base import BaseBranch
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class FCN(BaseBranch):
    """The fully convolutional network for time series (FCN) as a branch.

    The time-series baseline of Wang et al. 2017, *Time Series
    Classification from Scratch with Deep Neural Networks: A Strong
    Baseline*: three convolution blocks, then global average pooling. Block
    `l` computes

        h_l = dropout(relu(BN(conv_l(h_{l-1}))))

    with `Conv1D(128, 8)`, `Conv1D(256, 5)` and `Conv1D(128, 3)` by default
    (`padding="same"`, stride 1, so the length is kept), and the branch
    pools the last block with `pooling` ("mean": the paper's global average
    pooling).

    Masks: padded steps are set to zero before every convolution (a padded
    step then looks like the convolution's own "same" zero padding) and the
    batch normalisation is given the mask, so its training statistics leave
    padded steps out. Right-padding a sequence under a mask (from
    `keras.layers.Masking` or the zeros of token ids) changes no output in
    inference mode; the final pooling is masked. In training mode batch
    statistics mix the samples of a batch, as for any batch normalisation.
    Batch-normalisation statistics are computed in float32 under mixed
    precision; the output is in the compute dtype.

    Args:
        filters: list of ints, the number of filters of each convolution.
            Defaults to `(128, 256, 128)`.
        kernel_sizes: list of ints, one convolution window per entry of
            `filters`. Defaults to `(8, 5, 3)`.
        dropout: float in [0, 1), dropout after each block. Defaults to 0
            (the paper uses none).
        norm_momentum: float in [0, 1), the momentum of the batch
            normalisations' moving mean and variance. Defaults to 0.9 rather
            than keras' 0.99: small time-series sets give a few training
            steps per epoch, and with 0.99 the moving statistics stay near
            their start values, so inference-mode outputs are wrong.
        pooling: `"mean"`, `"max"`, `"last"` (masked) over the steps, or
            None to return the steps and their mask.
        output_dim: int or None, width of a final linear projection (per step
            when `pooling=None`).
        vocab_size: int or None. When given, the branch takes integer token
            ids (0 is padding) and embeds them.
        embedding_dim: int or None, the token embedding width. Defaults to 64.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a float sequence `(batch, T, F)` (`T` may be None) or integer
            token ids `(batch, T)` (with `vocab_size`).
        training: bool, whether dropout and batch normalisation run in
            training mode.
        mask: optional boolean `(batch, T)` mask for float sequences (token
            ids make their own mask from the zeros).

    Returns:
        `(batch, D)` with a pooling, otherwise `(batch, T, D)` with the
        input's mask, where `D` is `output_dim` or `filters[-1]`.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> fcn = kf.branches.FCN(filters=(8, 16, 8))
    >>> tuple(fcn(np.ones((2, 30, 3), "float32")).shape)
    (2, 8)
    >>> text = kf.branches.FCN(filters=(4, 4), kernel_sizes=(3, 3), vocab_size=50)
    >>> tuple(text(np.array([[5, 7, 9, 0], [3, 0, 0, 0]])).shape)
    (2, 4)
    """

    name_prefix = "fcn_branch"
    kinds = ("tokens", "sequence")

    def __init__(
        self,
        filters=(128, 256, 128),
        kernel_sizes=(8, 5, 3),
        dropout=0.0,
        norm_momentum=0.9,
        pooling="mean",
        output_dim=None,
        vocab_size=None,
        embedding_dim=None,
        **kwargs,
    ):
        filters = _checks.check_int_tuple("filters", filters)
        kernel_sizes = _checks.check_int_tuple("kernel_sizes", kernel_sizes)
        if len(kernel_sizes) != len(filters):
            raise ValueError(
                "`kernel_sizes` must give one window per entry of `filters` "
                f"({len(filters)}). Received: kernel_sizes={kernel_sizes!r}"
            )
        dropout = _checks.check_rate("dropout", dropout)
        norm_momentum = _checks.check_rate("norm_momentum", norm_momentum)
        super().__init__(
            pooling=pooling,
            output_dim=output_dim,
            vocab_size=vocab_size,
            embedding_dim=embedding_dim,
            **kwargs,
        )
        self.filters = filters
        self.kernel_sizes = kernel_sizes
        self.dropout = dropout
        self.norm_momentum = norm_momentum

        self.conv_layers = []
        self.norm_layers = []
        self.dropout_layers = []
        for i, (width, size) in enumerate(zip(self.filters, self.kernel_sizes)):
            self.conv_layers.append(
                keras.layers.Conv1D(
                    width, size, padding="same", dtype=self.dtype_policy, name=f"conv_{i}"
                )
            )
            self.norm_layers.append(
                keras.layers.BatchNormalization(
                    momentum=self.norm_momentum, dtype=self.dtype_policy, name=f"norm_{i}"
                )
            )
            self.dropout_layers.append(
                keras.layers.Dropout(self.dropout, dtype=self.dtype_policy, name=f"dropout_{i}")
            )

    # ----------------------------------------------------------- body contract
    def _build_body(self, kind, shape):
        shape = tuple(shape)
        for conv, norm, drop in zip(self.conv_layers, self.norm_layers, self.dropout_layers):
            conv.build(shape)
            shape = shape[:-1] + (conv.filters,)
            norm.build(shape)
            drop.build(shape)

    def _call_body(self, x, mask, kind, training):
        x = ops.cast(x, self.compute_dtype)
        keep = _utils.step_mask(mask, x.dtype)
        for conv, norm, drop in zip(self.conv_layers, self.norm_layers, self.dropout_layers):
            if keep is not None:
                x = x * keep  # padded steps read as the convolution's zero padding
            h = norm(conv(x), training=training, mask=mask)
            x = drop(ops.relu(h), training=training)
        if keep is not None:
            x = x * keep
        return x, mask

    def _body_output_shape(self, kind, shape):
        return tuple(shape)[:-1] + (self.filters[-1],)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": list(self.filters),
            "kernel_sizes": list(self.kernel_sizes),
            "dropout": self.dropout,
            "norm_momentum": self.norm_momentum,
        }
