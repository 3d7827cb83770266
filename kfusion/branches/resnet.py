import keras
from keras import ops

from kfusion import _checks
from kfusion.branches._base import BaseBranch
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class ResNet(BaseBranch):
    """The residual network for time series (ResNet) as a branch.

    The time-series ResNet of Wang et al. 2017, *Time Series Classification
    from Scratch with Deep Neural Networks: A Strong Baseline* (residual
    connections from He et al. 2016): residual blocks of widths
    `(64, 128, 128)`, then global average pooling. Block `b` of width `w`
    runs three convolutions of windows `(8, 5, 3)` (`padding="same"`,
    stride 1):

        u_1 = relu(BN(conv_8(h)))
        u_2 = relu(BN(conv_5(u_1)))
        u_3 = BN(conv_3(u_2))
        h'  = dropout(relu(u_3 + S(h)))

    where the shortcut `S` is a 1x1 convolution + BN when the width changes
    and a BN alone otherwise (as in the authors' code). The branch pools the
    last block with `pooling` ("mean": the paper's global average pooling).

    Masks: padded steps are set to zero before every convolution and the
    batch normalisations are given the mask (their training statistics leave
    padded steps out), so right-padding a sequence under a mask (from
    `keras.layers.Masking` or the zeros of token ids) changes no output in
    inference mode; the final pooling is masked. Batch-normalisation
    statistics are computed in float32 under mixed precision; the output is
    in the compute dtype.

    Args:
        filters: list of ints, the width of each residual block. Defaults to
            `(64, 128, 128)`.
        kernel_sizes: list of ints, the windows of the convolutions inside
            each block. Defaults to `(8, 5, 3)`.
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
    >>> resnet = kf.branches.ResNet(filters=(8, 16, 16))
    >>> tuple(resnet(np.ones((2, 30, 3), "float32")).shape)
    (2, 16)
    >>> [s is None for s in resnet.shortcut_convs]  # the last block keeps its width
    [False, False, True]
    """

    name_prefix = "resnet_branch"
    kinds = ("tokens", "sequence")

    def __init__(
        self,
        filters=(64, 128, 128),
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

        # Convolution j of block b and its norm: conv_layers[b * K + j], norm_layers[b * K + j]
        # with K = len(kernel_sizes).
        self.conv_layers = []
        self.norm_layers = []
        self.shortcut_norms = []
        self.dropout_layers = []
        for b, width in enumerate(self.filters):
            for j, size in enumerate(self.kernel_sizes):
                self.conv_layers.append(
                    keras.layers.Conv1D(
                        width,
                        size,
                        padding="same",
                        dtype=self.dtype_policy,
                        name=f"block_{b}_conv_{j}",
                    )
                )
                self.norm_layers.append(self._norm(f"block_{b}_norm_{j}"))
            self.shortcut_norms.append(self._norm(f"block_{b}_shortcut_norm"))
            self.dropout_layers.append(
                keras.layers.Dropout(self.dropout, dtype=self.dtype_policy, name=f"dropout_{b}")
            )
        # The shortcut convolutions depend on the input width: made in `_build_body`.
        self.shortcut_convs = []

    def _norm(self, name):
        return keras.layers.BatchNormalization(
            momentum=self.norm_momentum, dtype=self.dtype_policy, name=name
        )

    # ----------------------------------------------------------- body contract
    def _block(self, b):
        """The convolutions and norms of block `b`, in order."""
        k = len(self.kernel_sizes)
        part = slice(b * k, (b + 1) * k)
        return list(zip(self.conv_layers[part], self.norm_layers[part]))

    def _build_body(self, kind, shape):
        shape = tuple(shape)
        for b, width in enumerate(self.filters):
            out_shape = shape[:-1] + (width,)
            inner = shape
            for conv, norm in self._block(b):
                conv.build(inner)
                inner = out_shape
                norm.build(out_shape)
            shortcut = None
            if shape[-1] != width:
                shortcut = keras.layers.Conv1D(
                    width, 1, dtype=self.dtype_policy, name=f"block_{b}_shortcut_conv"
                )
                shortcut.build(shape)
            self.shortcut_convs.append(shortcut)
            self.shortcut_norms[b].build(out_shape)
            self.dropout_layers[b].build(out_shape)
            shape = out_shape

    def _call_body(self, x, mask, kind, training):
        x = ops.cast(x, self.compute_dtype)
        keep = _utils.step_mask(mask, x.dtype)

        def zero_padded(h):  # padded steps read as the convolutions' zero padding
            return h if keep is None else h * keep

        last = len(self.kernel_sizes) - 1
        for b in range(len(self.filters)):
            x = zero_padded(x)
            h = x
            for j, (conv, norm) in enumerate(self._block(b)):
                h = norm(conv(zero_padded(h)), training=training, mask=mask)
                if j < last:
                    h = ops.relu(h)
            shortcut = x if self.shortcut_convs[b] is None else self.shortcut_convs[b](x)
            shortcut = self.shortcut_norms[b](shortcut, training=training, mask=mask)
            x = self.dropout_layers[b](ops.relu(h + shortcut), training=training)
        return zero_padded(x), mask

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
