import keras
from keras import ops

from kfusion import _checks
from kfusion.branches._base import BaseBranch
from kfusion.layers import _utils

_NORMS = ("batch", "layer", None)


@keras.saving.register_keras_serializable(package="kfusion")
class CNN(BaseBranch):
    """A convolutional branch for token ids, sequences and images.

    A stack of convolutions (LeCun et al. 1998, *Gradient-Based Learning
    Applied to Document Recognition*; for text, Kim 2014, *Convolutional
    Neural Networks for Sentence Classification*), optionally with residual
    connections (He et al. 2016, *Deep Residual Learning for Image
    Recognition*). Layer `l` computes

        u_l = dropout(act(norm(conv_l(h_{l-1}))))
        h_l = u_l + P_l h_{l-1}                      (residual=True)
        h_l = u_l                                    (residual=False)

    where `P_l` is a 1x1 convolution when the widths differ and the identity
    otherwise.

    Sequences and token ids go through `Conv1D` layers with `padding="same"`
    and stride 1, and nothing pools between layers, so the length and the mask
    are kept. With a mask, the padded steps are set to zero before the first
    layer and again after every layer (`h_l = m * h_l`), so right-padding
    never reaches a valid step: a padded input gives, at its valid steps, the
    output of the unpadded input, and the final masked pooling ignores the
    rest.

    Images go through `Conv2D` layers (`padding="same"`) with a
    `MaxPooling2D(image_pooling)` between consecutive layers; a pooling is
    skipped when a known spatial size would drop below 1 (with unknown sizes
    it always runs). The `(batch, H', W', C)` feature map is read as
    `(batch, H' * W', C)` positions, which the branch then pools.

    `normalization="batch"` is given the mask, so padded steps are left out of
    the batch statistics in training; the statistics still mix the samples of
    a batch, so in training the output of one sample depends on the rest of
    its batch (at inference it is a fixed affine map and padding cannot change
    it). For padded token ids prefer `normalization="layer"`, which normalises
    each step on its own. Normalisation statistics are computed in float32
    under mixed precision.

    Args:
        filters: int or list of ints, the number of filters of each
            convolution. Defaults to `(64, 64)`.
        kernel_size: int, the convolution window (`k` steps for sequences,
            `k x k` for images). Defaults to 3.
        activation: activation after each convolution. Defaults to `"relu"`.
        dropout: float in [0, 1), dropout after each convolution.
        residual: bool, whether each layer adds a residual connection.
        normalization: `"batch"`, `"layer"` or None, applied after each
            convolution, before the activation.
        norm_momentum: float in [0, 1), the momentum of the moving mean and
            variance of `normalization="batch"`. Defaults to 0.9 (PyTorch's
            default, momentum 0.1 in its convention) rather than keras' 0.99:
            after `n` training steps the start values keep a weight
            `norm_momentum ** n`, 0.05 after 30 steps at 0.9 but 0.74 at
            0.99, and small sets give only a few steps per epoch, so with 0.99
            inference-mode outputs would use statistics far from the data's.
        image_pooling: int or None, the `MaxPooling2D` size between image
            convolutions. None disables it. Defaults to 2.
        pooling: `"mean"`, `"max"`, `"last"` (masked) over the steps or image
            positions, or None to return them (with their mask for token ids
            and sequences).
        output_dim: int or None, width of a final linear projection (per step
            when `pooling=None`).
        vocab_size: int or None. When given, the branch takes integer token
            ids (0 is padding) and embeds them.
        embedding_dim: int or None, the token embedding width. Defaults to 64.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: integer token ids `(batch, T)` (with `vocab_size`), a float
            sequence `(batch, T, F)` or an image `(batch, H, W, C)`.
        training: bool, whether dropout and batch normalisation run in
            training mode.
        mask: optional boolean `(batch, T)` mask for float sequences (token
            ids make their own mask from the zeros).

    Returns:
        `(batch, D)` with a pooling, otherwise `(batch, T, D)` for token ids
        and sequences (with the input's mask) or `(batch, H' * W', D)` for
        images, where `D` is `output_dim` or `filters[-1]`.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> cnn = kf.branches.CNN(filters=(8, 16), kernel_size=3, residual=True)
    >>> tuple(cnn(np.ones((2, 10, 4), "float32")).shape)
    (2, 16)
    >>> images = kf.branches.CNN(filters=(8, 8), image_pooling=2, pooling=None)
    >>> tuple(images(np.ones((2, 8, 8, 3), "float32")).shape)
    (2, 16, 8)
    >>> text = kf.branches.CNN(filters=8, vocab_size=100, embedding_dim=4, pooling="max")
    >>> tuple(text(np.array([[5, 7, 9, 0], [3, 0, 0, 0]])).shape)
    (2, 8)
    """

    name_prefix = "cnn_branch"
    kinds = ("tokens", "sequence", "image")

    def __init__(
        self,
        filters=(64, 64),
        kernel_size=3,
        activation="relu",
        dropout=0.0,
        residual=False,
        normalization=None,
        image_pooling=2,
        norm_momentum=0.9,
        pooling="mean",
        output_dim=None,
        vocab_size=None,
        embedding_dim=None,
        **kwargs,
    ):
        filters = _checks.check_int_tuple("filters", filters)
        kernel_size = _checks.check_int("kernel_size", kernel_size)
        activation = _checks.check_activation("activation", activation)
        dropout = _checks.check_rate("dropout", dropout)
        residual = _checks.check_bool("residual", residual)
        normalization = _checks.check_choice("normalization", normalization, _NORMS)
        image_pooling = _checks.check_int("image_pooling", image_pooling, allow_none=True)
        norm_momentum = _checks.check_rate("norm_momentum", norm_momentum)
        super().__init__(
            pooling=pooling,
            output_dim=output_dim,
            vocab_size=vocab_size,
            embedding_dim=embedding_dim,
            **kwargs,
        )
        self.filters = filters
        self.kernel_size = kernel_size
        self.activation = activation
        self.dropout = dropout
        self.residual = residual
        self.normalization = normalization
        self.image_pooling = image_pooling
        self.norm_momentum = norm_momentum

        self.norm_layers = []
        self.dropout_layers = []
        for i in range(len(self.filters)):
            if self.normalization == "batch":
                norm = keras.layers.BatchNormalization(
                    momentum=self.norm_momentum, dtype=self.dtype_policy, name=f"norm_{i}"
                )
            elif self.normalization == "layer":
                norm = keras.layers.LayerNormalization(dtype=self.dtype_policy, name=f"norm_{i}")
            else:
                norm = None
            self.norm_layers.append(norm)
            self.dropout_layers.append(
                keras.layers.Dropout(self.dropout, dtype=self.dtype_policy, name=f"dropout_{i}")
            )
        self.activation_layer = keras.layers.Activation(
            self.activation or "linear", dtype=self.dtype_policy, name="activation"
        )
        # Conv1D or Conv2D, the residual projections, the image poolings and
        # the position flattening depend on the input kind and width: they are
        # created in `_build_body`.
        self.conv_layers = []
        self.shortcut_layers = []
        self.pool_layers = []
        self.flatten_layer = None

    # ------------------------------------------------------------------ helpers
    def _image_plan(self, height, width):
        """Which poolings run and the final spatial size, for an input size.

        Returns `(use_pool, height, width)`; `use_pool[i]` says whether the
        pooling after convolution `i` runs. Unknown sizes (None) stay None and
        never skip a pooling.
        """
        use_pool = []
        p = self.image_pooling
        for _ in range(len(self.filters) - 1):
            use = (
                p is not None
                and (height is None or height // p >= 1)
                and (width is None or width // p >= 1)
            )
            use_pool.append(use)
            if use:
                height = None if height is None else height // p
                width = None if width is None else width // p
        return use_pool, height, width

    # ----------------------------------------------------------- body contract
    def _build_body(self, kind, shape):
        shape = tuple(shape)
        image = kind == "image"
        conv_cls = keras.layers.Conv2D if image else keras.layers.Conv1D
        use_pool = []
        if image:
            use_pool, _, _ = self._image_plan(shape[1], shape[2])
        for i, width in enumerate(self.filters):
            conv = conv_cls(
                width,
                self.kernel_size,
                padding="same",
                dtype=self.dtype_policy,
                name=f"conv_{i}",
            )
            conv.build(shape)
            self.conv_layers.append(conv)
            out_shape = shape[:-1] + (width,)
            shortcut = None
            if self.residual and shape[-1] != width:
                shortcut = conv_cls(width, 1, dtype=self.dtype_policy, name=f"shortcut_{i}")
                shortcut.build(shape)
            self.shortcut_layers.append(shortcut)
            if self.norm_layers[i] is not None:
                self.norm_layers[i].build(out_shape)
            self.dropout_layers[i].build(out_shape)
            shape = out_shape
            if i < len(use_pool) and use_pool[i]:
                pool = keras.layers.MaxPooling2D(
                    self.image_pooling, dtype=self.dtype_policy, name=f"pool_{i}"
                )
                pool.build(shape)
                shape = tuple(pool.compute_output_shape(shape))
            else:
                pool = None
            self.pool_layers.append(pool)
        if image:
            self.flatten_layer = keras.layers.Reshape(
                (-1, self.filters[-1]), dtype=self.dtype_policy, name="flatten_positions"
            )
            self.flatten_layer.build(shape)

    def _call_body(self, x, mask, kind, training):
        if kind == "image":
            x = ops.cast(x, self.compute_dtype)
            mask = None
        keep = _utils.step_mask(mask, x.dtype)
        if keep is not None:
            x = x * keep
        for i, conv in enumerate(self.conv_layers):
            h = conv(x)
            norm = self.norm_layers[i]
            if isinstance(norm, keras.layers.BatchNormalization):
                h = norm(h, training=training, mask=mask)
            elif norm is not None:
                h = norm(h)
            h = self.activation_layer(h)
            h = self.dropout_layers[i](h, training=training)
            if self.residual:
                shortcut = self.shortcut_layers[i]
                h = h + (x if shortcut is None else shortcut(x))
            if keep is not None:
                h = h * ops.cast(keep, h.dtype)
            if self.pool_layers[i] is not None:
                h = self.pool_layers[i](h)
            x = h
        if kind == "image":
            return self.flatten_layer(x), None
        return x, mask

    def _body_output_shape(self, kind, shape):
        shape = tuple(shape)
        if kind == "image":
            _, height, width = self._image_plan(shape[1], shape[2])
            positions = None if height is None or width is None else height * width
            return (shape[0], positions, self.filters[-1])
        return shape[:-1] + (self.filters[-1],)

    def get_config(self):
        return {
            **super().get_config(),
            "filters": list(self.filters),
            "kernel_size": self.kernel_size,
            "activation": _checks.serialize_activation(self.activation),
            "dropout": self.dropout,
            "residual": self.residual,
            "normalization": self.normalization,
            "image_pooling": self.image_pooling,
            "norm_momentum": self.norm_momentum,
        }
