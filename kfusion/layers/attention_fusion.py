import keras
from keras import ops

from kfusion import _checks
from kfusion.layers import _utils
from kfusion.layers._weighted_fusion import WeightedFusionBase


@keras.saving.register_keras_serializable(package="kfusion")
class AttentionFusion(WeightedFusionBase):
    """Fuses branch features by a per-sample attention-weighted sum.

    Each branch is projected to a common width, scored with additive
    (Bahdanau-style) attention (Bahdanau et al. 2015, *Neural Machine
    Translation by Jointly Learning to Align and Translate*), as used for
    multimodal fusion by Hori et al. 2017 (*Attention-Based Multimodal Fusion
    for Video Description*):

        p_m = W_m h_m + b_m
        s_m = v . tanh(U p_m + c)      (U, c and v shared by all branches)
        a   = softmax_m(s_1, ..., s_M)  (per sample)
        out = dropout(sum_m a_m p_m)

    The softmax is computed in float32 under mixed precision.

    Args:
        units: int. Width each branch is projected to by its own `Dense`
            layer, and the width of the output.
        attention_units: int or None. Width of the attention's hidden layer
            (`U`). Defaults to `units`.
        dropout: float in [0, 1). Dropout on the fused output.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a list or dict of at least two tensors of shape
            `(batch, d_m)`; widths may differ. Dicts are read in sorted key
            order.
        training: bool, whether dropout is active.
        mask: ignored (vector features carry no mask).
        return_weights: bool. Also return the attention weights.
        presence: None, or a `(batch, M)` tensor, 1 where branch m is present and 0
            where it is absent (`kf.layers.MissingModalities`): absent branches get
            weight 0 and the present ones' weights are renormalised to sum to 1 (a
            sample with none present keeps its weights).

    Returns:
        A tensor of shape `(batch, units)` in the layer's compute dtype. With
        `return_weights=True`, a tuple `(fused, weights)` where `weights` is a
        float32 tensor of shape `(batch, M)`: each sample's branch weights,
        summing to 1 over the branches.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import kfusion as kf
    >>> rng = np.random.default_rng(0)
    >>> a, b, c = (rng.normal(size=(2, d)).astype("float32") for d in (3, 5, 2))
    >>> fused, weights = kf.layers.AttentionFusion(units=4)([a, b, c], return_weights=True)
    >>> tuple(fused.shape), tuple(weights.shape)
    ((2, 4), (2, 3))
    >>> bool(np.allclose(keras.ops.convert_to_numpy(weights).sum(axis=-1), 1.0))
    True
    """

    def __init__(self, units, attention_units=None, dropout=0.0, **kwargs):
        units = _checks.check_int("units", units)
        attention_units = _checks.check_int("attention_units", attention_units, allow_none=True)
        dropout = _checks.check_rate("dropout", dropout)
        super().__init__(**kwargs)
        self.units = units
        self.attention_units = attention_units
        self.dropout = dropout
        self.supports_masking = True
        hidden = self.units if self.attention_units is None else self.attention_units
        self.attention_hidden = keras.layers.Dense(
            hidden, activation="tanh", dtype=self.dtype_policy, name="attention_hidden"
        )
        self.attention_score = keras.layers.Dense(
            1, use_bias=False, dtype=self.dtype_policy, name="attention_score"
        )
        self.dropout_layer = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="dropout"
        )
        # One projection per branch: created in `build`, once M is known.
        self.projections = []

    def build(self, input_shape):
        name = self.__class__.__name__
        shapes = _utils.flatten_shapes(input_shape, name)
        _utils.check_ranks(shapes, name, {2})
        self.input_spec = _utils.vector_input_specs(shapes)
        self.projections = [
            keras.layers.Dense(self.units, dtype=self.dtype_policy, name=f"projection_{i}")
            for i in range(len(shapes))
        ]
        for projection, shape in zip(self.projections, shapes):
            projection.build(shape)
        self.attention_hidden.build((None, len(shapes), self.units))
        self.attention_score.build((None, len(shapes), self.attention_hidden.units))
        self.dropout_layer.build((None, self.units))
        self.built = True

    def call(self, inputs, training=None, mask=None, return_weights=False, presence=None):
        _checks.check_bool("return_weights", return_weights)
        items, _ = _utils.flatten_inputs(inputs, self.__class__.__name__)
        projected = ops.stack(
            [projection(h) for projection, h in zip(self.projections, items)], axis=1
        )  # (batch, M, units)
        scores = self.attention_score(self.attention_hidden(projected))[..., 0]  # (batch, M)
        weights = _utils.softmax_float32(scores, axis=-1)
        if presence is not None:
            weights = _utils.renormalize(weights, presence)
        fused = ops.sum(projected * ops.cast(weights[:, :, None], projected.dtype), axis=1)
        fused = self.dropout_layer(fused, training=training)
        if not return_weights:
            return fused
        return fused, weights

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "attention_units": self.attention_units,
            "dropout": self.dropout,
        }
