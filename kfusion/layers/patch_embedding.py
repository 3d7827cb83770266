import keras
from keras import ops

from kfusion import _checks, _quantization
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class PatchEmbedding(keras.layers.Layer):
    """Cuts an image into patches and embeds each one: the ViT tokenizer.

    From Dosovitskiy et al. 2021, *An Image is Worth 16x16 Words:
    Transformers for Image Recognition at Scale*. Non-overlapping
    `ph x pw` patches are flattened and linearly projected, which is a
    `Conv2D` with kernel and stride equal to the patch size:

        z_n = W vec(x_patch_n) + b,   n = 1..N,   N = (H // ph) * (W // pw)

    Rows and columns beyond the last whole patch are dropped. Patches are
    numbered row by row.

    Args:
        patch_size: int >= 1 or a pair `(ph, pw)`. Patch height and width.
        dim: int >= 1. Width of each patch embedding.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: an image batch of shape `(batch, H, W, C)` (channels last)
            with `H >= ph` and `W >= pw`.

    Returns:
        A tensor of shape `(batch, N, dim)`.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> images = np.zeros((2, 32, 24, 3), "float32")
    >>> tuple(kf.layers.PatchEmbedding(patch_size=8, dim=16)(images).shape)
    (2, 12, 16)
    >>> tuple(kf.layers.PatchEmbedding(patch_size=(16, 8), dim=16)(images).shape)
    (2, 6, 16)
    """

    def __init__(self, patch_size, dim, **kwargs):
        patch_size = _checks.check_int_tuple("patch_size", patch_size)
        if len(patch_size) not in (1, 2):
            raise ValueError(
                "`patch_size` must be an integer or a pair (ph, pw). "
                f"Received: patch_size={patch_size!r}"
            )
        dim = _checks.check_int("dim", dim)
        super().__init__(**kwargs)
        self.patch_size = patch_size * 2 if len(patch_size) == 1 else patch_size
        self.dim = dim
        self.projection = keras.layers.Conv2D(
            self.dim,
            self.patch_size,
            strides=self.patch_size,
            padding="valid",
            data_format="channels_last",
            dtype=self.dtype_policy,
            name="projection",
        )

    def _grid(self, input_shape):
        """Checks an image shape and returns the patch grid `(rows, cols)`."""
        name = self.__class__.__name__
        input_shape = tuple(input_shape)
        _utils.check_ranks([input_shape], name, {4})
        height, width = input_shape[1], input_shape[2]
        ph, pw = self.patch_size
        if (height is not None and height < ph) or (width is not None and width < pw):
            raise ValueError(
                f"{name} needs images at least as large as one patch. "
                f"Received: H={height}, W={width}, patch_size={self.patch_size}"
            )
        rows = None if height is None else height // ph
        cols = None if width is None else width // pw
        return rows, cols

    def build(self, input_shape):
        self._grid(input_shape)
        self.projection.build(tuple(input_shape))
        self.built = True

    def call(self, inputs):
        x = self.projection(inputs)
        shape = ops.shape(x)
        return ops.reshape(x, (-1, shape[1] * shape[2], self.dim))

    def compute_output_shape(self, input_shape):
        rows, cols = self._grid(input_shape)
        patches = None if rows is None or cols is None else rows * cols
        return (tuple(input_shape)[0], patches, self.dim)

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        config = {
            **super().get_config(),
            "patch_size": self.patch_size,
            "dim": self.dim,
        }
        return _quantization.with_quantized_sublayers(self, config)
