import keras
from keras import ops

from kfusion import _checks
from kfusion.branches._base import BaseBranch
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class InceptionTime(BaseBranch):
    """One InceptionTime network (Inception modules for time series) as a branch.

    The network of Ismail Fawaz et al. 2020, *InceptionTime: Finding
    AlexNet for Time Series Classification* (Inception modules from Szegedy
    et al. 2015): `depth` Inception modules, a residual shortcut every three
    modules, then global average pooling. Module `d` on an input `h` of `C`
    channels computes

        b  = conv_1(h)          (bottleneck_size filters, when C > 1)
        b  = h                  (otherwise, or with bottleneck_size=None)
        u  = [conv_k(b) for k in kernel_sizes; conv_1(maxpool_3(h))]
        h' = relu(BN(concat(u)))                  ((len(kernel_sizes) + 1) * filters)

    with `padding="same"`, stride 1 and no biases (the batch normalisation
    centres), and `maxpool_3` a `MaxPooling1D(3, strides=1, padding="same")`.
    With `use_residual=True`, after modules 3, 6, ... the output of the
    group becomes `relu(h' + BN(conv_1(r)))`, `r` the input of the group's
    first module. The paper's ensemble of five such networks is five
    branches (or `kfusion.ensemble`).

    Kernel sizes: the paper gives windows {10, 20, 40} and the authors' code
    uses `kernel_size=41 - 1`, halved twice: 40, 20, 10. The defaults are
    those even sizes, so the published results carry over; keras' "same"
    padding then puts the extra step on the right. Odd sizes (41, 21, 11),
    as some ports use, give centred windows: pass `kernel_sizes=(41, 21, 11)`.

    Masks: padded steps are set to zero before every convolution, set to a
    very low value before the max pooling (its own "same" padding never wins
    a max, so a zeroed padded step would win over negative valid values at
    the last valid step) and zeroed again after it, and the batch
    normalisations are given the mask (their training statistics leave
    padded steps out). Right-padding a sequence under a mask (from
    `keras.layers.Masking` or the zeros of token ids) then changes no output
    in inference mode; the final pooling is masked. Batch-normalisation
    statistics are computed in float32 under mixed precision; the output is
    in the compute dtype.

    Args:
        depth: int, the number of Inception modules. Defaults to 6.
        filters: int, the filters of each convolution of a module (a module
            outputs `(len(kernel_sizes) + 1) * filters` channels). Defaults
            to 32.
        kernel_sizes: list of ints, the windows of the parallel convolutions.
            Defaults to `(40, 20, 10)`.
        bottleneck_size: int or None, the filters of the 1x1 bottleneck
            convolution, used when a module's input has more than one
            channel; None disables it. Defaults to 32.
        use_residual: bool, whether a residual shortcut is added every three
            modules. Defaults to True.
        dropout: float in [0, 1), dropout after each module. Defaults to 0
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
        input's mask, where `D` is `output_dim` or
        `(len(kernel_sizes) + 1) * filters`.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> branch = kf.branches.InceptionTime(depth=3, filters=4, kernel_sizes=(9, 5, 3))
    >>> tuple(branch(np.ones((2, 30, 3), "float32")).shape)
    (2, 16)
    >>> len(branch.shortcut_convs)  # one residual shortcut per three modules
    1
    """

    name_prefix = "inception_time_branch"
    kinds = ("tokens", "sequence")

    def __init__(
        self,
        depth=6,
        filters=32,
        kernel_sizes=(40, 20, 10),
        bottleneck_size=32,
        use_residual=True,
        dropout=0.0,
        norm_momentum=0.9,
        pooling="mean",
        output_dim=None,
        vocab_size=None,
        embedding_dim=None,
        **kwargs,
    ):
        depth = _checks.check_int("depth", depth)
        filters = _checks.check_int("filters", filters)
        kernel_sizes = _checks.check_int_tuple("kernel_sizes", kernel_sizes)
        bottleneck_size = _checks.check_int("bottleneck_size", bottleneck_size, allow_none=True)
        use_residual = _checks.check_bool("use_residual", use_residual)
        dropout = _checks.check_rate("dropout", dropout)
        norm_momentum = _checks.check_rate("norm_momentum", norm_momentum)
        super().__init__(
            pooling=pooling,
            output_dim=output_dim,
            vocab_size=vocab_size,
            embedding_dim=embedding_dim,
            **kwargs,
        )
        self.depth = depth
        self.filters = filters
        self.kernel_sizes = kernel_sizes
        self.bottleneck_size = bottleneck_size
        self.use_residual = use_residual
        self.dropout = dropout
        self.norm_momentum = norm_momentum
        self.module_width = (len(self.kernel_sizes) + 1) * self.filters

        # Module d: its parallel convolutions are kernel_convs[d * K + i], K = len(kernel_sizes).
        self.kernel_convs = []
        self.pool_layers = []
        self.pool_convs = []
        self.concat_layers = []
        self.norm_layers = []
        self.dropout_layers = []
        for d in range(self.depth):
            for i, size in enumerate(self.kernel_sizes):
                self.kernel_convs.append(self._conv(self.filters, size, f"module_{d}_conv_{i}"))
            self.pool_layers.append(
                keras.layers.MaxPooling1D(
                    3, strides=1, padding="same", dtype=self.dtype_policy, name=f"module_{d}_pool"
                )
            )
            self.pool_convs.append(self._conv(self.filters, 1, f"module_{d}_pool_conv"))
            self.concat_layers.append(
                keras.layers.Concatenate(dtype=self.dtype_policy, name=f"module_{d}_concat")
            )
            self.norm_layers.append(self._norm(f"module_{d}_norm"))
            self.dropout_layers.append(
                keras.layers.Dropout(self.dropout, dtype=self.dtype_policy, name=f"dropout_{d}")
            )
        self.shortcut_convs = []
        self.shortcut_norms = []
        if self.use_residual:
            for r in range(self.depth // 3):
                self.shortcut_convs.append(self._conv(self.module_width, 1, f"shortcut_{r}_conv"))
                self.shortcut_norms.append(self._norm(f"shortcut_{r}_norm"))
        # The bottlenecks depend on each module's input width: made in `_build_body`.
        self.bottleneck_convs = []

    def _conv(self, width, size, name):
        return keras.layers.Conv1D(
            width, size, padding="same", use_bias=False, dtype=self.dtype_policy, name=name
        )

    def _norm(self, name):
        return keras.layers.BatchNormalization(
            momentum=self.norm_momentum, dtype=self.dtype_policy, name=name
        )

    def _module_convs(self, d):
        k = len(self.kernel_sizes)
        return self.kernel_convs[d * k : (d + 1) * k]

    # ----------------------------------------------------------- body contract
    def _build_body(self, kind, shape):
        shape = tuple(shape)
        out_shape = shape[:-1] + (self.module_width,)
        branch_shape = shape[:-1] + (self.filters,)
        residual_shape = shape
        for d in range(self.depth):
            bottleneck = None
            inner = shape
            if self.bottleneck_size is not None and shape[-1] > 1:
                bottleneck = self._conv(self.bottleneck_size, 1, f"module_{d}_bottleneck")
                bottleneck.build(shape)
                inner = shape[:-1] + (self.bottleneck_size,)
            self.bottleneck_convs.append(bottleneck)
            for conv in self._module_convs(d):
                conv.build(inner)
            self.pool_layers[d].build(shape)
            self.pool_convs[d].build(shape)
            self.concat_layers[d].build([branch_shape] * (len(self.kernel_sizes) + 1))
            self.norm_layers[d].build(out_shape)
            self.dropout_layers[d].build(out_shape)
            if self.use_residual and d % 3 == 2:
                self.shortcut_convs[d // 3].build(residual_shape)
                self.shortcut_norms[d // 3].build(out_shape)
                residual_shape = out_shape
            shape = out_shape

    def _call_body(self, x, mask, kind, training):
        x = ops.cast(x, self.compute_dtype)
        keep = valid = None
        if mask is not None:
            valid = _utils.step_mask(mask, "bool")
            keep = ops.cast(valid, x.dtype)
            half = keras.backend.standardize_dtype(x.dtype) == "float16"
            low = ops.cast(-6.0e4 if half else -1.0e9, x.dtype)

        def zero_padded(h):  # padded steps read as the convolutions' zero padding
            return h if keep is None else h * keep

        residual = x = zero_padded(x)
        for d in range(self.depth):
            bottleneck = self.bottleneck_convs[d]
            # A bias-free 1x1 convolution keeps the zeroed padded steps at zero.
            inner = x if bottleneck is None else bottleneck(x)
            paths = [conv(inner) for conv in self._module_convs(d)]
            if valid is None:
                pooled = self.pool_layers[d](x)
            else:
                pooled = self.pool_layers[d](ops.where(valid, x, low))
                pooled = ops.where(valid, pooled, ops.zeros_like(pooled))
            paths.append(self.pool_convs[d](pooled))
            h = self.concat_layers[d](paths)
            h = ops.relu(self.norm_layers[d](h, training=training, mask=mask))
            if self.use_residual and d % 3 == 2:
                shortcut = self.shortcut_convs[d // 3](residual)
                shortcut = self.shortcut_norms[d // 3](shortcut, training=training, mask=mask)
                h = ops.relu(h + shortcut)
            x = zero_padded(self.dropout_layers[d](h, training=training))
            if self.use_residual and d % 3 == 2:
                residual = x
        return x, mask

    def _body_output_shape(self, kind, shape):
        return tuple(shape)[:-1] + (self.module_width,)

    def get_config(self):
        return {
            **super().get_config(),
            "depth": self.depth,
            "filters": self.filters,
            "kernel_sizes": list(self.kernel_sizes),
            "bottleneck_size": self.bottleneck_size,
            "use_residual": self.use_residual,
            "dropout": self.dropout,
            "norm_momentum": self.norm_momentum,
        }
