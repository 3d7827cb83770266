import keras
from keras import ops

from kfusion import _checks
from kfusion.layers import _utils
from kfusion.layers._weighted_fusion import WeightedFusionBase


@keras.saving.register_keras_serializable(package="kfusion")
class GatedFusion(WeightedFusionBase):
    """Fuses branch features with per-feature gates (Gated Multimodal Unit).

    The Gated Multimodal Unit of Arevalo et al. 2017 (*Gated Multimodal
    Units for Information Fusion*), generalised to M branches. Every branch
    is squashed to a common width and a gate computed from all the raw
    inputs decides, feature by feature, how much each branch contributes:

        p_m = tanh(W_m h_m + b_m)
        M = 2:  z = sigmoid(W_z [h_1; h_2] + b_z)            (batch, units)
                out = z * p_1 + (1 - z) * p_2
        M > 2:  g = W_z [h_1; ...; h_M] + b_z, reshaped to (batch, M, units)
                z = softmax over the M axis of g (per feature)
                out = sum_m z_m * p_m
        out = dropout(out)

    The gates (sigmoid or softmax) are computed in float32 under mixed
    precision.

    Args:
        units: int. Width each branch is projected to, and the width of the
            output.
        dropout: float in [0, 1). Dropout on the fused output.
        **kwargs: base `keras.layers.Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a list or dict of at least two tensors of shape
            `(batch, d_m)`; widths may differ. Dicts are read in sorted key
            order.
        training: bool, whether dropout is active.
        mask: ignored (vector features carry no mask).
        return_weights: bool. Also return the gates.
        presence: None, or a `(batch, M)` tensor, 1 where branch m is present and 0
            where it is absent (`kf.layers.MissingModalities`): absent branches get
            weight 0 and the present ones' weights are renormalised to sum to 1 (a
            sample with none present keeps its weights).

    Returns:
        A tensor of shape `(batch, units)` in the layer's compute dtype. With
        `return_weights=True`, a tuple `(fused, gates)` where `gates` is a
        float32 tensor of shape `(batch, M, units)` that sums to 1 over the
        branch axis (for M = 2 it is `[z, 1 - z]` stacked). Its mean over the
        last axis, `(batch, M)`, gives per-sample branch weights.

    Example:

    >>> import keras
    >>> import numpy as np
    >>> import kfusion as kf
    >>> a, b = np.ones((2, 3), "float32"), np.ones((2, 5), "float32")
    >>> fused, gates = kf.layers.GatedFusion(units=4)([a, b], return_weights=True)
    >>> tuple(fused.shape), tuple(gates.shape)
    ((2, 4), (2, 2, 4))
    >>> branch_weights = keras.ops.convert_to_numpy(gates).mean(axis=-1)
    >>> branch_weights.shape, bool(np.allclose(branch_weights.sum(axis=-1), 1.0))
    ((2, 2), True)
    """

    def __init__(self, units, dropout=0.0, **kwargs):
        units = _checks.check_int("units", units)
        dropout = _checks.check_rate("dropout", dropout)
        super().__init__(**kwargs)
        self.units = units
        self.dropout = dropout
        self.supports_masking = True
        self.dropout_layer = keras.layers.Dropout(
            self.dropout, dtype=self.dtype_policy, name="dropout"
        )
        # The projections (one per branch) and the gate (its width depends
        # on M) are created in `build`, once the number of branches is known.
        self.projections = []
        self.gate = None

    def build(self, input_shape):
        name = self.__class__.__name__
        shapes = _utils.flatten_shapes(input_shape, name)
        _utils.check_ranks(shapes, name, {2})
        self.input_spec = _utils.vector_input_specs(shapes)
        self.num_branches = len(shapes)
        self.projections = [
            keras.layers.Dense(
                self.units, activation="tanh", dtype=self.dtype_policy, name=f"projection_{i}"
            )
            for i in range(self.num_branches)
        ]
        for projection, shape in zip(self.projections, shapes):
            projection.build(shape)
        gate_width = self.units if self.num_branches == 2 else self.num_branches * self.units
        self.gate = keras.layers.Dense(gate_width, dtype=self.dtype_policy, name="gate")
        self.gate.build((None, sum(s[-1] for s in shapes)))
        self.dropout_layer.build((None, self.units))
        self.built = True

    def call(self, inputs, training=None, mask=None, return_weights=False, presence=None):
        _checks.check_bool("return_weights", return_weights)
        items, _ = _utils.flatten_inputs(inputs, self.__class__.__name__)
        projected = [projection(h) for projection, h in zip(self.projections, items)]
        logits = self.gate(ops.concatenate(items, axis=-1))
        if len(items) == 2 and presence is None:
            z = _utils.sigmoid_float32(logits)  # (batch, units)
            gates = ops.stack([z, 1.0 - z], axis=1)  # (batch, 2, units)
            z_c = ops.cast(z, projected[0].dtype)
            fused = z_c * projected[0] + (1.0 - z_c) * projected[1]
        else:
            if len(items) == 2:
                z = _utils.sigmoid_float32(logits)
                gates = ops.stack([z, 1.0 - z], axis=1)  # (batch, 2, units)
            else:
                logits = ops.reshape(logits, (-1, len(items), self.units))
                gates = _utils.softmax_float32(logits, axis=1)  # (batch, M, units)
            if presence is not None:
                gates = _utils.renormalize(gates, presence)
            stacked = ops.stack(projected, axis=1)
            fused = ops.sum(ops.cast(gates, stacked.dtype) * stacked, axis=1)
        fused = self.dropout_layer(fused, training=training)
        if not return_weights:
            return fused
        return fused, gates

    def _weights_shape(self, batch, num_branches):
        return (batch, num_branches, self.units)

    def get_config(self):
        return {
            **super().get_config(),
            "units": self.units,
            "dropout": self.dropout,
        }
