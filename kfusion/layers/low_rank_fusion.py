import math

import keras
from keras import ops

from kfusion import _checks
from kfusion.layers import _utils


@keras.saving.register_keras_serializable(package="kfusion")
class LowRankFusion(keras.layers.Layer):
    """Low-rank multimodal fusion (LMF) of M branch vectors.

    Tensor fusion (the outer product of all `[h_m; 1]`) followed by a linear
    map, with the weight tensor kept in a rank-`R` factorised form so that it
    is never built (Liu et al. 2018, *Efficient Low-rank Multimodal Fusion
    with Modality-Specific Factors*):

        z_m[r] = [h_m; 1] W_m[r]                     W_m: (R, d_m + 1, units)
        out    = sum_r w_r * (z_1[r] * z_2[r] * ... * z_M[r]) + b

    where `*` is the element-wise product, `w` (R,) are learned rank weights
    and `b` (units,) a bias. The appended 1 keeps every lower-order
    interaction (unimodal and bimodal terms) in the product.

    Args:
        units: int, width of the fused output.
        rank: int, rank R of the factorisation. Defaults to 4.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a list or dict of at least two tensors of shape `(batch, d_m)`;
            widths may differ. Dicts are read in sorted key order.

    Returns:
        A tensor of shape `(batch, units)`.

    Example:

    >>> import numpy as np
    >>> import kfusion as kf
    >>> a, b = np.ones((2, 3), "float32"), np.ones((2, 5), "float32")
    >>> tuple(kf.layers.LowRankFusion(units=6, rank=2)([a, b]).shape)
    (2, 6)
    """

    def __init__(self, units, rank=4, **kwargs):
        super().__init__(**kwargs)
        self.units = _checks.check_int("units", units)
        self.rank = _checks.check_int("rank", rank)
        self.supports_masking = True
        self.factors = []

    def _shapes(self, input_shape):
        shapes = _utils.flatten_shapes(input_shape, self.__class__.__name__)
        _utils.check_ranks(shapes, self.__class__.__name__, {2})
        return shapes

    def build(self, input_shape):
        shapes = self._shapes(input_shape)
        self.input_spec = _utils.vector_input_specs(shapes)
        # Initialisation keeps the output variance near 1 whatever the number of
        # branches M. The output is a product of M factors, so a per-factor
        # variance v gives v**M: glorot-style scales (which depend on `units`)
        # would shrink or blow up geometrically with M. Instead each W_m is
        # N(0, 1 / (d_m + 1)) (LeCun scaling over the true fan-in d_m + 1; keras'
        # own fan computation would count `rank` in the fan-in of a 3-D kernel),
        # so for unit-variance inputs every z_m[r] has variance ~1, the product of
        # the M factors too, and the rank weights w_r = 1 / sqrt(R) make the sum of
        # R roughly independent products variance ~1 again. The bias starts at 0.
        self.factors = [
            self.add_weight(
                shape=(self.rank, shape[-1] + 1, self.units),
                initializer=keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(shape[-1] + 1)),
                name=f"factor_{i}",
            )
            for i, shape in enumerate(shapes)
        ]
        self.rank_weights = self.add_weight(
            shape=(self.rank,),
            initializer=keras.initializers.Constant(1.0 / math.sqrt(self.rank)),
            name="rank_weights",
        )
        self.bias = self.add_weight(shape=(self.units,), initializer="zeros", name="bias")
        self.built = True

    def call(self, inputs, training=None, mask=None):
        items, _ = _utils.flatten_inputs(inputs, self.__class__.__name__)
        product = None
        for h, factor in zip(items, self.factors):
            ones = ops.ones_like(h[:, :1])
            z = ops.einsum("bd,rdu->bru", ops.concatenate([h, ones], axis=-1), factor)
            product = z if product is None else product * z
        rank_weights = ops.cast(self.rank_weights, product.dtype)
        out = ops.einsum("bru,r->bu", product, rank_weights)
        return out + ops.cast(self.bias, out.dtype)

    def compute_output_shape(self, input_shape):
        shapes = self._shapes(input_shape)
        return (shapes[0][0], self.units)

    def compute_mask(self, inputs, mask=None):
        return None

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "rank": self.rank,
        }
