import keras
from keras import ops

from kfusion import _checks
from kfusion.layers import _utils
from kfusion.layers._weighted_fusion import WeightedFusionBase


@keras.saving.register_keras_serializable(package="kfusion")
class WeightedSumFusion(WeightedFusionBase):
    """Fuses branch features by a learned, input-independent weighted sum.

    Each branch gets one learned logit; a softmax over the logits gives
    global branch weights shared by all samples (the "weighted average"
    late-fusion baseline, e.g. Baltrusaitis et al. 2018, *Multimodal Machine
    Learning: A Survey and Taxonomy*):

        p_m = W_m h_m + b_m          (units given; p_m = h_m when units=None)
        w   = softmax(l_1, ..., l_M)  (one logit l_m per branch, zeros init)
        out = dropout(activation(sum_m w_m p_m))

    The softmax is computed in float32 under mixed precision.

    Args:
        units: int or None. Width each branch is projected to by its own
            `Dense` layer. `None` uses the features as they are; then all
            inputs must have the same width.
        activation: activation applied to the weighted sum (name or
            callable). Defaults to `None` (linear).
        dropout: float in [0, 1). Dropout on the fused output.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a list or dict of at least two tensors of shape
            `(batch, d_m)`. Dicts are read in sorted key order.
        training: bool, whether dropout is active.
        mask: ignored (vector features carry no mask).
        return_weights: bool. Also return the branch weights.
        presence: None, or a `(batch, M)` tensor, 1 where branch m is present and 0
            where it is absent (`kf.layers.MissingModalities`): absent branches get
            weight 0 and the present ones' weights are renormalised to sum to 1 (a
            sample with none present keeps its weights).

    Returns:
        A tensor of shape `(batch, units)` (or `(batch, d)` when
        `units=None`) in the layer's compute dtype. With
        `return_weights=True`, a tuple `(fused, weights)` where `weights` is a
        float32 tensor of shape `(batch, M)` (the same softmax weights on
        every row) that sums to 1 over the branches.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import kfusion as kf
    >>> a, b = np.ones((2, 3), "float32"), np.ones((2, 5), "float32")
    >>> fused, weights = kf.layers.WeightedSumFusion(units=4)([a, b], return_weights=True)
    >>> tuple(fused.shape), tuple(weights.shape)
    ((2, 4), (2, 2))
    >>> keras.ops.convert_to_numpy(weights).tolist()
    [[0.5, 0.5], [0.5, 0.5]]
    """

    def __init__(self, units=None, activation=None, dropout=0.0, **kwargs):
        units = _checks.check_int("units", units, allow_none=True)
        activation = _checks.check_activation("activation", activation)
        dropout = _checks.check_rate("dropout", dropout)
        super().__init__(**kwargs)
        self.units = units
        self.activation = activation
        self.dropout = dropout
        self.supports_masking = True
        self._activation_fn = keras.activations.get(activation)
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
        if self.units is None and len({s[-1] for s in shapes}) > 1:
            raise ValueError(
                f"{name} with units=None needs inputs of equal width (set `units` to "
                f"project them). Received input shapes: {shapes}"
            )
        self.num_branches = len(shapes)
        if self.units is not None:
            self.projections = [
                keras.layers.Dense(self.units, dtype=self.dtype_policy, name=f"projection_{i}")
                for i in range(self.num_branches)
            ]
            for projection, shape in zip(self.projections, shapes):
                projection.build(shape)
        self.branch_logits = self.add_weight(
            shape=(self.num_branches,),
            initializer="zeros",
            dtype="float32",
            autocast=False,
            name="branch_logits",
        )
        width = self.units if self.units is not None else shapes[0][-1]
        self.dropout_layer.build((None, width))
        self.built = True

    def call(self, inputs, training=None, mask=None, return_weights=False, presence=None):
        _checks.check_bool("return_weights", return_weights)
        items, _ = _utils.flatten_inputs(inputs, self.__class__.__name__)
        if self.projections:
            items = [projection(h) for projection, h in zip(self.projections, items)]
        stacked = ops.stack(items, axis=1)  # (batch, M, width)
        weights = _utils.softmax_float32(self.branch_logits)  # (M,)
        if presence is None:
            fused = ops.sum(stacked * ops.cast(weights[None, :, None], stacked.dtype), axis=1)
        else:
            per_sample = _utils.renormalize(ops.zeros_like(presence) + weights[None, :], presence)
            fused = ops.sum(stacked * ops.cast(per_sample[:, :, None], stacked.dtype), axis=1)
        fused = self._activation_fn(fused)
        fused = self.dropout_layer(fused, training=training)
        if not return_weights:
            return fused
        if presence is None:
            per_sample = ops.zeros_like(ops.cast(stacked[:, :, 0], "float32")) + weights[None, :]
        return fused, per_sample

    def _output_width(self, shapes):
        return self.units if self.units is not None else shapes[0][-1]

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "activation": _checks.serialize_activation(self.activation),
            "dropout": self.dropout,
        }
